"""Secrets stay secret: no token or database password on disk after `edgeprune serve` (clean exit
or SIGKILL), tokens kept out of argv, no plaintext tokens unless the operator says so, database
outages that tell clients nothing of the connection, /metrics on loopback by default."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest
from grpc_status import rpc_status
from sqlalchemy.engine import make_url

from edgeprune.client import Client
from edgeprune.service.config import Config, ConfigError, check_transport
from edgeprune.v1 import job_pb2, server_pb2, server_pb2_grpc
from tests.service.errors import details
from tests.service.harness import MODEL, Server, wait_for
from tests.service.test_config import parse
from tests.storage.databases import fresh_postgres_database, pg_admin_url


def _info(channel: grpc.Channel, token: str | None) -> server_pb2.GetServerInfoResponse:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    return server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(
        server_pb2.GetServerInfoRequest(), metadata=metadata, timeout=30)


def _files_holding(folders: list[Path], *needles: str) -> list[str]:
    """Every file under ``folders`` whose bytes contain one of ``needles``."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path} holds {n!r}" for n in needles if n.encode() in data]
    return found


@pytest.fixture
def pg_url_with_password() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL database whose URL carries a password (the local server trusts
    loopback connections, so any password connects: it only has to travel)."""
    password = "pw-" + secrets.token_hex(8)
    with fresh_postgres_database() as url:
        yield make_url(url).set(password=password).render_as_string(hide_password=False), password


@pytest.mark.postgres
@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["clean", "sigkill"])
def test_no_secret_is_left_on_disk(workers: int, sig: signal.Signals, tmp_path: Path,
                                   tiny_gpt2_dir: Path, pg_url_with_password: tuple[str, str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, password = pg_url_with_password
    token = "tok-" + secrets.token_hex(12)
    token_file = tmp_path / "secrets" / "tokens"
    token_file.parent.mkdir()
    token_file.write_text(f"# accepted tokens\n{token}\n")
    temp, data = tmp_path / "tmp", tmp_path / "data"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the server's temporary files land here
    server = Server(data, url, {MODEL: f"hf:{tiny_gpt2_dir}"}, workers=workers,
                    auth_token_file=str(token_file), insecure="true").start()
    assert server.proc is not None
    try:
        assert _info(server.channel, token).models[0].name == MODEL
        with pytest.raises(grpc.RpcError) as err:
            _info(server.channel, "wrong")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        if workers:  # the worker read its config and runs against the database
            wait_for(lambda: "edgeprune_workers 1.0" in server.metrics_text(), what="a worker")
        children = psutil.Process(server.proc.pid).children()
        assert len(children) == workers
        assert server.stop(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        # Orphaned workers notice their parent is gone and exit.
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, alive
    finally:
        server.stop(signal.SIGKILL)
    assert "visible" not in server.log()  # no argv warning: the token came from a file
    assert _files_holding([temp, data], token, password) == []
    if sig == signal.SIGTERM:  # a clean exit also removes the metrics samples it kept
        assert not [p.name for p in temp.iterdir() if p.name.startswith("edgeprune-")]


def test_a_token_on_the_command_line_warns(tmp_path: Path) -> None:
    result = _serve(["--auth-token", "tok-argv", "--port", "70000"], tmp_path)
    # (a bad port: the warning comes first, then the start fails)
    assert result.returncode == 2
    warning, error = result.stderr.strip().splitlines()
    assert "--auth-token" in warning and "other local users" in warning
    assert "--auth-token-file" in warning and "tok-argv" not in warning
    assert "port" in error


def test_token_file_and_environment_tokens_combine(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("\n# ops team\nfile-a\n  file-b  \n")
    config = parse(["--auth-token-file", str(path), "--insecure"],
                   {"EDGEPRUNE_AUTH_TOKENS": "env-a,env-b"})
    assert config.auth_tokens == ("env-a", "env-b", "file-a", "file-b")
    assert config.insecure and Config.from_json(config.to_json()) == config
    # Only the API needs TLS for tokens: a worker reading the same settings serves no calls.
    plain = parse(["--auth-token-file", str(path)])
    with pytest.raises(ConfigError, match="auth_tokens: bearer tokens need TLS"):
        check_transport(plain)
    check_transport(config)
    (tmp_path / "empty").write_text("# nobody yet\n\n")
    for name, message in (("empty", "no tokens"), ("missing", "No such file")):
        with pytest.raises(ConfigError, match=f"auth_token_file .*{name}: {message}"):
            parse(["--auth-token-file", str(tmp_path / name), "--insecure"])


def test_tokens_without_tls_need_insecure(tmp_path: Path) -> None:
    """The server refuses to start, naming the setting, rather than take tokens in plaintext."""
    (tmp_path / "tokens").write_text("tok\n")
    result = _serve(["--port", "0", "--auth-token-file", str(tmp_path / "tokens")], tmp_path)
    assert result.returncode == 2
    assert "auth_tokens" in result.stderr and "insecure" in result.stderr
    assert "tls_cert" in result.stderr and "Traceback" not in result.stderr
    result = _serve(["--port", "0"], tmp_path, EDGEPRUNE_AUTH_TOKENS="tok")
    assert result.returncode == 2 and "auth_tokens" in result.stderr


def test_tokens_over_tls_need_no_insecure(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    (tmp_path / "tokens").write_text("tok-tls\n")
    server = Server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                    {MODEL: f"hf:{tiny_gpt2_dir}"}, root_cert=cert.read_bytes(), workers=0,
                    tls_cert=str(cert), tls_key=str(key), auth_token_file=str(tmp_path / "tokens"))
    server.start()
    try:
        with Client(f"localhost:{server.port}", token="tok-tls", tls=str(cert)) as client:
            assert client.server_info().models[0].name == MODEL
    finally:
        server.stop()
    assert "without TLS" not in server.log()


@pytest.mark.postgres
def test_a_database_outage_shows_no_connection_details(tmp_path: Path,
                                                       tiny_gpt2_dir: Path) -> None:
    with fresh_postgres_database() as url:
        parsed = make_url(url)
        server = Server(tmp_path, url, {MODEL: f"hf:{tiny_gpt2_dir}"}, workers=0).start()
        admin = make_url(pg_admin_url()).set(drivername="postgresql")
        conninfo = admin.render_as_string(hide_password=False)
        try:
            server.jobs.ListJobs(job_pb2.ListJobsRequest(), timeout=30)  # a pooled connection
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS false')
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s", (parsed.database,))
            calls = (lambda: server.jobs.ListJobs(job_pb2.ListJobsRequest(), timeout=30),
                     lambda: server.jobs.GetJob(job_pb2.GetJobRequest(name="jobs/x"), timeout=30))
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert details(err.value)[:2] == ("UNAVAILABLE", "DATABASE_UNAVAILABLE")
                status = rpc_status.from_call(err.value)
                shown = [err.value.details(), str(status)]
                for secret in (parsed.host, str(parsed.port), parsed.database, parsed.username):
                    assert all(secret not in text for text in shown), (secret, shown)
            assert parsed.database in server.log()  # the operator still sees what failed
        finally:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS true')
            server.stop()


def test_metrics_listen_on_loopback_by_default(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    assert Config().metrics_host == "127.0.0.1"
    server = Server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                    {MODEL: f"hf:{tiny_gpt2_dir}"}, workers=0, host="0.0.0.0").start()
    assert server.proc is not None
    try:
        listening: dict[int, set[str]] = {}
        for conn in psutil.Process(server.proc.pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
        # The API where the operator put it (grpc binds 0.0.0.0 dual-stack, as "::").
        assert listening[server.port] & {"0.0.0.0", "::"}
        assert listening[server.metrics_port] == {"127.0.0.1"}
        assert "edgeprune_queue_pending_jobs" in server.metrics_text()  # served on loopback
    finally:
        server.stop()


def _serve(argv: list[str], cwd: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    """`edgeprune serve` in a subprocess that is expected to stop on its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EDGEPRUNE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.run([sys.executable, "-m", "edgeprune.service", "serve", *argv],
                          check=False, capture_output=True, text=True, timeout=60,
                          env={**env, **environ}, cwd=cwd)
