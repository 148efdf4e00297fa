"""Bearer tokens and TLS, configured by the operator, over a real server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeprune.v1 import job_pb2, server_pb2, server_pb2_grpc
from tests.service.errors import details
from tests.service.harness import MODEL, Server

TOKEN = "s3cret-token"


def _info(channel: grpc.Channel, token: str | None = None) -> server_pb2.GetServerInfoResponse:
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    return server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(
        server_pb2.GetServerInfoRequest(), metadata=metadata, timeout=60)


def test_bearer_tokens(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    server = Server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                    {MODEL: f"hf:{tiny_gpt2_dir}"}, workers=0, auth_token=TOKEN, insecure=True)
    server.start()
    try:
        assert _info(server.channel, TOKEN).models[0].name == MODEL
        for token in (None, "wrong", ""):
            with pytest.raises(grpc.RpcError) as err:
                _info(server.channel, token)
            assert details(err.value)[:2] == ("UNAUTHENTICATED", "INVALID_TOKEN")
        with pytest.raises(grpc.RpcError) as err:  # streaming calls too
            list(server.jobs.WatchJob(job_pb2.WatchJobRequest(name="jobs/x"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(server.channel)  # probes carry no token
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert 'grpc_code="UNAUTHENTICATED"' in server.metrics_text()
    finally:
        server.stop()


def test_tls(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = Server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                    {MODEL: f"hf:{tiny_gpt2_dir}"}, root_cert=cert.read_bytes(), workers=0,
                    tls_cert=str(cert), tls_key=str(key))
    server.start()
    try:
        assert _info(server.channel).models[0].name == MODEL
        plain = server.connect()
        with pytest.raises(grpc.RpcError) as err:
            _info(plain)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
    finally:
        server.stop()
