"""Fuzzing the service over a real gRPC channel (issue 11, BRIEF invariant 4).

One real server, started once. Hypothesis generates requests for every RPC of the proto: whole
messages built from the descriptors (every field, oneof and enum, unknown enum values, huge and
negative numbers, NaN and infinities, unicode, nesting), mutations of valid specs and uploads
(field changes, truncations, bit flips, inserted and deleted bytes, deep nesting), and the raw
bytes of requests with those mutations. Every request must be answered within a second with a
status other than INTERNAL or UNKNOWN (a refused one that took longer is timed once more: a slow
path is slow again, a stall of this shared machine is not); the health check must stay SERVING;
and a rejected request must leave the store (its rows and the data folder's files) exactly as
it was.

Accepted requests change the store, as they should: a job they queue is cancelled at once, and
its rows and files are left out of the comparison from then on.

The seed is fixed (`derandomize`) and the CI run makes 2,000 requests; `make fuzz` makes more
(CHAINRULE_FUZZ_EXAMPLES) from a fresh seed (CHAINRULE_FUZZ_SEED, printed by Hypothesis with
any failure, so a find can be replayed).
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor as descriptors
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from chainrule.client import Client, state_name
from chainrule.spec_file import job_spec_from_dict
from chainrule.v1 import job_pb2
from chainrule.v1 import training_service_pb2 as pb
from services.server import SERVICE_NAME, serve
from services.submit_rate import UNLIMITED
from services.validation import Limits
from tests.services.helpers import data_files, iris_spec, wait_for, wait_until_done

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

EXAMPLES = int(os.environ.get("CHAINRULE_FUZZ_EXAMPLES", "2000"))
SEED = os.environ.get("CHAINRULE_FUZZ_SEED")  # unset: the fixed derandomized sequence
ANSWER_SECONDS = 1.0
SERVICE = pb.DESCRIPTOR.services_by_name["TrainingService"]
FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MAX_DEPTH = 4  # nesting of generated messages (deeper specs come from `deep_specs`)
UPLOAD_LIMIT = 1 << 20
MiB = 1 << 20

# --- the server and what it holds before the fuzz -------------------------------------------------


@dataclass
class Seeded:
    """The fuzz's server and the names of real things on it (a finished job, uploads)."""

    server: object
    client: Client
    job_ids: list[str]
    dataset_names: list[str]


