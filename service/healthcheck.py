"""``python -m edgeprune.service.healthcheck``: exit 0 when the local server reports SERVING.

The container's HEALTHCHECK (and an exec probe where the server speaks TLS, which Kubernetes'
native gRPC probes cannot) runs this: one ``grpc.health.v1.Health/Check`` call, exit code 0 when
the answer is SERVING and 1 otherwise (NOT_SERVING while draining or while the server's database
does not answer, unreachable, timed out), with a one-line reason on stderr. ``--service liveness``
asks whether the process itself is up, whatever its database. Defaults come from the server's own settings: ``EDGEPRUNE_PORT`` and,
when the server has TLS, ``EDGEPRUNE_TLS_CERT`` as the trusted certificate. Health needs no token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    target: str,
    *,
    service: str = "",
    timeout: float = 3.0,
    root_cert: bytes | None = None,
    server_name: str | None = None,
) -> tuple[bool, str]:
    """(serving, reason) of ``service`` ("" = the whole server) at ``target`` (host:port)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if root_cert is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_cert)
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return False, f"{err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgeprune.service.healthcheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("EDGEPRUNE_PORT") or 50051))
    parser.add_argument("--service", default="", help='health service name ("": the server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("EDGEPRUNE_TLS_CERT") or None,
        help="PEM certificate to trust (default: $EDGEPRUNE_TLS_CERT; none: plaintext)",
    )
    parser.add_argument(
        "--tls-server-name", default=None, help="name the server's certificate is issued for"
    )
    args = parser.parse_args(argv)
    try:
        root_cert = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    except OSError as err:
        print(f"healthcheck: {err}", file=sys.stderr)
        return 1
    serving, reason = check(
        f"{args.host}:{args.port}",
        service=args.service,
        timeout=args.timeout,
        root_cert=root_cert,
        server_name=args.tls_server_name,
    )
    if not serving:
        print(f"healthcheck: {args.host}:{args.port}: {reason}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
