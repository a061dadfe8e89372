"""The `chainrule` command: train a spec locally; serve, submit and watch jobs over gRPC."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from services.submit_rate import DEFAULT_SUBMIT_RATE, SubmitRate
from services.upload_limits import DEFAULT_MAX_UPLOAD_BYTES, UploadLimits
from worker.spec_error import SpecError


class UsageError(Exception):
    """A command-line argument the command cannot use (a file, a path): exit 2 with the
    message, as argparse's own errors do."""


def _train(args: argparse.Namespace) -> int:
    from chainrule.spec_file import load_job_spec
    from scheduler.datasets import builtin_shape, is_builtin
    from scheduler.parquet_dataset import is_parquet, parquet_shape
    from scheduler.storage import local_weights_shape
    from services.validation import Limits, check_spec

    # Everything a default service would check, then the output path, before Ray starts.
    spec = load_job_spec(args.spec)
    name = spec.data.dataset
    shape = (parquet_shape(spec.data, spec.seed) if is_parquet(name) else
             builtin_shape(name) if is_builtin(name) else None)
    job = check_spec(spec, shape, Limits(),
                     workers=args.workers, parameter_servers=args.parameter_servers,
                     weights=local_weights_shape(spec))
    from scheduler.training import check_output_path, run_job  # imports Ray, starts nothing
    from services.progress import TrainingProgress

    if args.output is not None:
        try:
            check_output_path(args.output)
        except ValueError as error:
            raise UsageError(f"-o/--output: {error}") from None
    from scheduler import ray_cluster

    # Joined (or started) before the bar is drawn: a cluster that refuses us is one line.
    ray_cluster.connect(args.ray_address)
    progress = TrainingProgress(spec.name or "training", total_steps=0)
    with progress:
        result = run_job(
            job, spec, ray_address=args.ray_address, output=args.output,
            on_step=lambda r: progress.step(r.step, r.total_steps, r.epoch, r.loss,
                                            r.samples_per_second),
            on_evaluation=lambda e: progress.evaluation(e.loss, e.accuracy),
            on_recovery=lambda r: progress.note(f"recovered: {r.message}"),
        )
        progress.finish(result.steps)
    final = result.final_evaluation
    if final is not None:
        summary = f"validation loss {final.loss:.4f}"
        if final.accuracy is not None:
            summary += f", validation accuracy {final.accuracy:.4f}"
        print(f"{spec.name or 'job'}: {result.steps} steps, {summary}")
    if args.output:
        print(f"weights written to {args.output}")
    return 0


# --- the service ---------------------------------------------------------------------------------

DEFAULT_SERVER = "127.0.0.1:50051"  # where `serve` binds; client commands: $CHAINRULE_SERVER first
DEFAULT_WEB_ADDRESS = "127.0.0.1:9465"  # the web UI of `serve`, next to /metrics on 9464


