"""Client.download_tensorboard against a real gRPC server (no Ray) that answers
DownloadTensorBoard with an archive of our choosing: a well-formed one is written under
DIR/<job>/, and no member can write anywhere else (a path out of the folder, another job's
folder, a link)."""

from __future__ import annotations

import io
import tarfile
from concurrent import futures

import grpc
import pytest

from chainrule import Client
from chainrule.v1 import training_service_pb2 as pb
from chainrule.v1 import training_service_pb2_grpc as pb_grpc

JOB = "job-0123456789ab"


def archive(*members: tuple[str, bytes | None, bytes]) -> bytes:
    """(name, symlink target or None, content) per member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, link, content in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link.decode()
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class ArchiveServer(pb_grpc.TrainingServiceServicer):
    def __init__(self) -> None:
        self.data = b""

    def DownloadTensorBoard(self, request, context):
        for start in range(0, len(self.data), 1000):  # several chunks, cut mid-header
            yield pb.DownloadTensorBoardResponse(chunk=self.data[start:start + 1000])


@pytest.fixture(scope="module")
def served():
    servicer = ArchiveServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TrainingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with Client(f"127.0.0.1:{port}", timeout=10) as client:
        yield servicer, client
    server.stop(0).wait()


def test_the_archives_files_are_written_under_the_jobs_folder(served, tmp_path):
    servicer, client = served
    first, second = bytes(range(256)) * 20, b"second run"
    servicer.data = archive((f"{JOB}/events.out.tfevents.1.host.run1", None, first),
                            (f"{JOB}/events.out.tfevents.2.host.run2", None, second))
    written = client.download_tensorboard(JOB, tmp_path / "runs")
    assert written == [tmp_path / "runs" / JOB / "events.out.tfevents.1.host.run1",
                       tmp_path / "runs" / JOB / "events.out.tfevents.2.host.run2"]
    assert [path.read_bytes() for path in written] == [first, second]
    assert sorted(p.name for p in (tmp_path / "runs" / JOB).iterdir()) == [
        "events.out.tfevents.1.host.run1", "events.out.tfevents.2.host.run2"]


@pytest.mark.parametrize("name, link", [
    (f"{JOB}/../../outside", None),
    ("job-ffffffffffff/events.out.tfevents.1.host.run1", None),  # another job's folder
    (f"{JOB}/sub/events", None),
    (f"/{JOB}/events", None),
    (f"{JOB}/events.out.tfevents.1.host.run1", b"/etc/passwd"),  # a link
])
def test_a_member_that_would_write_elsewhere_is_refused(served, tmp_path, name, link):
    servicer, client = served
    servicer.data = archive((name, link, b"not yours"))
    with pytest.raises(OSError, match="unexpected archive member"):
        client.download_tensorboard(JOB, tmp_path / "runs")
    written = [path for path in tmp_path.rglob("*") if not path.is_dir()]
    assert written == []