def _npz(compressed: bool = False, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


RNG = np.random.default_rng(0)
BASE_UPLOADS = {
    "npz": _npz(x=RNG.standard_normal((64, 3)), y=RNG.integers(0, 3, 64)),
    "npz-compressed": _npz(compressed=True, x=RNG.standard_normal((64, 3)),
                           y=RNG.standard_normal((64, 2)), x_val=RNG.standard_normal((8, 3)),
                           y_val=RNG.standard_normal((8, 2))),
    "npz-tokens": _npz(x=RNG.integers(0, 9, (32, 5)).astype(np.uint8), y=np.arange(32) % 2),
    "csv": ("a,b,label\n" + "".join(f"{i / 7:.3f},{i % 5},{i % 3}\n" for i in range(40))
            ).encode(),
}


def _header(name: str, data: bytes, format: str) -> pb.DatasetHeader:
    return pb.DatasetHeader(name=name, format="csv" if format == "csv" else "npz",
                            label_column="label" if format == "csv" else "",
                            size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _valid_specs(regression_upload: str) -> list[job_pb2.JobSpec]:
    return [
        iris_spec(),
        iris_spec(name="parity", model={"layers": [
            {"lstm": {"hidden_size": 4}}, {"last_step": {}}, {"linear": {"out_features": 2}}]},
            data={"dataset": "synthetic:parity", "batch_size": 64, "epochs": 1}),
        iris_spec(name="tokens", model={"layers": [
            {"embedding": {"num_embeddings": 10, "embedding_dim": 4}}, {"flatten": {}},
            {"linear": {"out_features": 2}}]},
            data={"dataset": "synthetic:sequence_sum", "batch_size": 64, "epochs": 1}),
        iris_spec(name="two-targets", loss="mse", model={"layers": [
            {"linear": {"out_features": 8}}, {"tanh": {}}, {"linear": {"out_features": 2}}]},
            data={"dataset": f"upload:{regression_upload}", "batch_size": 16, "epochs": 1},
            optimizer={"sgd": {"lr": 0.1, "momentum": 0.9}},
            schedule={"cosine_with_warmup": {"warmup_steps": 2}}, clipping={"max_norm": 1.0}),
        job_spec_from_dict({
            "name": "residual", "loss": "cross_entropy", "seed": 3,
            "model": {"layers": [{"linear": {"out_features": 8}}, {"residual": {"layers": [
                {"layer_norm": {}}, {"linear": {"out_features": 8}}, {"gelu": {}}]}},
                {"dropout": {"p": 0.1}}, {"linear": {"out_features": 3}}]},
            "optimizer": {"adamw": {"lr": 0.001, "betas": [0.9, 0.99]}},
            "data": {"dataset": "sklearn:wine", "batch_size": 32, "epochs": 2,
                     "validation_fraction": 0.25},
            "early_stopping": {"patience": 2}}),
    ]


@pytest.fixture(scope="module")
def seeded(local_ray, tmp_path_factory):
    # Small limits: an accepted job is cancelled at once, but one that starts should not take
    # the machine's cores from the requests being timed.
    limits = Limits(max_workers=2, max_parameter_servers=2, max_parameters=100_000,
                    max_epochs=5)
    # No submit rate: every fuzzed spec must reach validation, not the rate's refusal.
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), max_concurrent_jobs=1,
                    max_upload_bytes=UPLOAD_LIMIT, limits=limits, submit_rate=UNLIMITED)
    client = Client(running.address, timeout=30)
    names = []
    for name, data in BASE_UPLOADS.items():
        client.upload_stream(_header(f"seed-{name}", data, name), [data])
        names.append(f"seed-{name}")
    seed = client.submit(iris_spec(name="seed"))
    for spec in _valid_specs("seed-npz-compressed"):  # the mutations start from valid specs:
        client.cancel(client.submit(spec).id)  # accepted, queued behind the seed, never run
    finished = wait_until_done(client, seed.id)
    assert state_name(finished.state) == "SUCCEEDED", finished.error
    yield Seeded(running, client, [finished.id], names)
    client.close()
    running.stop()


# --- generated messages ---------------------------------------------------------------------------

INTERESTING_TEXT = [
    "", " ", "sklearn:iris", "synthetic:parity", "upload:seed-npz", "seed-npz", "seed-csv",
    "upload:", ":", "label", "npz", "csv", "safetensors", "PACK", "STRICT_SPREAD", "mse",
    "cross_entropy", "float64", "float16", "tanh", "relu", "job-000000000000", "a/b",
    "evil/../../../x", "../x", "\x00", "\u202e\u0644\u0627", "\U0001f600" * 3, "x" * 5000,
    "default", "DROP TABLE jobs; --", "%s%n", "\ud7ff\ue000",
    "0", "-1", "1e309", "NaN", "\u00b2", "\u0661", str(2**63), str(2**70),  # page tokens
]
INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 63, 64, 255, 256, 4095, 65535, 2**31 - 1, 2**31,
                    2**32 - 1, 2**53, 2**63 - 1]
INTERESTING_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e300, 1.7976931348623157e308,
                      float("nan"), float("inf"), float("-inf"), 2.0**53, 0.9999999999999999]


def _bounded_ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in INTERESTING_INTS + [-v for v in INTERESTING_INTS] + [low, high]
             if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


FD = descriptors.FieldDescriptor
SCALARS = {
    FD.TYPE_DOUBLE: st.one_of(st.sampled_from(INTERESTING_FLOATS), st.floats()),
    FD.TYPE_FLOAT: st.one_of(st.sampled_from(INTERESTING_FLOATS), st.floats(width=32)),
    FD.TYPE_INT32: _bounded_ints(-2**31, 2**31 - 1),
    FD.TYPE_SINT32: _bounded_ints(-2**31, 2**31 - 1),
    FD.TYPE_SFIXED32: _bounded_ints(-2**31, 2**31 - 1),
    FD.TYPE_UINT32: _bounded_ints(0, 2**32 - 1),
    FD.TYPE_FIXED32: _bounded_ints(0, 2**32 - 1),
    FD.TYPE_INT64: _bounded_ints(-2**63, 2**63 - 1),
    FD.TYPE_SINT64: _bounded_ints(-2**63, 2**63 - 1),
    FD.TYPE_SFIXED64: _bounded_ints(-2**63, 2**63 - 1),
    FD.TYPE_UINT64: _bounded_ints(0, 2**64 - 1),
    FD.TYPE_FIXED64: _bounded_ints(0, 2**64 - 1),
    FD.TYPE_BOOL: st.booleans(),
    FD.TYPE_STRING: st.one_of(st.sampled_from(INTERESTING_TEXT), st.text(max_size=40)),
    FD.TYPE_BYTES: st.one_of(st.sampled_from(list(BASE_UPLOADS.values())),
                             st.binary(max_size=512)),
}


