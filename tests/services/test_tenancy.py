"""Tenants: with a token file, a bearer token names the tenant, and a tenant sees only its own
jobs and data sets; without one, the server will not bind anything but loopback."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from chainrule.client import Client
from services.server import serve
from tests.services.helpers import iris_spec, rpc_error, wait_until_done

pytestmark = [pytest.mark.distributed]

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("config") / "tokens"
    tokens.write_text(f"# tenant token\nalice {ALICE}\nbob {BOB}\n")
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), tokens_file=tokens)
    yield running
    running.stop()


def test_tenants_see_only_their_own_jobs_and_data_sets(server, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((8, 4)), y=np.arange(8) % 3)
    with Client(server.address, token=ALICE) as alice, Client(server.address, token=BOB) as bob:
        job = alice.submit(iris_spec(), request_id="same-key")
        alice.upload(path, "mine")
        wait_until_done(alice, job.id)

        assert [j.id for j in alice.jobs()] == [job.id]
        assert list(bob.jobs()) == []
        for call in (lambda: bob.get(job.id), lambda: bob.cancel(job.id),
                     lambda: list(bob.watch(job.id, timeout=5)),
                     lambda: bob.download(job.id, tmp_path / "stolen.safetensors"),
                     lambda: bob.resume(job.id, epochs=1), lambda: bob.delete(job.id)):
            assert rpc_error(call).code() == grpc.StatusCode.NOT_FOUND
        assert [d.name for d in alice.datasets().datasets] == ["mine"]
        assert list(bob.datasets().datasets) == []
        assert rpc_error(lambda: bob.delete_dataset("mine")).code() == grpc.StatusCode.NOT_FOUND
        spec = iris_spec(data={"dataset": "mine", "batch_size": 2, "epochs": 1})
        error = rpc_error(lambda: bob.submit(spec))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("data.dataset")
        # idempotency keys are per tenant too
        assert bob.submit(iris_spec(), request_id="same-key").id != job.id


def test_another_tenants_model_and_log_are_not_found(server, tmp_path):
    path = tmp_path / "rows.npz"
    np.savez(path, x=np.ones((4, 4)), y=np.arange(4) % 3)
    with Client(server.address, token=ALICE) as alice, Client(server.address, token=BOB) as bob:
        job = alice.submit(iris_spec())
        wait_until_done(alice, job.id)
        assert alice.predict(job.id, np.ones((2, 4))).classes.shape == (2,)
        assert [entry.kind for entry in alice.logs(job.id)][-1] == "state"
        bob.upload(path, "bobs-rows")
        for call in (lambda: bob.predict(job.id, np.ones((2, 4))),
                     lambda: bob.evaluate(job.id, "bobs-rows"),
                     lambda: list(bob.generate(job.id, "hello", max_tokens=1)),
                     lambda: list(bob.logs(job.id)), lambda: list(bob.logs(job.id, True))):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()


def test_a_missing_or_unknown_token_is_unauthenticated(server):
    for token in (None, "not-a-token-at-all-xx"):
        with Client(server.address, token=token) as client:
            error = rpc_error(lambda: client.list())
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization" in error.details()
            if token is None:  # says how a user of the command or the client sends one
                assert "--token-file" in error.details() and "$CHAINRULE_TOKEN" in error.details()


def test_without_tokens_the_server_refuses_a_non_loopback_address(local_ray, tmp_path):
    with pytest.raises(ValueError, match="not loopback"):
        serve("0.0.0.0:0", tmp_path)
    with pytest.raises(ValueError, match="TLS"):  # tokens alone would send them in clear text
        tokens = tmp_path / "tokens"
        tokens.write_text(f"alice {ALICE}\n")
        serve("0.0.0.0:0", tmp_path, tokens_file=tokens)
