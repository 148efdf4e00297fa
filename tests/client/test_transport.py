"""Where the client sends its bearer token: over TLS, or to this host, or where the caller said
`insecure`; and `edgeprune info` names the server it really asked."""

from __future__ import annotations

import asyncio

import pytest

from edgeprune.client import AsyncClient, Client, InsecureTransport
from edgeprune.client._core import is_local_target
from edgeprune.client.cli import main
from tests.client.conftest import ClientServer

REMOTE = "edgeprune.example.invalid:50051"  # never resolved: the client refuses before a call


@pytest.mark.parametrize(("target", "local"), [
    ("localhost:50051", True), ("LOCALHOST", True), ("127.0.0.1:1", True), ("127.8.9.1:1", True),
    ("[::1]:50051", True), ("ipv4:127.0.0.1:5", True), ("ipv6:[::1]:5", True),
    ("dns:///localhost:50051", True), ("unix:/run/edgeprune.sock", True),
    ("ipv4:127.0.0.1:5,127.0.0.2:6", True), ("ipv4:127.0.0.1:5,10.0.0.1:6", False),
    ("10.0.0.1:50051", False), ("example.com:443", False), ("dns:///example.com:443", False),
    ("localhost.example.com:1", False), ("[2001:db8::1]:50051", False), ("0.0.0.0:50051", False),
])
def test_local_targets(target: str, local: bool) -> None:
    assert is_local_target(target) is local


def test_a_token_to_another_host_needs_tls_or_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEPRUNE_INSECURE", raising=False)
    monkeypatch.delenv("EDGEPRUNE_TOKEN", raising=False)
    with pytest.raises(InsecureTransport) as caught:
        Client(REMOTE, token="s3cret")
    message = str(caught.value)
    assert REMOTE in message and "TLS" in message and "--insecure" in message
    assert "insecure=True" in message and "s3cret" not in message
    assert caught.value.exit_code == 2
    with pytest.raises(InsecureTransport):
        AsyncClient(REMOTE, token="s3cret")
    monkeypatch.setenv("EDGEPRUNE_TOKEN", "from-env")
    with pytest.raises(InsecureTransport):
        Client(REMOTE)

    # Said explicitly (argument or environment), or TLS, or no token at all: a channel is made.
    Client(REMOTE, insecure=True).close()
    Client(REMOTE, tls=True).close()
    monkeypatch.setenv("EDGEPRUNE_INSECURE", "1")
    Client(REMOTE).close()
    async def async_client() -> None:  # an aio channel is made inside a running loop
        await AsyncClient(REMOTE).close()

    asyncio.run(async_client())
    with pytest.raises(InsecureTransport):  # the argument overrides the environment
        Client(REMOTE, insecure=False)
    monkeypatch.delenv("EDGEPRUNE_TOKEN")
    monkeypatch.delenv("EDGEPRUNE_INSECURE")
    Client(REMOTE).close()


def test_the_cli_refuses_a_plaintext_token_and_says_how_to_fix_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEPRUNE_INSECURE", raising=False)
    code = main(["info", "--target", REMOTE, "--token", "s3cret", "--timeout", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--insecure" in err and "--tls" in err and "Traceback" not in err
    # With --insecure the call is made (and fails to reach the unresolvable host).
    assert main(["info", "--target", REMOTE, "--token", "s3cret", "--insecure",
                 "--timeout", "1"]) == 9


def test_info_prints_the_target_it_used(
    capsys: pytest.CaptureFixture[str], client_server: ClientServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["info", "--target", client_server.target]) == 0
    out = capsys.readouterr().out
    server_line = next(line for line in out.splitlines() if line.lstrip().startswith("server"))
    assert server_line.split()[-1] == client_server.target
    monkeypatch.setenv("EDGEPRUNE_TARGET", client_server.target)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert client_server.target in out and "localhost:50051" not in out
