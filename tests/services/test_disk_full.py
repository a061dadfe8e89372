"""A full disk (issue 11): uploads and submits answer RESOURCE_EXHAUSTED with a message a person
can act on, not INTERNAL with raw OSError or SQLite text, and the store stays intact: nothing
half-written, every earlier row readable, and writes work again once there is space.

The data folder is a real 16 MiB tmpfs (we mount it; the test is skipped where mounting is not
allowed), filled to the last byte by a file beside it."""

from __future__ import annotations

import errno
import hashlib
import io
import sqlite3
import subprocess

import grpc
import numpy as np
import pytest

from chainrule.client import Client, state_name
from chainrule.v1 import training_service_pb2 as pb
from services.server import serve
from tests.services.helpers import data_files, iris_spec, rpc_error, wait_until_done

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    # Lazy: the stopped server's idle RPC threads may still hold their SQLite connections.
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture(scope="module")
def server(local_ray, small_disk):
    running = serve("127.0.0.1:0", small_disk / "data")
    yield running
    running.stop()


def _upload(name: str, data: bytes):
    header = pb.DatasetHeader(name=name, format="npz", size_bytes=len(data),
                              sha256=hashlib.sha256(data).hexdigest())
    return header, [data]


def _npz(samples: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(samples)
    np.savez(buffer, x=rng.standard_normal((samples, 8)), y=rng.integers(0, 3, samples))
    return buffer.getvalue()


def _fill(path) -> None:
    """Write until the file system has no byte left."""
    block = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    handle.write(block[:size])
            except OSError as error:
                assert error.errno == errno.ENOSPC, error


def test_uploads_and_submits_on_a_full_disk_are_resource_exhausted_and_the_store_survives(
        server, small_disk):
    store = server.service.store
    with Client(server.address, timeout=20) as client:
        client.upload_stream(*_upload("kept", _npz(64)))
        done = wait_until_done(client, client.submit(iris_spec()).id)
        assert state_name(done.state) == "SUCCEEDED", done.error

        _fill(small_disk / "filler")
        before = store.snapshot(), data_files(server.data_dir)
        refused = {
            "upload": rpc_error(lambda: client.upload_stream(*_upload("new", _npz(4096)))),
            "submit": rpc_error(lambda: client.submit(iris_spec(name="on-a-full-disk"))),
        }
        for what, error in refused.items():
            print(f"{what}: {error.code().name}: {error.details()}")
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (what, error.details())
            assert error.details().startswith("the server is out of disk space"), error.details()
            assert str(small_disk) not in error.details()  # no server paths, no raw OS text
        assert (store.snapshot(), data_files(server.data_dir)) == before
        assert [d.name for d in client.datasets().datasets] == ["kept"]  # reads still work

        (small_disk / "filler").unlink()
        client.upload_stream(*_upload("new", _npz(4096)))
        again = wait_until_done(client, client.submit(iris_spec(name="after")).id)
        assert state_name(again.state) == "SUCCEEDED", again.error
        assert [d.name for d in client.datasets().datasets] == ["kept", "new"]
    with sqlite3.connect(small_disk / "data" / "chainrule.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
