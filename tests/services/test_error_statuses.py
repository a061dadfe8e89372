"""One error mapping for every RPC (issue 11): a request that does not parse is INVALID_ARGUMENT,
not gRPC's INTERNAL; INTERNAL means a bug, is logged with its traceback under an id, and tells
the caller only that id."""

from __future__ import annotations

import logging
import re

import grpc
import pytest

from chainrule.client import Client
from chainrule.v1 import training_service_pb2 as pb
from services.server import SERVICE_NAME, serve
from tests.services.helpers import data_files, rpc_error

pytestmark = [pytest.mark.distributed]

METHODS = list(pb.DESCRIPTOR.services_by_name["TrainingService"].methods)
NOT_A_MESSAGE = {
    "truncated": pb.GetJobRequest(job_id="job-0123456789ab").SerializeToString()[:-3],
    "length past the end": b"\x0a\xff\xff\xff\xff\x0f",
    "varint of eleven bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "an unmatched end-group tag": b"\x0c",
    "invalid UTF-8 in field 1": b"\x0a\x02\xff\xfe",
}


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"))
    yield running
    running.stop()


def _raw_call(channel: grpc.Channel, method, data: bytes):
    """Call `method` with `data` as the serialized request, bypassing the client's
    serialisation; returns the RpcError."""
    path = f"/{SERVICE_NAME}/{method.name}"
    if method.client_streaming:
        call = channel.stream_unary(path)
        return rpc_error(lambda: call(iter([data]), timeout=10))
    if method.server_streaming:
        call = channel.unary_stream(path)
        return rpc_error(lambda: list(call(data, timeout=10)))
    call = channel.unary_unary(path)
    return rpc_error(lambda: call(data, timeout=10))


def _deep_spec_bytes(depth: int) -> bytes:
    """A SubmitJobRequest whose model nests residual blocks `depth` deep, serialized by hand
    (protobuf itself refuses to build one past its recursion limit)."""
    layer = b""
    for _ in range(depth):
        residual = b"\x0a" + _varint(len(layer)) + layer  # Residual.layers
        layer = b"\x62" + _varint(len(residual)) + residual  # Layer.residual (field 12)
    model = b"\x0a" + _varint(len(layer)) + layer  # ModelSpec.layers
    spec = b"\x12" + _varint(len(model)) + model  # JobSpec.model
    return b"\x0a" + _varint(len(spec)) + spec  # SubmitJobRequest.spec


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@pytest.mark.parametrize("data", NOT_A_MESSAGE.values(), ids=list(NOT_A_MESSAGE))
def test_a_request_that_does_not_parse_is_invalid_argument_naming_its_message(
        server, method, data):
    if method.name == "ListDatasets" and data == NOT_A_MESSAGE["invalid UTF-8 in field 1"]:
        pytest.skip("ListDatasetsRequest has no field 1: unknown bytes are kept, it parses")
    before = server.service.store.snapshot(), data_files(server.data_dir)
    with grpc.insecure_channel(server.address) as channel:
        error = _raw_call(channel, method, data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"request: not a valid {method.input_type.full_name} "
                                      f"message"), error.details()
    assert (server.service.store.snapshot(), data_files(server.data_dir)) == before


def test_a_spec_nested_past_protobufs_recursion_limit_is_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        error = _raw_call(channel, pb.DESCRIPTOR.services_by_name["TrainingService"]
                          .methods_by_name["SubmitJob"], _deep_spec_bytes(200))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("request: not a valid chainrule.v1.SubmitJobRequest")


@pytest.mark.parametrize("rpc", ["ListDatasets", "WatchJob"])
def test_a_bug_is_internal_with_only_an_id_and_the_log_has_its_traceback_under_that_id(
        server, monkeypatch, caplog, rpc):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail at /srv/chainrule/data")

    monkeypatch.setattr(server.service, "datasets" if rpc == "ListDatasets" else "watch",
                        broken)
    with Client(server.address, timeout=10) as client, caplog.at_level(logging.ERROR):
        if rpc == "ListDatasets":
            error = rpc_error(client.datasets)
        else:
            error = rpc_error(lambda: list(client.stub.WatchJob(
                pb.WatchJobRequest(job_id="job-0"), timeout=10)))
    assert error.code() == grpc.StatusCode.INTERNAL
    found = re.fullmatch(r"internal error, see server log ([0-9a-f]{12})", error.details())
    assert found, error.details()
    logged = [record for record in caplog.records if found.group(1) in record.getMessage()]
    assert len(logged) == 1 and rpc in logged[0].getMessage()
    assert logged[0].exc_info is not None and "secret detail" in str(logged[0].exc_info[1])
