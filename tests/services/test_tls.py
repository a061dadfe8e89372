"""TLS everywhere: the Python client and every client command speak TLS (--ca-cert) and mutual
TLS (--client-cert, --client-key); `serve --client-ca` refuses a client without a certificate
its CA signed; a bearer token never travels in clear text across a network, and never sits on
a command line. The certificates are made here, by a CA that exists only for this test."""

from __future__ import annotations

import grpc
import pytest

from chainrule.client import Client, is_local_address
from services import cli
from services.server import serve
from tests.services.certificates import CertificateAuthority
from tests.services.helpers import iris_spec, rpc_error

pytestmark = [pytest.mark.distributed]

TOKEN = "alice-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger_ca = (CertificateAuthority(folder, name)
                                         for name in ("server", "client", "stranger"))
    return {
        "server_ca": server_ca.path,
        "server": server_ca.issue("chainrule-server", server=True),
        "client_ca": client_ca.path,
        "client": client_ca.issue("alice", server=False),
        "stranger": stranger_ca.issue("mallory", server=False),
    }


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory, pki):
    tokens = tmp_path_factory.mktemp("config") / "tokens"
    tokens.write_text(f"alice {TOKEN}\n")
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), tokens_file=tokens,
                    tls_cert=pki["server"].certificate, tls_key=pki["server"].key,
                    tls_client_ca=pki["client_ca"])
    yield running
    running.stop()


def _client(server, pki, certificate: str | None = "client", **options) -> Client:
    chain, key = pki[certificate].read() if certificate else (None, None)
    return Client(f"localhost:{server.port}", token=TOKEN, timeout=10,
                  root_certificates=pki["server_ca"].read_bytes(), certificate_chain=chain,
                  private_key=key, **options)


def test_mutual_tls_serves_a_client_whose_certificate_the_client_ca_signed(server, pki):
    with _client(server, pki) as client:
        job = client.submit(iris_spec(epochs=1))
        assert client.get(job.id).id == job.id


@pytest.mark.parametrize("certificate", [None, "stranger"])
def test_mutual_tls_refuses_a_client_without_a_certificate_the_client_ca_signed(
        server, pki, certificate):
    with _client(server, pki, certificate) as client:
        error = rpc_error(lambda: client.list())
    # The handshake fails: the call never reaches the service (no status of ours, no job).
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_cannot_talk_to_the_tls_server(server):
    with Client(f"127.0.0.1:{server.port}", token=TOKEN, timeout=5) as client:
        assert rpc_error(lambda: client.list()).code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("address", ["10.1.2.3:50051", "example.com:50051", "[fe80::1]:50051",
                                     "0.0.0.0:50051"])
def test_a_token_is_refused_over_an_insecure_channel_to_a_non_loopback_address(address):
    with pytest.raises(ValueError, match="clear text"):
        Client(address, token=TOKEN)
    Client(address).close()  # no token: nothing secret to leak
    Client(address, token=TOKEN, tls=True).close()  # TLS with the system's CAs


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051",
                                     "unix:/run/chainrule.sock"])
def test_loopback_addresses_and_unix_sockets_are_local(address):
    assert is_local_address(address)


def test_a_client_certificate_needs_its_key(pki):
    chain, _ = pki["client"].read()
    with pytest.raises(ValueError, match="private_key"):
        Client("localhost:1", root_certificates=pki["server_ca"].read_bytes(),
               certificate_chain=chain)


def test_mutual_tls_needs_tls(local_ray, tmp_path, pki):
    with pytest.raises(ValueError, match="--client-ca needs --tls-cert"):
        serve("127.0.0.1:0", tmp_path, tls_client_ca=pki["client_ca"])


# --- the command line ---------------------------------------------------------------------------


def _cli_tls(server, pki) -> list[str]:
    return ["--server", f"localhost:{server.port}", "--ca-cert", str(pki["server_ca"]),
            "--client-cert", str(pki["client"].certificate),
            "--client-key", str(pki["client"].key)]


def test_the_cli_reads_the_token_from_the_environment_and_speaks_mutual_tls(
        server, pki, monkeypatch, capsys):
    with _client(server, pki) as client:
        job = client.submit(iris_spec(epochs=1))
    monkeypatch.setenv(cli.TOKEN_VARIABLE, TOKEN)
    assert cli.main(["status", job.id, *_cli_tls(server, pki)]) == 0
    assert job.id in capsys.readouterr().out


def test_the_cli_reads_the_token_from_a_token_file(server, pki, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(cli.TOKEN_VARIABLE, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert cli.main(["datasets", *_cli_tls(server, pki), "--token-file", str(token_file)]) == 0
    assert "sklearn:iris" in capsys.readouterr().out


def test_the_cli_without_its_client_certificate_is_refused(server, pki, monkeypatch, capsys):
    monkeypatch.setenv(cli.TOKEN_VARIABLE, TOKEN)
    options = ["--server", f"localhost:{server.port}", "--ca-cert", str(pki["server_ca"])]
    assert cli.main(["jobs", *options]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_the_cli_refuses_a_token_on_its_command_line(server, pki, capsys):
    assert cli.main(["jobs", *_cli_tls(server, pki), "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert "--token" in err and "CHAINRULE_TOKEN" in err and "--token-file" in err


def test_the_cli_refuses_to_send_a_token_in_clear_text_across_a_network(monkeypatch, capsys):
    monkeypatch.setenv(cli.TOKEN_VARIABLE, TOKEN)
    assert cli.main(["jobs", "--server", "192.0.2.1:50051"]) == 2
    assert "clear text" in capsys.readouterr().err


def test_every_client_command_takes_the_tls_and_token_file_options():
    commands = ["submit S", "jobs", "status J", "watch J", "cancel J", "resume J", "delete J",
                "upload F", "datasets", "download J -o w.npz"]
    for command in commands:
        name, *positional = command.split()
        args = cli.build_parser().parse_args(
            [name, *positional, "--ca-cert", "ca.pem", "--client-cert", "c.pem",
             "--client-key", "k.pem", "--token-file", "t"])
        assert (args.ca_cert, args.client_cert, args.client_key, args.token_file) == (
            "ca.pem", "c.pem", "k.pem", "t"), name
