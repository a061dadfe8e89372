"""The `chainrule` command's contract: bad input (a spec, an output path) is exit 2 naming what
is wrong, found in seconds and before Ray starts, so nothing is trained; anything else that goes
wrong is a bug and surfaces as one, with its traceback."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services import cli, server
from worker.spec_error import SpecError

ROOT = Path(__file__).resolve().parents[2]
SPEC = """
name: iris-cli
model: {layers: [{linear: {out_features: 8}}, {relu: {}}, {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {adam: {lr: 0.05}}
data: {dataset: "sklearn:iris", batch_size: 32, epochs: 1, validation_fraction: 0.2}
"""
# The command as a user runs it, then whether this process started Ray.
PROBE = """
import sys
from services.cli import main
code = main(sys.argv[1:])
ray = sys.modules.get("ray")
print("ray started:", bool(ray and ray.is_initialized()))
sys.exit(code)
"""
# What proves nothing ran is "ray started: False"; the command's CPU time is a loose bound (2-3 s
# of Python and the imports). CPU time, not the wall clock: at a load of 20 the same command
# waits many times longer for a core, having done no more.
DEADLINE_CPU_SECONDS = 15.0


def run_train(tmp_path: Path, spec: str, *options: str) -> tuple[subprocess.CompletedProcess,
                                                                   float]:
    """The command's result and the CPU seconds it (the child process) took."""
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(spec)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", PROBE, "train", str(spec_path), *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def assert_refused_early(done: subprocess.CompletedProcess, seconds: float, *fragments: str):
    assert done.returncode == 2, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "ray started: False" in done.stdout, done.stdout
    assert seconds < DEADLINE_CPU_SECONDS, f"refused after {seconds:.1f} s of CPU"


@pytest.mark.parametrize("change, field", [
    (("lr: 0.05", "lr: -1"), "optimizer.adam.lr"),
    (("batch_size: 32", "batch_size: 500"), "data.batch_size"),
    (("epochs: 1", "epochs: 0"), "data.epochs"),
    (("out_features: 3", "out_features: 4"), "model.layers[2]"),
    (("sklearn:iris", "sklearn:mnist"), "data.dataset"),
    (("epochs: 1,", "epochs: 1, micro_batches: 64,"), "data.micro_batches"),
], ids=["negative lr", "batch over the split", "zero epochs", "output width", "unknown data",
        "micro-batches over the batch"])
def test_train_refuses_a_bad_spec_naming_the_field_within_seconds_and_before_ray(
        tmp_path, change, field):
    done, seconds = run_train(tmp_path, SPEC.replace(*change))
    assert_refused_early(done, seconds, field)


def test_train_reads_a_local_parquet_files_columns_and_refuses_a_missing_one_before_ray(
        tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"a": [0.5] * 40, "b": [1.5] * 40, "label": [0, 1] * 20}), path)
    spec = SPEC.replace("sklearn:iris", f"parquet:{path}\", label_column: \"species")
    done, seconds = run_train(tmp_path, spec)
    assert_refused_early(done, seconds, "data.label_column", "no column 'species'",
                         "a, b, label")


def test_train_checks_what_the_service_checks_including_its_default_limits(tmp_path):
    done, seconds = run_train(tmp_path, SPEC + "early_stopping: {patience: 0}\n")
    assert_refused_early(done, seconds, "early_stopping.patience")
    done, seconds = run_train(tmp_path, SPEC, "--workers", "9")
    assert_refused_early(done, seconds, "resources.workers", "at most 8")


@pytest.mark.parametrize("output, says", [
    ("weights.out", ".safetensors or .npz"),
    ("missing-folder/weights.safetensors", "does not exist"),
    ("a-folder.npz", "is a folder"),
])
def test_train_refuses_an_output_path_it_could_not_write_before_training(tmp_path, output,
                                                                          says):
    (tmp_path / "a-folder.npz").mkdir()
    target = tmp_path / output
    done, seconds = run_train(tmp_path, SPEC, "-o", str(target))
    assert_refused_early(done, seconds, "-o/--output", says)
    assert not Path(f"{target}.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_train_refuses_an_output_folder_it_may_not_write_to(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    done, seconds = run_train(tmp_path, SPEC, "-o", str(locked / "w.safetensors"))
    assert_refused_early(done, seconds, "-o/--output", "not writable")


@pytest.mark.parametrize("error", [ValueError("a bug"), OSError("a bug"), KeyError("a bug")],
                         ids=["ValueError", "OSError", "KeyError"])
def test_an_internal_error_propagates_with_its_traceback_not_as_a_spec_error(
        tmp_path, monkeypatch, capsys, error):
    def broken_run(*args, **kwargs):
        raise error

    monkeypatch.setattr("scheduler.training.run_job", broken_run)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(SPEC)
    with pytest.raises(type(error), match="a bug"):
        cli.main(["train", str(spec_path)])
    assert "chainrule:" not in capsys.readouterr().err


def test_a_spec_error_found_while_running_is_still_exit_2_naming_the_field(
        tmp_path, monkeypatch, capsys):
    def refusing_run(*args, **kwargs):
        raise SpecError("data.dataset", "the features contain NaN or infinite values")

    monkeypatch.setattr("scheduler.training.run_job", refusing_run)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(SPEC)
    assert cli.main(["train", str(spec_path)]) == 2
    assert "chainrule: data.dataset: the features contain NaN" in capsys.readouterr().err


# --- help, version, completion, the server's address, data sets, times ---------------------------


def test_help_shows_each_options_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--data-dir DATA_DIR the job store, uploads, models (default: data)" in out
    assert "(default: 2)" in out  # --keep-checkpoints
    assert "--max-upload-bytes MAX_UPLOAD_BYTES largest upload accepted, in bytes as sent " \
           "(default: 268435456)" in out
    assert "--max-concurrent-jobs MAX_CONCURRENT_JOBS at most this many jobs train at once " \
           "(default 0: as many as the cluster's CPUs hold; each job takes the CPUs its spec " \
           "asks for)" in out


def test_version_comes_from_the_package_metadata(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"chainrule {version('chainrule')}"


def _complete(script: str, *words: str) -> list[str]:
    """What bash offers after `chainrule WORDS...` (the last word being typed)."""
    line = " ".join(words)
    done = subprocess.run(
        ["bash", "-c", f"{script}\nCOMP_WORDS=(chainrule {line}); COMP_CWORD={len(words)}; "
                       f"_chainrule; printf '%s\\n' \"${{COMPREPLY[@]}}\""],
        capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.split()


def test_bash_completion_offers_the_commands_and_each_commands_options(capsys):
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o filenames -F _chainrule chainrule" in script
    assert _complete(script, "da") == ["datasets"]
    assert _complete(script, "serve", "--keep") == ["--keep-checkpoints"]
    assert _complete(script, "datasets", "d") == ["delete"]
    assert "--token" not in _complete(script, "submit", "--to")  # refused, so not offered


def test_the_cli_reads_CHAINRULE_SERVER_and_a_refusal_says_how_to_start_a_server(
        capsys, monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("CHAINRULE_SERVER", address)
    assert cli.main(["jobs", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert f"no chainrule server answered at {address}" in err
    assert "chainrule serve" in err and "--server" in err


def test_job_times_say_when_submitted_and_how_long_it_queued_or_ran():
    from chainrule.v1 import training_service_pb2 as pb

    job = pb.Job(id="job-1", state=pb.JOB_STATE_QUEUED)
    job.created_at.FromSeconds(1_790_000_000)
    assert cli._times(job, now=1_790_000_042) == "2026-09-21 14:13Z  queued 42s"
    job.started_at.FromSeconds(1_790_000_010)
    job.state, job.running_seconds = pb.JOB_STATE_RUNNING, 3_660
    assert cli._times(job) == "2026-09-21 14:13Z  running 1h01m"
    # Queued again (a resume, a restart): what it ran so far, not the time since it first started.
    job.state, job.running_seconds = pb.JOB_STATE_QUEUED, 65
    assert cli._times(job, now=1_790_009_999) == "2026-09-21 14:13Z  ran 1m05s"
    job.state = pb.JOB_STATE_SUCCEEDED
    job.finished_at.FromSeconds(1_790_009_000)
    assert "ran 1m05s" in cli._job_line(job)


@pytest.mark.parametrize("command", ["serve", "train"])
def test_joining_a_ray_cluster_without_its_token_is_one_line_naming_where_it_goes(
        tmp_path, command):
    (tmp_path / "spec.yaml").write_text(SPEC)
    arguments = {"serve": ["serve", "--address", "127.0.0.1:0", "--metrics-port", "0", "--no-web",
                           "--data-dir", str(tmp_path / "data")],
                 "train": ["train", str(tmp_path / "spec.yaml")]}[command]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    done = subprocess.run([sys.executable, "-m", "services.cli", *arguments,
                           "--ray-address", "127.0.0.1:1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    # One line of error (not Ray's wall of auth warnings), and no progress bar of a job that
    # never started. (serve may log its start-up sweep of what killed processes left.)
    lines = [line for line in done.stderr.strip().splitlines()
             if "left by processes that are gone" not in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("chainrule: no Ray auth token found")
    assert "RAY_AUTH_MODE=token" in lines[0] and f"{tmp_path}/.ray/auth_token" in lines[0]


def test_serve_refuses_a_ray_client_address_before_starting_anything(tmp_path, capsys,
                                                                     monkeypatch):
    # Its jobs' runners run on its node (they write the data folder): a ray:// driver is on
    # no node of the cluster.
    monkeypatch.setattr(server, "configure_process", lambda: None)  # process-wide settings
    data_dir = tmp_path / "data"
    assert cli.main(["serve", "--address", "127.0.0.1:0", "--no-web", "--data-dir",
                     str(data_dir), "--ray-address", "ray://127.0.0.1:10001"]) == 2
    error = capsys.readouterr().err
    assert "--ray-address 'ray://127.0.0.1:10001' is a Ray Client address" in error
    assert "must run on a node of the cluster" in error
    assert not data_dir.exists()


def test_predict_refuses_a_file_without_rows_before_sending_it(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("a,b,c,d\n")
    assert cli.main(["predict", "job-000000000000", str(empty), "--server", "127.0.0.1:1"]) == 2
    assert "has no rows" in capsys.readouterr().err
    assert cli.main(["predict", "job-000000000000", str(tmp_path / "rows.parquet")]) == 2
    assert "rows come from a .csv or .npz file" in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly():
    # `chainrule jobs --json | head`: the pipe closes before the output is written.
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "completion", "bash"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err
