"""The Python client of the training service.

    from chainrule import Client

    with Client() as client:  # $CHAINRULE_SERVER, else 127.0.0.1:50051
        job = client.submit("digits.yaml", request_id="digits-1")
        for event in client.watch(job.id):
            ...
        client.download(job.id, "digits.safetensors")

Every call has a deadline (`timeout` seconds, per call), so a dead or silent server is an
error, never a hang. `watch` is a long stream: instead of one deadline it fails when nothing
arrives for `idle_timeout` seconds (the server repeats the job's state every 15 s of silence),
or when the whole watch exceeds `timeout` if given. Errors are typed by status
(`chainrule.NotFound`, `chainrule.InvalidArgument` with `.field`, `chainrule.Unavailable`, ...,
see chainrule/errors.py), each a `grpc.RpcError` with the server's code and message
(`data.batch_size: must be ...`).

Ray's JobSubmissionClient and this client, verb by verb:

    submit_job(entrypoint=...)    submit(spec)           a path, YAML text, a dict or a JobSpec
    get_job_status(id)            status(id)             "RUNNING"; get(id) for the whole Job
    get_job_info(id)              get(id)
    get_job_logs(id)              logs(id)               LogEntry messages
    tail_job_logs(id)             logs(id, follow=True)  or watch(id) for progress events
    stop_job(id)                  cancel(id)
    list_jobs()                   jobs() / list()        every job / one page
    delete_job(id)                delete(id)             with its checkpoints, model and
                                                         TensorBoard files
    (polling get_job_status)      wait(id, timeout)      the final Job
"""

from __future__ import annotations

import builtins
import hashlib
import io
import ipaddress
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import grpc

from chainrule.errors import DeadlineExceeded, typed_error
from chainrule.spec_file import job_spec_from_dict, load_job_spec
from chainrule.v1 import job_pb2
from chainrule.v1 import training_service_pb2 as pb
from chainrule.v1 import training_service_pb2_grpc as pb_grpc

# Bytes per streamed message, both ways (uploads, downloads): well under gRPC's 4 MiB default.
CHUNK_BYTES = 1024 * 1024
MESSAGE_BYTES = 8 * 1024 * 1024
TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED,
                             pb.JOB_STATE_CANCELLED})


DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVER_VARIABLE = "CHAINRULE_SERVER"


def default_address() -> str:
    """$CHAINRULE_SERVER when set, else the address `chainrule serve` binds by default."""
    return os.environ.get(SERVER_VARIABLE) or DEFAULT_ADDRESS


class WatchTimeout(DeadlineExceeded):
    """No event within the idle timeout: the server or the connection is silent."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def state_name(state: int) -> str:
    """"SUCCEEDED" for JOB_STATE_SUCCEEDED."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")


# The names a caller may use for job states ("QUEUED", "RUNNING", ...), from the schema's enum.
STATE_NAMES: tuple[str, ...] = tuple(
    state_name(value) for value in pb.JobState.values() if value != pb.JOB_STATE_UNSPECIFIED)


def state_value(name: str) -> pb.JobState:
    """JOB_STATE_RUNNING for "RUNNING" or "running"; a ValueError naming the valid states."""
    if name.upper() not in STATE_NAMES:
        raise ValueError(f"{name!r} is not a job state; one of {', '.join(STATE_NAMES)}")
    # protobuf's stubs type Value() as int; the generated .pyi types enum values as JobState.
    return cast(pb.JobState, pb.JobState.Value("JOB_STATE_" + name.upper()))


# A downloaded model's suffix and the format the service writes for it: the weights, or the
# whole network as ONNX.
WEIGHTS_SUFFIXES = {".safetensors": "safetensors", ".npz": "npz", ".onnx": "onnx"}


def weights_format(path: str | Path) -> str:
    """"safetensors", "npz" or "onnx" from a file name; a ValueError for any other suffix (a
    `.pt` file would hold safetensors bytes that torch.load cannot read)."""
    suffix = Path(path).suffix.lower()
    if suffix not in WEIGHTS_SUFFIXES:
        raise ValueError(f"{path}: weights are written as {', '.join(WEIGHTS_SUFFIXES)}; "
                         f"name the file with one of those suffixes (PyTorch reads .safetensors "
                         f"with safetensors.torch.load_file; .onnx is the whole network)")
    return WEIGHTS_SUFFIXES[suffix]


