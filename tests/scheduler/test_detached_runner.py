"""What a detached runner keeps for the server while none follows it (scheduler/detached_runner.py):
every report until a server acknowledges it, only the newest checkpoint, and a bounded number of
steps however long no server runs; the namespace each data folder's runners live in. (Its life
across a killed server: tests/chaos/, and on a cluster tests/deploy/test_multinode.py.)"""

from __future__ import annotations

import pickle
import shutil
import stat

from scheduler.detached_runner import (
    NAMESPACE_FILE,
    STEP_RECORDS_KEPT,
    RunnerFailed,
    _crossing,
    _Outbox,
    namespace_of,
)
from scheduler.placement import NodeGone


def kinds(outbox: _Outbox) -> list[str]:
    return [kind for _, kind, _ in outbox.events]


def test_reports_stay_in_order_until_acknowledged():
    outbox = _Outbox()
    for kind, record in [("step", 1), ("evaluation", "e"), ("step", 2), ("recovery", "r")]:
        outbox.add(kind, record)
    outbox.acknowledge(2)  # a server handled the first two
    assert [(index, kind, record) for index, kind, record in outbox.events] == [
        (2, "step", 2), (3, "recovery", "r")]
    assert outbox.next_index == 4 and outbox.steps == 1


def test_a_new_checkpoint_supersedes_one_no_server_took_yet():
    outbox = _Outbox()
    outbox.add("checkpoint", "at step 6")
    outbox.add("step", 7)
    outbox.add("checkpoint", "at step 12")
    assert [record for _, kind, record in outbox.events if kind == "checkpoint"] == [
        "at step 12"]
    assert kinds(outbox) == ["step", "checkpoint"]


def test_with_no_server_only_the_newest_steps_are_kept_and_nothing_else_is_dropped():
    outbox = _Outbox()
    outbox.add("evaluation", "e")
    for step in range(1, STEP_RECORDS_KEPT + 51):
        outbox.add("step", step)
    steps = [record for _, kind, record in outbox.events if kind == "step"]
    assert len(steps) == STEP_RECORDS_KEPT == outbox.steps
    assert steps[0] == 51 and steps[-1] == STEP_RECORDS_KEPT + 50
    assert kinds(outbox)[0] == "evaluation"


def test_a_run_s_error_crosses_to_the_server_with_its_type_and_traceback():
    error = pickle.loads(pickle.dumps(RunnerFailed("JobFailed", "shard 0 lost 4 times", "tb")))
    assert (error.error_type, str(error), error.remote_traceback) == (
        "JobFailed", "shard 0 lost 4 times", "tb")


def test_a_run_s_exception_crosses_as_itself_so_the_queue_tells_node_gone_apart():
    crossed = pickle.loads(pickle.dumps(_crossing(NodeGone("node n1 left"), "tb")))
    assert isinstance(crossed, NodeGone) and str(crossed) == "node n1 left"
    assert crossed.remote_traceback == "tb"


def test_an_exception_that_does_not_pickle_crosses_as_a_runner_failed_naming_it():
    class Local(Exception):  # a local class: pickle cannot find it by name
        pass

    crossed = _crossing(Local("boom"), "tb")
    assert isinstance(crossed, RunnerFailed)
    assert (crossed.error_type, str(crossed), crossed.remote_traceback) == ("Local", "boom", "tb")


def test_each_data_folder_has_a_runner_namespace_of_its_own_kept_across_starts(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    namespace = namespace_of(first)
    assert namespace.startswith("chainrule-") and namespace_of(first) == namespace
    assert namespace_of(second) != namespace  # two servers' runners on one cluster never meet
    assert stat.S_IMODE((first / NAMESPACE_FILE).stat().st_mode) == 0o600
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)  # its random id too: the path tells them apart
    assert namespace_of(copy) != namespace