def _serve(args: argparse.Namespace) -> int:
    import logging
    import os
    import signal
    import threading

    from services.metrics import ParameterSeries
    from services.ray_recovery import RAY_LOST_EXIT_STATUS, Action, restart_in_place
    from services.server import configure_process, serve
    from services.single_instance import AlreadyInUse
    from services.streams import StreamLimits
    from services.validation import Limits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configure_process()
    try:
        server = serve(args.address, args.data_dir, ray_address=args.ray_address,
                       metrics_port=args.metrics_port,
                       max_concurrent_jobs=args.max_concurrent_jobs,
                       tokens_file=args.tokens, tenancy=args.config,
                       tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_client_ca=args.client_ca,
                       keep_checkpoints=args.keep_checkpoints,
                       checkpoint_retention_seconds=args.checkpoint_retention_days * 86400,
                       socket_mode=args.socket_mode,
                       limits=Limits(max_priority=args.max_priority),
                       max_upload_bytes=args.max_upload_bytes,
                       upload_limits=_upload_limits(args),
                       stream_limits=StreamLimits(args.streams_per_tenant, args.streams),
                       submit_rate=_submit_rate(args),
                       parameter_series=ParameterSeries(args.metrics_parameter_series_by,
                                                        args.metrics_parameter_series),
                       mlflow_tracking_uri=args.mlflow_tracking_uri,
                       mlflow_artifact_location=args.mlflow_artifact_location,
                       web_address=None if args.no_web else args.web_address)
    except AlreadyInUse as error:  # another server has the folder or the port: say whose
        print(f"chainrule: {error}", file=sys.stderr, flush=True)
        return 1
    except ValueError as error:  # a setting it cannot serve with (an address, a limit, a file)
        raise UsageError(str(error)) from None
    # After serve(): ray.init installs its own SIGTERM handler, which would kill us uncleanly.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"chainrule: serving gRPC on {server.address} (data in {server.data_dir})", flush=True)
    print(f"chainrule: metrics at {server.metrics_url or 'off'}", flush=True)
    print(f"chainrule: web UI at {server.web_url or 'off'}", flush=True)
    while not stop.wait(0.25):
        if server.failed.is_set():  # its Ray lost (logged); its running jobs requeued
            # Not stop() nor a normal exit: both would wait on calls to the Ray that is gone.
            if server.failure_action is Action.RESTART:
                # A new process image with a new Ray; resumes the jobs.
                restart_in_place(server.stop_ray_head)
            server.stop_ray_head()  # what is left of it: nothing runs on a Ray that is lost
            logging.shutdown()
            os._exit(RAY_LOST_EXIT_STATUS)
    print("chainrule: stopping; running jobs are checkpointed and requeued", flush=True)
    server.stop()
    print("chainrule: stopped", flush=True)
    return 0


TOKEN_VARIABLE = "CHAINRULE_TOKEN"


def _client(args: argparse.Namespace):
    """The client for a client command: TLS from --ca-cert, --client-cert and --client-key;
    the bearer token from --token-file or $CHAINRULE_TOKEN, never from the command line,
    where every user of the machine can read it (ps, /proc/PID/cmdline, shell history)."""
    import os

    from chainrule.client import Client

    if args.token is not None:
        raise UsageError(f"--token: a token on the command line is visible to every user of "
                         f"this machine (ps); put it in ${TOKEN_VARIABLE} or in a file for "
                         f"--token-file")
    token = (_read_token(args.token_file) if args.token_file
             else os.environ.get(TOKEN_VARIABLE) or None)
    try:
        return Client(args.server, token=token, timeout=args.timeout,
                      root_certificates=_read_pem(args.ca_cert, "--ca-cert"),
                      certificate_chain=_read_pem(args.client_cert, "--client-cert"),
                      private_key=_read_pem(args.client_key, "--client-key"))
    except ValueError as error:  # a token in clear text across a network, half a cert pair
        raise UsageError(str(error)) from None


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--token-file: cannot read {path}: {error}") from None
    if not token or len(token.split()) != 1:
        raise UsageError(f"--token-file: {path} must hold one token (and nothing else)")
    return token


def _read_pem(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{option}: cannot read {path}: {error}") from None


def _print(args: argparse.Namespace, message, text: str) -> None:
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(message, preserving_proto_field_name=True))
    else:
        print(text)