def _field_values(field: descriptors.FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == FD.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == FD.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _bounded_ints(-2**31, 2**31 - 1))
    return SCALARS[field.type]


@st.composite
def messages(draw, descriptor: descriptors.Descriptor, depth: int = 0):
    """A message of this type with a random subset of its fields set (a oneof keeps the
    member set last)."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.type == FD.TYPE_MESSAGE and depth >= MAX_DEPTH:
            continue
        if not draw(st.booleans()):
            continue
        if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            # A map (google.protobuf.Struct's fields, inside the spec's Value fields): its
            # container takes items by key, not add().
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            entries = draw(st.lists(st.tuples(SCALARS[key_field.type],
                                              _field_values(value_field, depth)), max_size=2))
            container = getattr(message, field.name)
            for key, value in entries:
                if value_field.type == FD.TYPE_MESSAGE:
                    container[key].CopyFrom(value)
                else:
                    container[key] = value
            continue
        values = _field_values(field, depth)
        if field.is_repeated:
            items = draw(st.lists(values, max_size=4 if depth < 2 else 2))
            if field.type == FD.TYPE_MESSAGE:
                for item in items:
                    getattr(message, field.name).add().CopyFrom(item)
            else:
                getattr(message, field.name).extend(items)
        elif field.type == FD.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(values))
        else:
            setattr(message, field.name, draw(values))
    return message


# --- mutations ------------------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """`data` with one to three byte-level mutations."""
    for _ in range(draw(st.integers(1, 3))):
        size = len(data)
        at = draw(st.integers(0, max(0, size - 1)))
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "repeat",
                                     "overwrite"]))
        if kind == "truncate":
            data = data[:at]
        elif kind == "flip" and size:
            data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
        elif kind == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 16)):]
        elif kind == "repeat":
            data = data[:at] + data[at:at + 64] * draw(st.integers(2, 8)) + data[at:]
        elif size:
            value = draw(st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff",
                                          b"\x80" * 10, b"\x01"]))
            data = data[:at] + value + data[at + len(value):]
    return data


def _scalar_fields(message, path: str = "") -> list[tuple[object, descriptors.FieldDescriptor,
                                                        str]]:
    """Every (message, field, path) of the message tree that a mutation may set: all fields
    of every message present, set or not."""
    found = []
    for field in message.DESCRIPTOR.fields:
        found.append((message, field, f"{path}{field.name}"))
        if field.type != FD.TYPE_MESSAGE:
            continue
        if field.is_repeated:
            for index, item in enumerate(getattr(message, field.name)):
                found += _scalar_fields(item, f"{path}{field.name}[{index}].")
        elif message.HasField(field.name):
            found += _scalar_fields(getattr(message, field.name), f"{path}{field.name}.")
    return found


@st.composite
def mutated_specs(draw, specs: list[job_pb2.JobSpec]) -> tuple[str, job_pb2.JobSpec]:
    """A valid spec with one to three fields set to fuzzed values (or cleared)."""
    spec = job_pb2.JobSpec()
    spec.CopyFrom(draw(st.sampled_from(specs)))
    changed = []
    for _ in range(draw(st.integers(1, 3))):
        message, field, path = draw(st.sampled_from(_scalar_fields(spec)))
        values = _field_values(field, depth=2)
        if draw(st.integers(0, 5)) == 0:
            message.ClearField(field.name)
        elif field.is_repeated:
            container = getattr(message, field.name)
            for value in draw(st.lists(values, min_size=1, max_size=3)):
                if field.type == FD.TYPE_MESSAGE:
                    container.add().CopyFrom(value)
                else:
                    container.append(value)
        elif field.type == FD.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(values))
        else:
            setattr(message, field.name, draw(values))
        changed.append(path)
    return ",".join(changed), spec


def _nested(depth: int, width: int) -> job_pb2.JobSpec:
    """A spec whose model nests residual blocks `depth` deep."""
    spec = iris_spec()
    layer = job_pb2.Layer(linear=job_pb2.Layer.Linear(out_features=width))
    for _ in range(depth):
        outer = job_pb2.Layer()
        outer.residual.layers.add().CopyFrom(layer)
        layer = outer
    del spec.model.layers[:]
    spec.model.layers.add().CopyFrom(layer)
    spec.model.layers.add().linear.out_features = 3
    return spec


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# --- one request ----------------------------------------------------------------------------------


@dataclass
class Request:
    label: str  # what made it, for the report and for a failure's message
    method: descriptors.MethodDescriptor
    payload: list[bytes]  # serialized messages; exactly one unless the client streams


def _request_class(method):
    return message_factory.GetMessageClass(method.input_type)


def requests(seeded: Seeded) -> st.SearchStrategy[Request]:
    specs = _valid_specs("seed-npz-compressed")
    ids = st.one_of(st.sampled_from(seeded.job_ids), SCALARS[FD.TYPE_STRING])

    def generated(method) -> st.SearchStrategy[Request]:
        one = messages(method.input_type)
        if method.client_streaming:
            return st.lists(one, min_size=1, max_size=4).map(lambda items: Request(
                f"generated {method.input_type.name} stream", method,
                [item.SerializeToString() for item in items]))
        return one.map(lambda item: Request(f"generated {method.input_type.name}", method,
                                            [item.SerializeToString()]))

    submit = SERVICE.methods_by_name["SubmitJob"]
    upload = SERVICE.methods_by_name["UploadDataset"]

    @st.composite
    def spec_mutations(draw) -> Request:
        changed, spec = draw(mutated_specs(specs))
        request = pb.SubmitJobRequest(spec=spec, request_id=draw(st.sampled_from(
            ["", "retry-1", "retry-1", "x" * 129])))
        data = request.SerializeToString()
        if draw(st.integers(0, 3)) == 0:
            return Request(f"spec with {changed}, then its bytes mutated", submit,
                           [draw(mutated_bytes(data))])
        return Request(f"spec with {changed}", submit, [data])

    @st.composite
    def deep_specs(draw) -> Request:
        depth = draw(st.one_of(st.integers(1, 60), st.sampled_from([48, 49, 50, 99, 100, 150])))
        width = draw(st.sampled_from([1, 3, 8, 2**31, 2**32 - 1]))
        # By hand: protobuf will not copy a message past its parse depth into a request.
        spec = _nested(depth, width).SerializeToString()
        return Request(f"residual blocks {depth} deep, width {width}", submit,
                       [b"\x0a" + _varint(len(spec)) + spec])  # SubmitJobRequest.spec

    @st.composite
    def upload_mutations(draw) -> Request:
        kind = draw(st.sampled_from(sorted(BASE_UPLOADS)))
        data = draw(mutated_bytes(BASE_UPLOADS[kind]))
        header = _header(draw(st.sampled_from(["fuzz-a", "fuzz-b", "seed-npz", "fuzz-c"])),
                         data, kind)
        if draw(st.integers(0, 4)) == 0:  # a header that lies about the data
            setattr(header, *draw(st.sampled_from([
                ("size_bytes", len(data) + 1), ("size_bytes", 2**64 - 1), ("sha256", "0" * 64),
                ("format", "csv" if header.format == "npz" else "npz"), ("label_column", "a")])))
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        messages_ = [pb.UploadDatasetRequest(header=header)] + [
            pb.UploadDatasetRequest(chunk=chunk) for chunk in chunks]
        payload = [m.SerializeToString() for m in messages_]
        if draw(st.integers(0, 5)) == 0:  # the header message's own bytes mutated
            payload[0] = draw(mutated_bytes(payload[0]))
        return Request(f"{kind} upload, mutated", upload, payload)

    @st.composite
    def message_mutations(draw) -> Request:
        method = draw(st.sampled_from([m for m in SERVICE.methods if not m.client_streaming]))
        message = _request_class(method)()
        for name in ("job_id", "name"):
            if name in method.input_type.fields_by_name:
                setattr(message, name, draw(ids) if name == "job_id"
                        else draw(st.sampled_from(seeded.dataset_names)))
        data = draw(mutated_bytes(message.SerializeToString()))
        return Request(f"{method.input_type.name} bytes mutated", method, [data])

    @st.composite
    def with_real_ids(draw) -> Request:
        method = draw(st.sampled_from([m for m in SERVICE.methods
                                       if "job_id" in m.input_type.fields_by_name]))
        message = draw(messages(method.input_type))
        message.job_id = draw(st.sampled_from(seeded.job_ids))
        return Request(f"{method.input_type.name} of a real job", method,
                       [message.SerializeToString()])

    return st.one_of(
        *[generated(method) for method in SERVICE.methods],
        spec_mutations(), spec_mutations(), spec_mutations(), deep_specs(),
        upload_mutations(), upload_mutations(), message_mutations(), with_real_ids())


# --- sending one and judging the answer ----------------------------------------------------------


def _send(channel: grpc.Channel, request: Request) -> tuple[grpc.StatusCode, str, bytes]:
    """(status, details, first response bytes) of the call; a stream's first message counts
    as its answer."""
    path = f"/{SERVICE_NAME}/{request.method.name}"
    method = request.method
    try:
        if method.client_streaming:
            response = channel.stream_unary(path)(iter(request.payload), timeout=5)
        elif method.server_streaming:
            call = channel.unary_stream(path)(request.payload[0], timeout=5)
            response = next(call, b"")
            call.cancel()
        else:
            response = channel.unary_unary(path)(request.payload[0], timeout=5)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", b""
    return grpc.StatusCode.OK, "", response


class StoreWatch:
    """What a rejected request must not change: the store's rows and the data folder's files,
    apart from those of jobs that accepted requests queued (cancelled, they still write)."""

    def __init__(self, server):
        self.server, self.churning = server, set()

    def state(self) -> tuple:
        snapshot = self.server.service.store.snapshot()
        stable = {}
        for table, rows in snapshot.items():
            stable[table] = sorted(row for row in rows if not self._churns(row))
        files = [path for path in data_files(self.server.data_dir)
                 if not any(job_id in path for job_id in self.churning)]
        return stable, files

    def _churns(self, row: tuple) -> bool:
        return any(value in self.churning for value in row if isinstance(value, str))

    def settle(self, client: Client) -> None:
        """Cancel whatever accepted requests queued; their rows churn from now on."""
        store = self.server.service.store
        for job in store.jobs_in_states(["QUEUED", "RUNNING"]):
            self.churning.add(job.id)
            client.cancel(job.id)


def test_fuzzed_requests_never_get_internal_and_leave_the_server_healthy_and_the_store_intact(
        seeded):
    server, client = seeded.server, seeded.client
    watch = StoreWatch(server)
    health = health_pb2_grpc.HealthStub(client.channel)
    answers: collections.Counter = collections.Counter()
    slowest = [0.0, ""]

    @seed(int(SEED or 0))
    @settings(max_examples=EXAMPLES, derandomize=SEED is None, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(request=requests(seeded))
    def one_request(request: Request) -> None:
        before = watch.state()
        start = time.perf_counter()
        code, details, _ = _send(client.channel, request)
        seconds = time.perf_counter() - start
        answers[code.name] += 1
        if seconds > slowest[0]:
            slowest[:] = [seconds, request.label]
        assert code not in FAILURES, f"{request.label}: {code.name}: {details}"
        if seconds >= ANSWER_SECONDS and code != grpc.StatusCode.OK:
            # Once more: a slow path is slow again, a stall of this shared machine is not.
            # (Only a refused request: sending it again changes nothing.)
            start = time.perf_counter()
            _send(client.channel, request)
            seconds = time.perf_counter() - start
        assert seconds < ANSWER_SECONDS, f"{request.label}: answered in {seconds:.2f} s"
        if code == grpc.StatusCode.OK:
            watch.settle(client)
        else:
            assert watch.state() == before, f"{request.label}: {code.name} changed the store"
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING, request.label

    one_request()
    wait_for(lambda: not server.service.store.jobs_in_states(["QUEUED", "RUNNING"]), 120,
             what="the cancelled jobs to end")
    print(f"\n{sum(answers.values())} fuzzed requests (seed {SEED or 'fixed'}): "
          f"{dict(answers.most_common())}; slowest {slowest[0] * 1000:.0f} ms ({slowest[1]})")
    assert sum(answers.values()) >= EXAMPLES
