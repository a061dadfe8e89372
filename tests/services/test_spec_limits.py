"""What one spec may cost is bounded by the server's Limits, and judged cheapest first: its
layer count and byte size before anything walks its layers, then the steps, activation memory
and wall time of the job it describes. Every refusal is INVALID_ARGUMENT naming the field and
the numbers, over a real gRPC channel, and stores nothing."""

from __future__ import annotations

import time

import grpc
import pytest

from chainrule.client import Client, state_name
from chainrule.spec_file import job_spec_from_dict
from chainrule.v1 import job_pb2
from chainrule.v1 import training_service_pb2 as pb
from services.server import serve
from services.validation import Limits
from tests.services.helpers import iris_spec, rpc_error, wait_until_done

pytestmark = [pytest.mark.distributed]

LIMITS = Limits(max_layers=1000, max_spec_bytes=64 * 1024, max_total_steps=50_000,
                max_activation_bytes=1024 * 1024, max_wall_seconds=2.0)
SUBMIT_METHOD = "/chainrule.v1.TrainingService/SubmitJob"
# The audit's specs took 5.3 s (1.9 million layers) and 2 s (a GRU of 4 million stacked
# layers) of an RPC thread to judge; parsing the 7 MiB request alone takes ~0.2 s. Counted in
# CPU seconds of this process (the server runs in it): what judging costs, which a loaded
# machine does not stretch as it stretches the wall clock.
REFUSAL_CPU_SECONDS = 1.0


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), limits=LIMITS)
    yield running
    running.stop()


def _refused(client: Client, spec: job_pb2.JobSpec) -> tuple[grpc.RpcError, float]:
    """The submit's error and the CPU seconds it took; nothing may have been stored."""
    before = [job.id for job in client.jobs()]
    start = time.process_time()
    error = rpc_error(lambda: client.submit(spec))
    seconds = time.process_time() - start
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert [job.id for job in client.jobs()] == before
    return error, seconds


def _model(*layers: dict) -> job_pb2.ModelSpec:
    return job_spec_from_dict({"model": {"layers": list(layers)}}).model


def test_a_spec_of_millions_of_layers_is_refused_by_its_layer_count_in_milliseconds(
        server, client):
    spec = iris_spec()
    one_layer = _model({"relu": {}}).SerializeToString()
    spec.model.Clear()
    spec.model.MergeFromString(one_layer * 1_900_000)  # 7 MiB, under gRPC's message limit
    # Serialized here, beforehand: the clock then times the server (parse and judge), not
    # this client's 0.8 s of serializing 1.9 million messages.
    request = pb.SubmitJobRequest(spec=spec).SerializeToString()
    submit = client.channel.unary_unary(SUBMIT_METHOD, request_serializer=None,
                                        response_deserializer=pb.Job.FromString)
    before = list(client.jobs())
    start = time.process_time()
    error = rpc_error(lambda: submit(request, timeout=30))
    seconds = time.process_time() - start
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("model.layers: has more than 1,000 layers")
    assert seconds < REFUSAL_CPU_SECONDS, f"took {seconds:.2f} s of CPU"
    assert list(client.jobs()) == before


def test_stacked_recurrent_layers_count_towards_the_layer_limit(client):
    spec = iris_spec(model={"layers": [{"gru": {"hidden_size": 1, "num_layers": 4_000_000}},
                                       {"last_step": {}}, {"linear": {"out_features": 3}}]})
    error, seconds = _refused(client, spec)
    assert error.details().startswith("model.layers: has more than 1,000 layers")
    assert seconds < REFUSAL_CPU_SECONDS, f"took {seconds:.2f} s of CPU"


def test_layers_nested_in_residual_blocks_count_towards_the_layer_limit(client):
    block = {"residual": {"layers": [{"linear": {"out_features": 4}}] * 600}}
    spec = iris_spec(model={"layers": [block, block, {"linear": {"out_features": 3}}]})
    error, _ = _refused(client, spec)
    assert error.details().startswith("model.layers: has more than 1,000 layers")


def test_a_spec_over_the_byte_limit_is_refused_naming_its_size(client):
    spec = iris_spec()
    spec.data.dataset = "x" * (80 * 1024)
    error, _ = _refused(client, spec)
    assert error.details().startswith("spec: is ")
    assert "more than this server's limit of 65,536" in error.details()


def test_a_job_of_more_optimizer_steps_than_the_limit_is_refused_naming_epochs(client):
    spec = iris_spec(epochs=10_000)
    spec.data.batch_size = 8  # 120 training samples: 15 steps per epoch, 150,000 steps
    error, _ = _refused(client, spec)
    assert error.details() == ("data.epochs: 10,000 epochs of 15 steps are 150,000 optimizer "
                               "steps, more than this server's limit of 50,000")


def test_a_micro_batch_whose_activations_exceed_the_limit_is_refused_naming_the_numbers(client):
    # 64 samples / 4 micro-batches = 16 samples x (4 + 40,000 + 40,000 + 3 values) x 4 bytes
    spec = iris_spec(model={"layers": [{"linear": {"out_features": 40_000}}, {"relu": {}},
                                       {"linear": {"out_features": 3}}]})
    spec.data.batch_size = 64
    error, _ = _refused(client, spec)
    details = error.details()
    assert details.startswith("data.batch_size: a micro-batch of 16 samples (batch_size 64 / 4 "
                              "micro_batches) keeps about 4.9 MiB of activations"), details
    assert "80,007 values per sample" in details and "limit of 1.0 MiB" in details
    spec.data.micro_batches = 64  # one sample per micro-batch: 0.3 MiB, accepted
    client.cancel(client.submit(spec).id)


def test_a_run_longer_than_the_wall_time_limit_is_stopped_failed_and_can_be_resumed(client):
    spec = iris_spec(epochs=2000)
    spec.data.batch_size = 8  # 30,000 steps: minutes of training, stopped after 2 s
    job = client.submit(spec)
    ended = wait_until_done(client, job.id, timeout=120)
    assert state_name(ended.state) == "FAILED"
    assert "longer than this server's limit of 2 s" in ended.error
    # Stopped at the first step boundary past 2 s (Ray's actors take a few to start).
    assert ended.finished_at.ToSeconds() - ended.started_at.ToSeconds() < 30
    assert client.resume(job.id).id == job.id  # from its checkpoint


@pytest.mark.parametrize("name", ["a/b", "evil/../../../x", "x" * 129, "tab\there", "../x",
                                  "-leading-dash", "back\\slash", "nul\x00byte"])
def test_a_job_name_that_is_not_a_plain_short_label_is_refused_naming_name(client, name):
    error, _ = _refused(client, iris_spec(name=name))
    assert error.details().startswith("name: must be at most 128 characters")


@pytest.mark.parametrize("name", ["", "digits-mlp", "Run 3 (lr 0.1)", "a.b_c:d+e@f", "x" * 128])
def test_plain_job_names_are_accepted(client, name):
    job = client.submit(iris_spec(name=name))
    assert client.get(job.id).name == name
    client.cancel(job.id)
