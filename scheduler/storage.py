"""How a job's state and results are stored on disk, in one place: weights files (a trained
model and its JSON manifest), job checkpoints (their format, checksum, rotation, and setting a
corrupt one aside) and where each lives in the service's data folder:

    models/<job>.safetensors, models/<job>.safetensors.json     a SUCCEEDED job's model
    checkpoints/<job>/step-<N>.npz, step-<N>.npz.json           the newest checkpoints, each
                                                                 with its SHA-256
    checkpoints/<job>/step-<N>.npz.corrupt                      one that failed its check
    tensorboard/<job>/events.out.tfevents.*                      its TensorBoard event files,
                                                                 one per run of the job

Every file is written to a temporary name in its folder, fsynced, then renamed: a reader sees
the old file or the whole new one, never half a file. Arrays are read with allow_pickle=False
(or from safetensors), so no file can run code. Ray actors never read or write these files:
the service and `chainrule train` do, through this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from chainrule.v1 import job_pb2
from scheduler.checkpoint import Checkpoint, DataCursor
from worker.initial_weights import WeightsShape, weights_reference
from worker.spec_error import SpecError

# --- writing a file safely ---------------------------------------------------------------------


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], object], *,
                     private: bool = False) -> Path:
    """Write through `write(handle)` to a temporary file beside `path`, fsync, rename.
    `private`: a tenant's file in the service's data folder, readable by this user only
    (0600, in folders made 0700); otherwise the umask's usual mode (`chainrule train -o`)."""
    path = Path(path)
    if private:
        make_private_folders(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if not private:  # mkstemp makes 0600
            os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def make_private_folders(folder: Path) -> None:
    """`folder` and its missing parents, each made 0700 (mkdir -p would give the parents the
    umask's mode)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another thread
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- weights files -----------------------------------------------------------------------------

FORMATS = (".safetensors", ".npz")


def manifest_path(weights_path: str | Path) -> Path:
    return Path(f"{weights_path}.json")


def save_weights(path: str | Path, state_dict: Mapping[str, np.ndarray],
                 manifest: Mapping[str, Any] | None = None, *, private: bool = False) -> Path:
    """Write the state dict (format from the suffix) and, beside it, `<path>.json`
    (`private`: see write_atomically)."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"weights file must end in {' or '.join(FORMATS)}, got {path.name!r}")
    arrays = {key: _contiguous(value) for key, value in state_dict.items()}
    write_atomically(path, lambda handle: _serialize(path.suffix, arrays, handle),
                     private=private)
    if manifest is not None:
        text = json.dumps(dict(manifest), indent=2, sort_keys=True, default=str).encode()
        write_atomically(manifest_path(path), lambda handle: handle.write(text),
                         private=private)
    return path


def weights_bytes(state_dict: Mapping[str, np.ndarray], suffix: str = ".safetensors") -> bytes:
    """The file's content in memory (for streaming a download)."""
    buffer = io.BytesIO()
    _serialize(suffix, {k: _contiguous(v) for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def _contiguous(value: np.ndarray) -> np.ndarray:
    """C order for the file, keeping the shape: np.ascontiguousarray makes a 0-d array 1-d,
    which wrote BatchNorm's num_batches_tracked as (1,) where PyTorch has ()."""
    return np.require(value, requirements="C")


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    raise ValueError(f"weights file must end in {' or '.join(FORMATS)}, got {path.name!r}")


# The safetensors dtypes NumPy holds (no bfloat16 or float8): what a weights file may contain.
SAFETENSORS_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32",
                      "F64")


@dataclass(frozen=True)
class TensorHeader:
    key: str
    dtype: str  # safetensors' name: "F32", "I64", ...
    shape: tuple[int, ...]


def safetensors_header(path: str | Path) -> list[TensorHeader]:
    """The tensors a safetensors file declares, in its order, read by safetensors' own header
    parser (which also checks that the offsets cover the file exactly); no value is read.
    ValueError when the file is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return [TensorHeader(key, handle.get_slice(key).get_dtype(),
                                 tuple(handle.get_slice(key).get_shape()))
                    for key in handle.keys()]
    except SafetensorError as error:
        raise ValueError(f"not a readable safetensors file: {error}") from error


def read_tensors(path: str | Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The named tensors of a safetensors file, and only those (a file's other keys are never
    loaded). ValueError when the file is not readable or lacks a key."""
    return dict(iter_tensors(path, keys))


def iter_tensors(path: str | Path, keys: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, values) of the named tensors, one in memory at a time, from one opening."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            present = set(handle.keys())
            for key in keys:
                if key not in present:
                    raise ValueError(f"{Path(path).name} has no tensor {key!r}")
                yield key, handle.get_tensor(key)
    except SafetensorError as error:
        raise ValueError(f"not a readable safetensors file: {error}") from error


def local_weights_shape(spec: job_pb2.JobSpec) -> WeightsShape | None:
    """The header of the local safetensors file a spec's `model.init_from: "file:PATH"`
    names (None without init_from), for training without the service. SpecError for an
    upload (only a service has those) or a file that is missing or not safetensors."""
    if not spec.model.init_from:
        return None
    kind, path = weights_reference(spec.model.init_from)
    if kind != "file":
        raise SpecError("model.init_from", f"{spec.model.init_from!r} names an upload, which "
                                           f"only the service has; without it, name a local "
                                           f"file: file:PATH")
    if not Path(path).is_file():
        raise SpecError("model.init_from", f"no file {path!r}")
    try:
        tensors = safetensors_header(path)
    except ValueError as error:
        raise SpecError("model.init_from", f"{path}: {error}") from error
    for tensor in tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise SpecError("model.init_from", f"{path}: tensor {tensor.key!r} has dtype "
                                               f"{tensor.dtype}; accepted: "
                                               f"{', '.join(SAFETENSORS_DTYPES)}")
    return WeightsShape(str(Path(path).resolve()),
                        tuple((tensor.key, tensor.shape) for tensor in tensors), path)


def _serialize(suffix: str, arrays: dict[str, np.ndarray], handle: IO[bytes]) -> None:
    if suffix == ".safetensors":
        from safetensors.numpy import save

        handle.write(save(arrays))
    else:
        # mypy matches **arrays against savez's allow_pickle: bool; no array has that name.
        np.savez(handle, **arrays)  # type: ignore[arg-type]


# --- one checkpoint file -----------------------------------------------------------------------
#
# An .npz of the flat parameters, the optimizer state ("optimizer/<key>"), the buffers
# ("buffer/<name>") and a JSON header (step counts, the data cursor); beside it `<file>.json`
# with the file's size and SHA-256. The .npz's own zip CRCs would catch some damage, but not a
# truncation that removes whole members or a flipped bit in an uncompressed array (np.savez
# stores without compression), so every byte is checked against the sidecar before it is
# parsed.

CHECKPOINT_FORMAT = "chainrule-checkpoint/1"


class CheckpointCorrupt(Exception):
    """The file does not match its checksum, has none, or cannot be parsed."""


def checksum_path(checkpoint_path: str | Path) -> Path:
    return Path(f"{checkpoint_path}.json")


def save_checkpoint(path: str | Path, checkpoint: Checkpoint, *, private: bool = False) -> Path:
    """The .npz, then its checksum file. A crash between the two leaves an .npz without a
    checksum, which `load_checkpoint` refuses like any other damage."""
    data = _encode_checkpoint(checkpoint)
    path = write_atomically(path, lambda handle: handle.write(data), private=private)
    sidecar = {"format": CHECKPOINT_FORMAT, "step": checkpoint.step, "size_bytes": len(data),
               "sha256": hashlib.sha256(data).hexdigest()}
    text = json.dumps(sidecar, sort_keys=True).encode()
    write_atomically(checksum_path(path), lambda handle: handle.write(text), private=private)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint, its bytes checked first; CheckpointCorrupt names what is wrong."""
    path = Path(path)
    try:
        sidecar = json.loads(checksum_path(path).read_text())
        expected_size, expected_sha256 = int(sidecar["size_bytes"]), str(sidecar["sha256"])
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path.name}: no checksum file") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointCorrupt(f"{path.name}: unreadable checksum file ({error})") from None
    data = path.read_bytes()
    if len(data) != expected_size:
        raise CheckpointCorrupt(f"{path.name}: {len(data)} bytes, its checksum file says "
                                f"{expected_size} (truncated?)")
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CheckpointCorrupt(f"{path.name}: SHA-256 mismatch")
    try:
        return _decode_checkpoint(data)
    except Exception as error:  # the checksum matched, so this is a writer's bug; still no use
        raise CheckpointCorrupt(f"{path.name}: {type(error).__name__}: {error}") from None


def _encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    arrays = {"parameters": checkpoint.parameters}
    arrays.update({f"optimizer/{k}": v for k, v in checkpoint.optimizer_state.items()})
    arrays.update({f"buffer/{k}": v for k, v in checkpoint.buffers.items()})
    arrays.update({f"compression/{k}": v for k, v in checkpoint.compression_state.items()})
    header: dict = {"step": checkpoint.step, "optimizer_steps": checkpoint.optimizer_steps}
    if checkpoint.data_cursor is not None:
        header["data_cursor"] = dataclasses.asdict(checkpoint.data_cursor)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # as in _serialize
    return buffer.getvalue()


def _decode_checkpoint(data: bytes) -> Checkpoint:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        header = json.loads(archive["header"].tobytes().decode())
        optimizer, buffers, compression = {}, {}, {}
        for key in archive.files:
            if key.startswith("optimizer/"):
                optimizer[key.removeprefix("optimizer/")] = archive[key]
            elif key.startswith("buffer/"):
                buffers[key.removeprefix("buffer/")] = archive[key]
            elif key.startswith("compression/"):
                compression[key.removeprefix("compression/")] = archive[key]
        cursor = header.get("data_cursor")  # absent from checkpoints of older versions
        return Checkpoint(int(header["step"]), archive["parameters"],
                          int(header["optimizer_steps"]), optimizer, buffers,
                          None if cursor is None else DataCursor(**cursor), compression)


# --- a data folder: each job's checkpoints and model ------------------------------------------

DEFAULT_KEEP_CHECKPOINTS = 2  # the newest, and one to fall back on when it is corrupt
CORRUPT_SUFFIX = ".corrupt"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.npz$")


@dataclass(frozen=True)
class SetAside:
    """A checkpoint that failed its check, renamed so that it is never tried again."""

    original: Path
    renamed: Path
    reason: str


@dataclass(frozen=True)
class LatestCheckpoint:
    """The newest intact checkpoint (None: there is none), and the corrupt ones passed over."""

    checkpoint: Checkpoint | None
    path: Path | None
    set_aside: tuple[SetAside, ...] = field(default_factory=tuple)


class JobStorage:
    """A service's job files (checkpoints, models, TensorBoard files) under its data folder:
    each tenant's, so readable by the server's user only (0600 files in 0700 folders)."""

    def __init__(self, data_dir: str | Path, keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS):
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep_checkpoints}")
        self.data_dir = Path(data_dir)
        self.keep_checkpoints = keep_checkpoints

    # --- models ------------------------------------------------------------------------------

    def model_path(self, job_id: str) -> Path:
        return self.data_dir / "models" / f"{_checked(job_id)}.safetensors"

    def delete_model(self, job_id: str) -> None:
        path = self.model_path(job_id)
        path.unlink(missing_ok=True)
        manifest_path(path).unlink(missing_ok=True)

    # --- TensorBoard event files (services/tracking/tensorboard.py writes them) --------------

    def tensorboard_folder(self, job_id: str) -> Path:
        return self.data_dir / "tensorboard" / _checked(job_id)

    def delete_tensorboard(self, job_id: str) -> None:
        shutil.rmtree(self.tensorboard_folder(job_id), ignore_errors=True)

    def jobs_with_tensorboard_files(self) -> list[str]:
        """Ids of the jobs that have a TensorBoard folder (for the sweep of deleted jobs')."""
        return _job_folders(self.data_dir / "tensorboard")

    # --- checkpoints -------------------------------------------------------------------------

    def checkpoint_folder(self, job_id: str) -> Path:
        return self.data_dir / "checkpoints" / _checked(job_id)

    def checkpoints(self, job_id: str) -> list[Path]:
        """The job's checkpoint files, newest (highest step) first; set-aside ones excluded."""
        folder = self.checkpoint_folder(job_id)
        if not folder.is_dir():
            return []
        steps = [(int(match.group(1)), path) for path in folder.iterdir()
                 if (match := _CHECKPOINT_NAME.match(path.name))]
        return [path for _, path in sorted(steps, reverse=True)]

    def save_checkpoint(self, job_id: str, checkpoint: Checkpoint) -> Path:
        """Write it, then delete all but the newest `keep_checkpoints`."""
        path = save_checkpoint(self.checkpoint_folder(job_id) / f"step-{checkpoint.step:010d}.npz",
                               checkpoint, private=True)
        for old in self.checkpoints(job_id)[self.keep_checkpoints:]:
            checksum_path(old).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self, job_id: str) -> LatestCheckpoint:
        """The newest checkpoint that passes its check. Each one that fails is renamed to
        `<name>.corrupt` (with its checksum file) and the next older one is tried."""
        set_aside: list[SetAside] = []
        for path in self.checkpoints(job_id):
            try:
                return LatestCheckpoint(load_checkpoint(path), path, tuple(set_aside))
            except CheckpointCorrupt as error:
                renamed = path.with_name(path.name + CORRUPT_SUFFIX)
                os.replace(path, renamed)
                sidecar = checksum_path(path)
                if sidecar.exists():
                    os.replace(sidecar, sidecar.with_name(sidecar.name + CORRUPT_SUFFIX))
                set_aside.append(SetAside(path, renamed, str(error)))
        return LatestCheckpoint(None, None, tuple(set_aside))

    def has_checkpoint(self, job_id: str) -> bool:
        return bool(self.checkpoints(job_id))

    def delete_checkpoints(self, job_id: str) -> None:
        """Every checkpoint of the job, set-aside ones too."""
        shutil.rmtree(self.checkpoint_folder(job_id), ignore_errors=True)

    def jobs_with_checkpoints(self) -> list[str]:
        """Ids of the jobs that have a checkpoint folder (for the retention sweep)."""
        return _job_folders(self.data_dir / "checkpoints")


def _job_folders(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(path.name for path in root.iterdir()
                  if path.is_dir() and not path.name.startswith("."))


def _checked(job_id: str) -> str:
    # Job ids are the service's own ("job-" and hex digits); never let one become a path.
    if not job_id or job_id.startswith(".") or "/" in job_id or "\\" in job_id:
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id