def _duration(seconds: float) -> str:
    """"42s", "3m05s", "2h01m"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _times(job, now: float | None = None) -> str:
    """When the job was submitted (UTC), how long it has queued (before its first run) or
    how long it has run: the time RUNNING over all its runs, without the waits between them."""
    import datetime
    import time

    from chainrule.client import state_name

    now = time.time() if now is None else now
    created = job.created_at.ToNanoseconds() / 1e9
    text = f"{datetime.datetime.fromtimestamp(created, datetime.timezone.utc):%Y-%m-%d %H:%M}Z"
    if not job.HasField("started_at"):
        return f"{text}  queued {_duration(now - created)}"
    verb = "running" if state_name(job.state) == "RUNNING" else "ran"
    return f"{text}  {verb} {_duration(job.running_seconds)}"


def _job_line(job) -> str:
    from chainrule.client import state_name

    line = f"{job.id}  {state_name(job.state):<9}  {job.name or '-'}"
    if job.HasField("created_at"):
        line += f"  {_times(job)}"
    if job.progress.total_steps:
        line += f"  step {job.progress.step}/{job.progress.total_steps}"
    if job.HasField("final_validation"):
        line += f"  val loss {job.final_validation.loss:.4f}"
        if job.final_validation.HasField("accuracy"):
            line += f" acc {job.final_validation.accuracy:.4f}"
    if job.queue_position:
        line += f"  queued #{job.queue_position}: {job.wait_reason}"
    if job.error:
        line += f"  error: {job.error}"
    return line


def _submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.submit(args.spec, request_id=args.request_id)
        _print(args, job, f"submitted {job.id}")
        if args.watch:
            return _follow(args, client, job.id)
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from chainrule.v1 import training_service_pb2 as pb

    with _client(args) as client:
        jobs = list(client.jobs(args.state or []))
        _print(args, pb.ListJobsResponse(jobs=jobs),
               "\n".join(_job_line(job) for job in jobs) or "no jobs")
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get(args.job)
        _print(args, job, _job_line(job))
    return 0


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(args, client, args.job)


def _follow(args: argparse.Namespace, client, job_id: str) -> int:
    """Watch a job to its end (a live bar, or one JSON event per line); exit 0 on success."""
    from chainrule.client import state_name
    from services.progress import watch_with_progress

    if getattr(args, "json", False):
        from google.protobuf import json_format

        for event in client.watch(job_id):
            print(json_format.MessageToJson(event, indent=None), flush=True)
    else:
        job = watch_with_progress(client, job_id, client.get(job_id).name or job_id)
    job = client.get(job_id)
    if not getattr(args, "json", False):
        print(_job_line(job))
    return 0 if state_name(job.state) == "SUCCEEDED" else 1


def _cancel(args: argparse.Namespace) -> int:
    import time

    from chainrule.client import TERMINAL_STATES

    with _client(args) as client:
        job = client.cancel(args.job)
        # A running job stops at its next step boundary, after the call answers: show its end,
        # not the RUNNING it was in when asked.
        deadline = time.monotonic() + args.timeout
        while job.state not in TERMINAL_STATES and time.monotonic() < deadline:
            time.sleep(0.1)
            job = client.get(args.job)
        _print(args, job, _job_line(job))
    return 0


def _resume(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.resume(args.job, epochs=args.epochs)
        _print(args, job, _job_line(job))
    return 0


def _drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.drain_node(args.node, undrain=args.undrain)
    nodes = ", ".join(result.node_ids)
    if args.undrain:
        text = f"undrained {nodes}: jobs may be placed there again"
    else:
        text = (f"drained {nodes}: nothing new is placed there; jobs stopping at their next "
                f"step boundary to queue again: {', '.join(result.job_ids) or 'none'}")
    _print(args, result, text)
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.job)
        if not args.json:
            print(f"deleted {args.job}")
    return 0


def _count(minimum: int):
    """An argparse type: an integer of at least `minimum` (argparse reports others, exit 2)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its "invalid ... value" message
    return parse


def _octal(text: str) -> int:
    """A file mode in octal ("600", "0660"); argparse reports anything else (exit 2)."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an octal file mode like 600, got {text}") \
            from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"must be a file mode from 000 to 777, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _upload_limits(args: argparse.Namespace) -> UploadLimits:
    """What one upload may cost the server, from serve's flags (the rest as UploadLimits has
    them)."""
    return UploadLimits(max_dataset_bytes=args.max_dataset_bytes,
                        max_expansion=args.max_upload_expansion,
                        max_csv_rows=args.max_csv_rows, max_csv_columns=args.max_csv_columns,
                        max_classes=args.max_classes, idle_seconds=args.upload_idle_seconds)


def _server_config(path: str):
    """The tenants of a configuration file; argparse reports a bad one, naming the key (exit
    2)."""
    from services.server_config import load_server_config

    try:
        return load_server_config(path)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _submit_rate(args: argparse.Namespace) -> SubmitRate:
    """serve's default submit rate per tenant (--submit-rate 0: no limit)."""
    return SubmitRate(args.submit_rate or math.inf, args.submit_burst)


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0: no limit), got {text}")
    return value


