"""A job's lifecycle, declared once: the schema's JobState enum under the short names that the
store, the queue, the metrics and the command line use ("RUNNING" for JOB_STATE_RUNNING)."""

from __future__ import annotations

from typing import cast

from chainrule.v1 import training_service_pb2 as pb

_PREFIX = "JOB_STATE_"

JOB_STATES: tuple[str, ...] = tuple(
    name.removeprefix(_PREFIX) for name, value in pb.JobState.items()
    if value != pb.JOB_STATE_UNSPECIFIED)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

# The schema and these names cannot drift apart: a state added to the proto must be named here.
assert set(JOB_STATES) == {QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED}, JOB_STATES


def state_to_proto(state: str) -> pb.JobState:
    # protobuf's stubs type Value() as int; the generated .pyi types enum values as JobState.
    return cast(pb.JobState, pb.JobState.Value(_PREFIX + state))


def state_from_proto(value: int) -> str:
    return pb.JobState.Name(value).removeprefix(_PREFIX)