def is_local_address(address: str) -> bool:
    """Whether a gRPC target never leaves this machine: a loopback host (127.0.0.0/8, ::1,
    localhost) or a unix socket. Anything else may cross a network."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = address
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    if target.startswith("["):  # [v6]:port
        host = target[1:target.find("]")]
    elif target.count(":") == 1:  # host:port
        host = target.split(":")[0]
    else:  # a host without a port, or a bare IPv6 address
        host = target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


class Client:
    def __init__(self, address: str | None = None, token: str | None = None, *,
                 timeout: float = 30.0, root_certificates: bytes | None = None,
                 certificate_chain: bytes | None = None, private_key: bytes | None = None,
                 tls: bool = False):
        """Connect to `address` (host:port, or unix:PATH; None: $CHAINRULE_SERVER, else
        127.0.0.1:50051).

        TLS: `root_certificates` (PEM) are the CAs that may sign the server's certificate
        (None: the system's); `certificate_chain` and `private_key` (PEM) are this client's
        certificate for a server that requires one (`chainrule serve --client-ca`). Any of
        them, or `tls=True`, switches to TLS. `token` is sent as a bearer token, and never
        in clear text across a network: without TLS, only to a loopback address or a unix
        socket (a ValueError otherwise, before anything is sent)."""
        address = address or default_address()
        self.address, self.timeout = address, timeout
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("a client certificate needs both certificate_chain and "
                             "private_key")
        tls = tls or any(item is not None
                         for item in (root_certificates, certificate_chain, private_key))
        if token and not tls and not is_local_address(address):
            raise ValueError(f"refusing to send a bearer token in clear text to {address}: "
                             f"connect with TLS (root_certificates=..., the CLI's --ca-cert) "
                             f"or to a loopback address or unix socket")
        options = [("grpc.max_receive_message_length", MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MESSAGE_BYTES),
                   ("grpc.keepalive_time_ms", 30_000)]
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key,
                                                       certificate_chain)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.TrainingServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise typed_error(error, self.address) from None

    def _stream(self, messages: Iterable) -> Iterator:
        """A server stream's messages, its errors typed as `_call`'s."""
        try:
            yield from messages
        except grpc.RpcError as error:
            raise typed_error(error, self.address) from None

    # --- jobs --------------------------------------------------------------------------------

    def submit(self, spec: job_pb2.JobSpec | dict | str | Path, request_id: str | None = None,
               watch: bool = False) -> pb.Job:
        """Submit a spec (a JobSpec, a dict as a spec file holds it, a .yaml/.json path or
        YAML text). With `watch`, block until the job ends and return its final state."""
        if isinstance(spec, dict):
            spec = job_spec_from_dict(spec)
        elif not isinstance(spec, job_pb2.JobSpec):
            spec = load_job_spec(spec)
        job = self._call(self.stub.SubmitJob,
                         pb.SubmitJobRequest(spec=spec, request_id=request_id or ""))
        if watch:
            for _ in self.watch(job.id):
                pass
            job = self.get(job.id)
        return job

    def get(self, job_id: str) -> pb.Job:
        return self._call(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def status(self, job_id: str) -> str:
        """The job's state by name: "QUEUED", "RUNNING", "SUCCEEDED", ..."""
        return state_name(self.get(job_id).state)

    def wait(self, job_id: str, timeout: float | None = None) -> pb.Job:
        """Block until the job ends and return it; a `DeadlineExceeded` after `timeout`
        seconds (None: no limit)."""
        try:
            for _ in self.watch(job_id, timeout=timeout):
                pass
        except DeadlineExceeded as error:
            raise DeadlineExceeded(error.code(), f"{job_id} did not end within {timeout:g} s"
                                   if timeout is not None else error.details()) from None
        return self.get(job_id)

    def list(self, states: Iterable[pb.JobState | str] = (), page_size: int = 0,
             page_token: str = "") -> pb.ListJobsResponse:
        """One page of jobs, newest first; states as JobState values or names ("RUNNING")."""
        values = [state_value(s) if isinstance(s, str) else s for s in states]
        return self._call(self.stub.ListJobs, pb.ListJobsRequest(
            states=values, page_size=page_size, page_token=page_token))

    def jobs(self, states: Iterable[pb.JobState | str] = ()) -> Iterator[pb.Job]:
        """Every job, following the page tokens."""
        states, token = list(states), ""
        while True:
            page = self.list(states, page_token=token)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))

    def drain_node(self, node: str, undrain: bool = False) -> pb.DrainNodeResponse:
        """Admin only: drain a Ray node (its id, or its address): nothing new is placed there
        and the jobs with actors on it checkpoint and queue again; `undrain` gives it back."""
        return self._call(self.stub.DrainNode, pb.DrainNodeRequest(node=node, undrain=undrain))

    def resume(self, job_id: str, epochs: int | None = None) -> pb.Job:
        """Run an ended job again: a CANCELLED or FAILED one from its checkpoint, a SUCCEEDED
        one for `epochs` more epochs (required then; optional otherwise, to train longer)."""
        return self._call(self.stub.ResumeJob,
                          pb.ResumeJobRequest(job_id=job_id, epochs=epochs or 0))

    def delete(self, job_id: str) -> None:
        """Delete an ended job with its checkpoints and model (cancel a running one first)."""
        self._call(self.stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id))

    def watch(self, job_id: str, *, min_progress_interval: float = 0.0,
              idle_timeout: float = 60.0,
              timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """The job's events until it ends: its current state first, then every change.

        `idle_timeout` bounds the silence between events (the server sends one at least
        every 15 s), `timeout` (None: no limit) the whole watch."""
        call = self.stub.WatchJob(
            pb.WatchJobRequest(job_id=job_id,
                               min_progress_interval_ms=int(min_progress_interval * 1000)),
            timeout=timeout, metadata=self.metadata)
        # grpc's stream iterator has no per-message timeout: read it in a thread, wait here.
        events: queue.Queue = queue.Queue()

        def read() -> None:
            try:
                for event in call:
                    events.put(event)
                events.put(None)
            except grpc.RpcError as error:
                events.put(error)

        threading.Thread(target=read, name=f"watch-{job_id}", daemon=True).start()
        try:
            while True:
                try:
                    item = events.get(timeout=idle_timeout)
                except queue.Empty:
                    raise WatchTimeout(f"no event from {self.address} for {idle_timeout:g} s "
                                       f"while watching {job_id}") from None
                if item is None:
                    return
                if isinstance(item, grpc.RpcError):
                    if item.code() == grpc.StatusCode.CANCELLED:
                        return
                    raise typed_error(item, self.address)
                yield item
        finally:
            call.cancel()

    # --- data sets -----------------------------------------------------------------------------

    def upload(self, path: str | Path, name: str, label_column: str | None = None,
               format: str | None = None) -> pb.DatasetInfo:
        """Upload a file: a data set ("npz", "csv", "parquet"), a UTF-8 text for language
        models ("text") or model weights for a spec's model.init_from ("safetensors"). The
        format comes from the suffix unless given (.txt: text). The file is read twice, a chunk
        at a time (its SHA-256 goes in the header, before the bytes): never whole in memory."""
        path = Path(path)
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
                digest.update(chunk)
        suffix = path.suffix.lower().lstrip(".")
        format = format or {"txt": "text"}.get(suffix, suffix)
        header = pb.DatasetHeader(name=name, format=format, label_column=label_column or "",
                                  size_bytes=path.stat().st_size, sha256=digest.hexdigest())

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as handle:
                yield from iter(lambda: handle.read(CHUNK_BYTES), b"")

        return self.upload_stream(header, chunks())

    def upload_stream(self, header: pb.DatasetHeader,
                      chunks: Iterable[bytes]) -> pb.DatasetInfo:
        """The raw stream: a header, then chunks (for callers that produce bytes lazily)."""
        def requests() -> Iterator[pb.UploadDatasetRequest]:
            yield pb.UploadDatasetRequest(header=header)
            for chunk in chunks:
                yield pb.UploadDatasetRequest(chunk=chunk)

        return self._call(self.stub.UploadDataset, requests())

    def datasets(self) -> pb.ListDatasetsResponse:
        return self._call(self.stub.ListDatasets, pb.ListDatasetsRequest())

    def delete_dataset(self, name: str) -> None:
        self._call(self.stub.DeleteDataset, pb.DeleteDatasetRequest(name=name))

    # --- models --------------------------------------------------------------------------------

    def download(self, job_id: str, path: str | Path, format: str | None = None) -> pb.ModelHeader:
        """Write the job's weights to `path` (format from its suffix, see `weights_format`:
        .safetensors, .npz, or .onnx for the network as an ONNX model) and the manifest beside
        it as `<path>.json`; returns the header. The bytes stream to a
        temporary file beside `path`, renamed into place once their size and SHA-256 match."""
        path = Path(path)
        format = format or weights_format(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        header, size, digest = None, 0, hashlib.sha256()
        try:
            with open(partial, "wb") as out:
                for message in self._stream(self._call(
                        self.stub.DownloadModel,
                        pb.DownloadModelRequest(job_id=job_id, format=format))):
                    if message.HasField("header"):
                        header = message.header
                    else:
                        out.write(message.chunk)
                        digest.update(message.chunk)
                        size += len(message.chunk)
            if header is None or size != header.size_bytes:
                raise OSError(f"download of {job_id} incomplete: {size} bytes")
            if digest.hexdigest() != header.sha256:
                raise OSError(f"download of {job_id}: SHA-256 mismatch")
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        Path(f"{path}.json").write_text(header.manifest_json)
        return header

    def download_tensorboard(self, job_id: str, directory: str | Path) -> builtins.list[Path]:
        """Write the job's TensorBoard event files into `directory/<job_id>/` (made when
        missing; files of an earlier download replaced) and return their paths:
        `tensorboard --logdir directory` then shows the job as one run. Each file streams to
        a temporary name, renamed into place once whole. A member that is not a plain file
        named `<job_id>/<name>` is refused (OSError), so no archive writes outside
        `directory/<job_id>/`."""
        import tarfile

        folder = Path(directory) / job_id
        folder.mkdir(parents=True, exist_ok=True)
        responses = self._stream(self._call(
            self.stub.DownloadTensorBoard, pb.DownloadTensorBoardRequest(job_id=job_id)))
        written = []
        with tarfile.open(fileobj=_ChunkReader(r.chunk for r in responses), mode="r|") as tar:
            for member in tar:
                parent, _, name = member.name.partition("/")
                if (not member.isfile() or parent != job_id or not name or "/" in name
                        or name.startswith(".")):
                    raise OSError(f"download of {job_id}: unexpected archive member "
                                  f"{member.name!r}")
                source = tar.extractfile(member)
                assert source is not None  # a regular file's
                path = folder / name
                partial = folder / f".{name}.partial"
                try:
                    with open(partial, "wb") as out:
                        while block := source.read(CHUNK_BYTES):
                            out.write(block)
                    partial.replace(path)
                finally:
                    partial.unlink(missing_ok=True)
                written.append(path)
        return written

    # --- using a model -------------------------------------------------------------------------

    def predict(self, job_id: str, x) -> Predictions:
        """The job's model on rows `x` (array-like, samples first), standardised on the server
        as its training rows were; sent PREDICT_ROWS_PER_REQUEST rows per request."""
        import numpy as np

        x = np.asarray(x, dtype=np.float64)
        if x.ndim < 2:
            raise ValueError(f"x must have a sample axis and feature axes, got shape {x.shape}")
        rows = max(1, min(PREDICT_ROWS_PER_REQUEST, PREDICT_VALUES_PER_REQUEST
                          // max(1, x[0].size)))
        responses = [self._call(self.stub.Predict, pb.PredictRequest(
            job_id=job_id, rows=pb.Rows(values=x[start:start + rows].reshape(-1).tolist(),
                                        shape=x[start:start + rows].shape)))
            for start in range(0, len(x), rows)]
        return Predictions.from_responses(responses)

    def predict_file(self, job_id: str, path: str | Path,
                     label_column: str = "") -> Predictions:
        """The job's model on the rows of a .csv (a header row, then numbers; `label_column`
        left out) or an .npz (its array x), parsed by the server as uploads are. Sent as files
        of at most PREDICT_ROWS_PER_REQUEST rows and PREDICT_FILE_BYTES bytes each: a CSV
        cut between its lines (each part with the header), an .npz's x cut by rows."""
        path = Path(path)
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in ("csv", "npz"):
            raise ValueError(f"{str(path)!r}: rows come from a .csv or .npz file")
        parts = _csv_parts(path) if fmt == "csv" else _npz_parts(path)
        responses = [self._call(self.stub.Predict, pb.PredictRequest(
            job_id=job_id, file=pb.RowsFile(format=fmt, data=data, label_column=label_column)))
            for data in parts]
        if not responses:
            raise ValueError(f"{str(path)!r} has no rows")
        return Predictions.from_responses(responses)

    def predict_dataset(self, job_id: str, dataset: str) -> Predictions:
        """The job's model on an upload's `x`."""
        return Predictions.from_responses([self._call(
            self.stub.Predict, pb.PredictRequest(job_id=job_id, dataset=dataset))])

    def evaluate(self, job_id: str, dataset: str,
                 timeout: float | None = None) -> pb.EvaluateJobResponse:
        """Loss (and for classifiers accuracy and the confusion matrix) of the job's model on
        an uploaded labelled data set."""
        return self._call(self.stub.EvaluateJob,
                          pb.EvaluateJobRequest(job_id=job_id, dataset=dataset), timeout)

    def generate(self, job_id: str, prompt: str, *, max_tokens: int = 0,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                 timeout: float | None = None) -> Iterator[bytes]:
        """A language model's continuation of `prompt`, as bytes while they are sampled (a
        UTF-8 character may span two of them)."""
        for message in self._stream(self.stub.Generate(
                pb.GenerateRequest(job_id=job_id, prompt=prompt, max_tokens=max_tokens,
                                   temperature=temperature, top_k=top_k, seed=seed),
                timeout=timeout or self.timeout * 10, metadata=self.metadata)):
            yield message.data

    def logs(self, job_id: str, follow: bool = False,
             timeout: float | None = None) -> Iterator[pb.LogEntry]:
        """The job's log entries; with `follow`, then new ones until the job ends (`timeout`
        None: no limit when following)."""
        yield from self._stream(self.stub.GetJobLogs(
            pb.GetJobLogsRequest(job_id=job_id, follow=follow),
            timeout=timeout if timeout is not None or follow else self.timeout,
            metadata=self.metadata))


class _ChunkReader(io.RawIOBase):
    """A stream of byte chunks as a readable file (for tarfile's streaming mode)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")  # the unread rest of the current chunk, not copied

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            next_chunk = next(self._chunks, None)
            if next_chunk is None:
                return 0
            self._pending = memoryview(next_chunk)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


PREDICT_ROWS_PER_REQUEST = 4096  # the server's bound per Predict request
PREDICT_VALUES_PER_REQUEST = 1 << 19
PREDICT_FILE_BYTES = 6 * 1024 * 1024  # a file part, well under gRPC's 8 MiB message


def _csv_parts(path: Path) -> Iterator[bytes]:
    """The CSV as parts of at most PREDICT_ROWS_PER_REQUEST rows and PREDICT_FILE_BYTES
    bytes, each starting with the header line (a line longer than that is sent alone, for
    the server to refuse by its own line cap)."""
    with open(path, "rb") as handle:
        header = handle.readline()
        part, rows = [header], 0
        size = len(header)
        for line in handle:
            if not line.strip():
                continue
            if rows and (rows == PREDICT_ROWS_PER_REQUEST
                         or size + len(line) > PREDICT_FILE_BYTES):
                yield b"".join(part)
                part, rows, size = [header], 0, len(header)
            part.append(line if line.endswith(b"\n") else line + b"\n")
            rows, size = rows + 1, size + len(line) + 1
        if rows or not header.strip():
            yield b"".join(part)  # an empty file goes too: the server says what is wrong


def _npz_parts(path: Path) -> Iterator[bytes]:
    """The .npz's x as .npz parts of at most PREDICT_ROWS_PER_REQUEST rows and
    PREDICT_VALUES_PER_REQUEST values (an x too small to need cutting goes as it is)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        if "x" not in archive.files:
            raise ValueError(f"{str(path)!r}: an .npz needs an array named x, it has "
                             f"{archive.files}")
        x = archive["x"]
    per_row = max(1, int(np.prod(x.shape[1:])))
    rows = max(1, min(PREDICT_ROWS_PER_REQUEST, PREDICT_VALUES_PER_REQUEST // per_row))
    for start in range(0, max(len(x), 1), rows):
        buffer = io.BytesIO()
        np.savez(buffer, x=x[start:start + rows])
        yield buffer.getvalue()


class Predictions:
    """A Predict answer as arrays: `classes` (n,) and `probabilities` (n, k) for classifiers
    (`classes` None for multi-label), `values` (n, ...) for regression."""

    def __init__(self, task: str, classes, probabilities, values):
        self.task, self.classes, self.probabilities, self.values = (task, classes,
                                                                    probabilities, values)

    @classmethod
    def from_responses(cls, responses: list[pb.PredictResponse]) -> Predictions:
        import numpy as np

        first = responses[0]
        classes = probabilities = values = None
        if first.task == "classification":
            probabilities = np.concatenate([np.asarray(r.probabilities).reshape(
                r.samples, r.num_classes) for r in responses])
            if len(first.classes):
                classes = np.concatenate([np.asarray(r.classes, dtype=np.int64)
                                          for r in responses])
        else:
            values = np.concatenate([np.asarray(r.values).reshape(r.samples, *r.value_shape)
                                     for r in responses])
        return cls(first.task, classes, probabilities, values)