def _days(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, got {text}")
    return value


def _upload(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    name = args.name or Path(args.file).stem
    with _client(args) as client:
        info = client.upload(args.file, name, label_column=args.label_column,
                             format=args.format)
        if info.format == "text":
            summary = f"a text of {info.size_bytes} bytes"
        elif info.format == "safetensors":
            summary = f"weights, {info.size_bytes} bytes"
        elif info.format == "parquet":
            summary = (f"{info.samples} rows, {info.feature_shape[0]} numeric columns; a spec "
                       f"trains on it as data: {{dataset: \"parquet:upload:{info.name}\", "
                       f"label_column: ...}}")
        else:
            summary = (f"{info.samples} samples, features {tuple(info.feature_shape)}, "
                       f"{info.task}")
        _print(args, info, f"uploaded {info.name}: {summary}")
    return 0


def _size(size_bytes: int) -> str:
    """"812 bytes", "1.4 MiB"."""
    if size_bytes < 1024:
        return f"{size_bytes} bytes"
    size = float(size_bytes)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _dataset_line(d) -> str:
    """An upload: its name, format, and for arrays samples, shape, task and classes; the size
    on disk for every upload (texts and weights have no samples)."""
    line = f"{d.name}  {d.format}"
    if d.format == "parquet":  # a job picks its label and feature columns
        line += f"  {d.samples} rows  {d.feature_shape[0]} numeric columns"
    elif d.format not in ("text", "safetensors"):
        line += f"  {d.samples} samples  shape {tuple(d.feature_shape)}  {d.task}"
        if d.task == "classification":
            line += f" ({d.num_classes} classes)"
    return f"{line}  {_size(d.size_bytes)}"


def _datasets(args: argparse.Namespace) -> int:
    if args.action == "delete":
        if not args.name:
            raise UsageError("datasets delete: name the upload to delete")
        with _client(args) as client:
            client.delete_dataset(args.name)
        if not args.json:
            print(f"deleted data set {args.name}")
        return 0
    if args.name:
        raise UsageError(f"datasets: unexpected {args.name!r} (did you mean "
                         f"`chainrule datasets delete {args.name}`?)")
    with _client(args) as client:
        listing = client.datasets()
        lines = [_dataset_line(d) for d in listing.datasets]
        lines += [f"{name}  (built-in)" for name in listing.builtin]
        _print(args, listing, "\n".join(lines))
    return 0


def _download(args: argparse.Namespace) -> int:
    from chainrule.client import weights_format

    try:
        suffix_format = weights_format(args.output)
    except ValueError as error:
        raise UsageError(f"-o/--output: {error}") from None
    if args.format and args.format != suffix_format:
        raise UsageError(f"--format {args.format} does not match -o {args.output} (a "
                         f"{suffix_format} file); name it *.{args.format}")
    folder = Path(args.output).parent
    if not folder.is_dir():  # as `train -o`: a typo in the path is not a folder to make
        raise UsageError(f"-o/--output: the folder {str(folder)!r} does not exist")
    with _client(args) as client:
        header = client.download(args.job, args.output, args.format)
        _print(args, header, f"wrote {args.output} ({header.size_bytes} bytes) and "
                             f"{args.output}.json")
    return 0


def _predictions_csv(predictions) -> list[list[str]]:
    if predictions.task == "classification":
        k = predictions.probabilities.shape[1]
        header = ([] if predictions.classes is None else ["class"]) + [f"p{j}" for j in range(k)]
        rows = [([] if predictions.classes is None else [str(int(predictions.classes[i]))])
                + [repr(float(p)) for p in predictions.probabilities[i]]
                for i in range(len(predictions.probabilities))]
        return [header, *rows]
    values = predictions.values.reshape(len(predictions.values), -1)
    header = ["value"] if values.shape[1] == 1 else [f"value{j}" for j in range(values.shape[1])]
    return [header, *([repr(float(v)) for v in row] for row in values)]


def _predict(args: argparse.Namespace) -> int:
    import csv

    if Path(args.file).suffix.lower() not in (".csv", ".npz"):
        raise UsageError(f"{args.file}: rows come from a .csv or .npz file")
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    with _client(args) as client:  # the server parses the file as it parses uploads
        try:
            predictions = client.predict_file(args.job, args.file, args.label_column or "")
        except ValueError as error:  # the file, as the client reads it: no rows, no x
            raise UsageError(str(error)) from None
        table = _predictions_csv(predictions)
    if args.output:
        with open(args.output, "w", newline="") as handle:
            csv.writer(handle).writerows(table)
        print(f"wrote {args.output} ({len(table) - 1} rows)")
    else:
        csv.writer(sys.stdout).writerows(table)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.evaluate(args.job, args.dataset)
    lines = [f"samples  {result.samples}", f"loss     {result.loss:.6g}"]
    if result.HasField("accuracy"):
        lines.append(f"accuracy {result.accuracy:.4f}")
        k = result.num_classes
        lines.append("confusion matrix (rows: true class, columns: predicted)")
        lines += ["  " + " ".join(f"{n:>6}" for n in result.confusion_matrix[row * k:
                                                                         (row + 1) * k])
                  for row in range(k)]
    _print(args, result, "\n".join(lines))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from services.inference import utf8_text

    with _client(args) as client:
        for text in utf8_text(client.generate(args.job, args.prompt, max_tokens=args.max_tokens,
                                              temperature=args.temperature, top_k=args.top_k,
                                              seed=args.seed)):
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _logs(args: argparse.Namespace) -> int:
    import datetime

    with _client(args) as client:
        for entry in client.logs(args.job, follow=args.follow):
            when = datetime.datetime.fromtimestamp(entry.time.ToNanoseconds() / 1e9,
                                                   datetime.timezone.utc)
            print(f"{when:%Y-%m-%d %H:%M:%S}Z  {entry.kind:<18} {entry.message}", flush=True)
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    with _client(args) as client:
        files = client.download_tensorboard(args.job, args.output)
    if args.json:
        import json

        print(json.dumps({"job_id": args.job, "files": [str(path) for path in files]}))
    else:
        print(f"wrote {len(files)} event file(s) to {Path(args.output) / args.job}; view "
              f"them with: tensorboard --logdir {args.output}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo
    from services.server import configure_process

    configure_process()
    return run_demo(args.spec, metrics_port=args.metrics_port)


def _weights_path(text: str) -> str:
    """An -o argument whose suffix names a format we write; argparse reports it (exit 2)."""
    from chainrule.client import weights_format

    try:
        weights_format(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none (None, off) or the
    help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chainrule")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _completion(args: argparse.Namespace) -> int:
    print(bash_completion(build_parser()))
    return 0


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for `chainrule`: its commands, then each command's options
    (file names elsewhere). Load it with `source <(chainrule completion bash)`."""
    commands = next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction)).choices
    def options(command: argparse.ArgumentParser) -> str:
        return " ".join(sorted(option for action in command._actions
                               if action.help != argparse.SUPPRESS
                               for option in action.option_strings))

    cases = "\n".join(f"        {name}) options='{options(command)}' ;;"
                      for name, command in commands.items())
    return f"""# bash completion for chainrule (chainrule completion bash)
_chainrule() {{
    local current=${{COMP_WORDS[COMP_CWORD]}}
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W '{' '.join(commands)} --help --version' -- "$current"))
        return
    fi
    local options=''
    case ${{COMP_WORDS[1]}} in
{cases}
    esac
    if [[ $current == -* ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$current"))
    elif [[ ${{COMP_WORDS[1]}} == datasets && $COMP_CWORD -eq 2 ]]; then
        COMPREPLY=($(compgen -W 'delete' -- "$current"))
    else
        COMPREPLY=($(compgen -f -- "$current"))
    fi
}}
complete -o filenames -F _chainrule chainrule"""


def build_parser() -> argparse.ArgumentParser:
    from chainrule.client import default_address

    parser = argparse.ArgumentParser(prog="chainrule", description=__doc__,
                                     formatter_class=_HelpWithDefaults)
    parser.add_argument("--version", action="version", version=f"chainrule {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser = commands.add_parser

    def add_command(name: str, **options) -> argparse.ArgumentParser:
        return add_parser(name, formatter_class=_HelpWithDefaults, **options)

    commands.add_parser = add_command  # type: ignore[method-assign]

    train = commands.add_parser("train", help="train a job spec on Ray without the service")
    train.add_argument("spec", help="job spec file (.yaml, .yml or .json)")
    train.add_argument("--workers", type=int, help="worker count (overrides the spec)")
    train.add_argument("--parameter-servers", type=int, help="PS shard count (overrides)")
    train.add_argument("--ray-address", help="join this Ray cluster instead of embedded Ray")
    train.add_argument("-o", "--output", help="write weights here (.safetensors or .npz)")
    train.set_defaults(run=_train)

    serve = commands.add_parser("serve", help="run the gRPC training service")
    serve.add_argument("--address", default=DEFAULT_SERVER,
                       help="host:port to bind, or unix:PATH (a socket whose file mode, "
                            "--socket-mode, decides who may call)")
    serve.add_argument("--socket-mode", type=_octal, default=0o600,
                       help="a unix socket's mode (default 600: this user only; 660: and "
                            "the socket's group)")
    serve.add_argument("--data-dir", default="data", help="the job store, uploads, models")
    serve.add_argument("--ray-address",
                       help="join this Ray cluster (its GCS address, host:port) instead of "
                            "embedded Ray; serve must run on a node of it, where its jobs' "
                            "runners run and outlive it (a ray:// client address is refused)")
    serve.add_argument("--metrics-port", type=int, default=9464,
                       help="Prometheus /metrics port on loopback (0: any free port)")
    serve.add_argument("--web-address", default=DEFAULT_WEB_ADDRESS,
                       help="host:port of the read-only web UI (jobs, curves, logs; the same "
                            "tokens as the API; port 0: any free port); only loopback unless "
                            "--tokens and TLS are set")
    serve.add_argument("--no-web", action="store_true", help="serve no web UI")
    serve.add_argument("--max-concurrent-jobs", type=int, default=0,
                       help="at most this many jobs train at once (default 0: as many as the "
                            "cluster's CPUs hold; each job takes the CPUs its spec asks for)")
    serve.add_argument("--config", type=_server_config,
                       help="the server's YAML configuration file: its tenants, with their "
                            "tokens, weight, priority range and quotas (README: Security)")
    serve.add_argument("--tokens", help="file of 'TENANT TOKEN' lines: bearer-token tenancy "
                                        "(the older form of --config; give one of them)")
    serve.add_argument("--tls-cert", help="PEM certificate (with --tls-key: serve over TLS)")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--max-priority", type=int, default=0,
                       help="highest job priority a tenant may ask for, unless --config or "
                            "the token file gives it its own (max_priority)")
    serve.add_argument("--streams-per-tenant", type=_count(1), default=8,
                       help="streaming calls (watch, follow, upload, download) a tenant may "
                            "hold open at once, unless --config gives it its own (max_streams)")
    serve.add_argument("--streams", type=_count(1), default=32,
                       help="streaming calls open at once in all (below the 64 RPC threads)")
    rate = DEFAULT_SUBMIT_RATE
    serve.add_argument("--submit-rate", type=_rate, default=rate.per_second,
                       help="jobs a tenant may submit (or resume) a second, sustained, unless "
                            "--config gives it its own (submit_rate); 0: no limit")
    serve.add_argument("--submit-burst", type=_count(1), default=rate.burst,
                       help="jobs a tenant may submit at once after a quiet spell, unless "
                            "--config gives it its own (submit_burst)")
    serve.add_argument("--metrics-parameter-series", type=_count(1), default=32,
                       help="gradient-norm series per job: the largest of each step, the "
                            "rest as one")
    serve.add_argument("--metrics-parameter-series-by", choices=("parameter", "layer"),
                       default="parameter", help="one norm per parameter tensor, or per layer")
    serve.add_argument("--client-ca", help="PEM CA certificate(s): mutual TLS, a client "
                                           "without a certificate signed by one is refused")
    serve.add_argument("--keep-checkpoints", type=_count(1), default=2,
                       help="checkpoints kept per job: the newest, and older ones to fall back "
                            "on when it is corrupt")
    serve.add_argument("--checkpoint-retention-days", type=_days, default=3.0,
                       help="an ended job's checkpoints (for `resume`) are deleted this long "
                            "after it ends")
    uploads = UploadLimits()
    serve.add_argument("--max-upload-bytes", type=_count(1), default=DEFAULT_MAX_UPLOAD_BYTES,
                       help="largest upload accepted, in bytes as sent")
    serve.add_argument("--max-dataset-bytes", type=_count(1), default=uploads.max_dataset_bytes,
                       help="largest data set accepted, in bytes as a job loads it (8 a value)")
    serve.add_argument("--max-upload-expansion", type=_positive, default=uploads.max_expansion,
                       help="uncompressed bytes an .npz may declare per uploaded byte")
    serve.add_argument("--max-csv-rows", type=_count(1), default=uploads.max_csv_rows,
                       help="rows of an uploaded CSV")
    serve.add_argument("--max-csv-columns", type=_count(2), default=uploads.max_csv_columns,
                       help="columns of an uploaded CSV, its label column included")
    serve.add_argument("--max-classes", type=_count(2), default=uploads.max_classes,
                       help="class labels of an uploaded data set (labels 0 to N-1)")
    serve.add_argument("--upload-idle-seconds", type=_positive,
                       default=uploads.idle_seconds,
                       help="an upload whose client sends nothing this long is abandoned")
    serve.add_argument("--mlflow-tracking-uri",
                       help="also log each job as an MLflow run there (an http(s):// "
                            "tracking server, or sqlite:///PATH): the spec as params, metrics "
                            "per step, the model as artifacts; needs pip install "
                            "'chainrule[tracking]'")
    serve.add_argument("--mlflow-artifact-location",
                       help="where the experiments chainrule creates (one per tenant) keep "
                            "artifacts (default: the tracking server's choice; MLflow's "
                            "./mlruns for a sqlite: URI)")
    serve.set_defaults(run=_serve)

    def client_command(name: str, help: str, run) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help)
        command.add_argument("--server", default=default_address(),
                             help="the service's host:port; $CHAINRULE_SERVER sets the "
                                  "default")
        command.add_argument("--token-file", help="file holding the bearer token (without "
                                                  "it: the token itself in $CHAINRULE_TOKEN)")
        command.add_argument("--token", help=argparse.SUPPRESS)  # refused, with the reason
        command.add_argument("--ca-cert", help="PEM CA certificate(s) that sign the server's "
                                               "certificate: connect with TLS")
        command.add_argument("--client-cert", help="PEM client certificate (mutual TLS)")
        command.add_argument("--client-key", help="PEM private key of --client-cert")
        command.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
        command.add_argument("--json", action="store_true", help="machine-readable output")
        command.set_defaults(run=run)
        return command

    submit = client_command("submit", "submit a job spec to the service", _submit)
    submit.add_argument("spec", help="job spec file (.yaml, .yml or .json)")
    submit.add_argument("--watch", action="store_true", help="follow the job to its end")
    submit.add_argument("--request-id", help="idempotency key: a retry returns the same job")
    jobs = client_command("jobs", "list jobs, newest first", _jobs)
    from chainrule.client import STATE_NAMES

    jobs.add_argument("--state", action="append", type=str.upper, choices=STATE_NAMES,
                      help="only jobs in this state (repeatable)")
    client_command("status", "one job's state and progress", _status).add_argument("job")
    client_command("watch", "follow a job with a live progress bar", _watch).add_argument("job")
    client_command("cancel", "cancel a job: a queued one at once, a running one at its next step "
                             "boundary with a checkpoint (resume continues it); waits for its "
                             "end, at most --timeout seconds", _cancel).add_argument("job")
    resume = client_command("resume", "run an ended job again from its checkpoint", _resume)
    resume.add_argument("job")
    resume.add_argument("--epochs", type=_count(1),
                        help="train this many more epochs (required for a SUCCEEDED job)")
    drain = client_command("drain", "admin: drain a Ray node (its jobs checkpoint and queue "
                                    "again elsewhere; nothing new goes there)", _drain)
    drain.add_argument("node", help="the node's Ray id, or its address (every node there)")
    drain.add_argument("--undrain", action="store_true",
                       help="give the node back: jobs may be placed there again")
    client_command("delete", "delete an ended job, its checkpoints, model and TensorBoard "
                             "files",
                   _delete).add_argument("job")
    upload = client_command("upload", "upload a data set (.npz, .csv, .parquet), a text or "
                                      "weights", _upload)
    upload.add_argument("file")
    upload.add_argument("--name", help="the name specs refer to (default: the file's name "
                                       "without its suffix)")
    upload.add_argument("--format", choices=("npz", "csv", "parquet", "text", "safetensors"),
                        help="default: from the suffix (.txt: text)")
    upload.add_argument("--label-column", help="CSV: the target column")
    datasets = client_command("datasets", "list uploaded and built-in data sets; "
                                           "`datasets delete NAME` deletes an upload", _datasets)
    datasets.add_argument("action", nargs="?", choices=("delete",),
                          help="delete: delete the upload NAME")
    datasets.add_argument("name", nargs="?", help="the upload to delete")
    download = client_command("download", "download a finished job's weights, or its "
                                          "network as ONNX", _download)
    download.add_argument("job")
    download.add_argument("-o", "--output", required=True, type=_weights_path,
                          help="weights file (.safetensors or .npz), or .onnx: the network as "
                               "an ONNX model taking raw rows, as predict does")
    download.add_argument("--format", choices=("safetensors", "npz", "onnx"),
                          help="default: from -o's suffix, which must match it")
    predict = client_command("predict", "a finished job's predictions on rows of a .csv or "
                                        ".npz file", _predict)
    predict.add_argument("job")
    predict.add_argument("file", help=".csv (header row, then numbers) or .npz (array x)")
    predict.add_argument("-o", "--output", help="write the predictions as CSV here (default: "
                                                "stdout); classifiers get a class column")
    predict.add_argument("--label-column", help="CSV: a column to leave out of the features")
    evaluate = client_command("evaluate", "a finished job's loss, accuracy and confusion "
                                          "matrix on an uploaded data set", _evaluate)
    evaluate.add_argument("job")
    evaluate.add_argument("dataset", help="the upload's name")
    generate = client_command("generate", "a finished language model's text after a prompt",
                              _generate)
    generate.add_argument("job")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=128, help="bytes to write "
                                                                       "(default: 128)")
    generate.add_argument("--temperature", type=float, default=1.0, help="0: greedy "
                                                                           "(default: 1)")
    generate.add_argument("--top-k", type=int, default=0, help="draw among the k likeliest "
                                                               "bytes (default 0: all)")
    generate.add_argument("--seed", type=int, default=0, help="default: 0")
    logs = client_command("logs", "a job's log: states, evaluations, recoveries, warnings, "
                                  "a failure's traceback", _logs)
    logs.add_argument("job")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new entries until the job ends")

    tensorboard = client_command("tensorboard", "download a job's TensorBoard event files "
                                                "(loss, samples/s, learning rate, gradient "
                                                "norms, validation, recoveries)", _tensorboard)
    tensorboard.add_argument("job")
    tensorboard.add_argument("-o", "--output", required=True,
                             help="folder to write them in, under a subfolder named by the "
                                  "job (then: tensorboard --logdir FOLDER)")

    demo = commands.add_parser("demo", help="serve, train the digits MLP over gRPC, shut down")
    demo.add_argument("--spec", default=None, help="job spec (default: the digits MLP)")
    demo.add_argument("--metrics-port", type=int, default=0,
                      help="Prometheus port (0: any free one)")
    demo.set_defaults(run=_demo)
    completion = commands.add_parser("completion", help="print a shell completion script: "
                                                        "source <(chainrule completion bash)")
    completion.add_argument("shell", choices=("bash",))
    completion.set_defaults(run=_completion)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
            return args.run(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at exit after a traceback
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped (`chainrule jobs --json | head`): end quietly, as
        # Unix tools do. Python would hit the closed pipe again flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (SpecError, UsageError) as error:  # the input is at fault: name it, no traceback
        print(f"chainrule: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the server said no (exit 1), or a bug: its traceback
        import grpc

        if isinstance(error, grpc.RpcError):  # the server's status and message, no trace
            print(f"chainrule: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        # Joining a Ray cluster without its token: one line on where it goes (the module is
        # only loaded by the commands that start Ray, so this costs the others no import).
        ray_cluster = sys.modules.get("scheduler.ray_cluster")
        if ray_cluster is not None and isinstance(error, ray_cluster.RayTokenMissing):
            print(f"chainrule: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
