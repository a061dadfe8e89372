"""Uploaded data sets and weights: receive a stream of chunks, check it, and keep it: arrays as
a validated .npz, a text, a Parquet file or a safetensors weights file as it was sent, once
checked.

The bytes go to a temporary file while their size and SHA-256 are counted; only a complete
stream with the announced size and hash is checked, only a file that forms a valid data set
(numbers only, matching sample counts, finite values, class labels in range) is moved into
place, and only then is the store's row written. Any failure removes the temporary files: a
bad upload leaves nothing.

What an upload may cost is bounded before it is paid (`UploadLimits`):
- an .npz is judged by what its headers declare (entry sizes, each array's dtype and shape)
  before any data is decompressed, then read in chunks; a file that passes is kept as it was
  sent, so nothing is ever whole in memory;
- a CSV is parsed as a stream, rows and columns capped, into temporary files that become an
  uncompressed .npz;
- a text must decode as UTF-8 (checked as a stream) and, cut into windows of int64 tokens and
  their targets, fit the memory a data set may take;
- a safetensors file is parsed by safetensors' own header parser (offsets cover the file
  exactly), every tensor's dtype must be one NumPy holds, its floats finite;
- a Parquet file is read a row group at a time, its declared sizes bounded first
  (services/parquet_upload.py), and kept as sent: workers read its row groups from it;
- what the store needs later (shapes, task, class count, a text's length, a weights file's
  tensor names and shapes) is computed on the way and kept in its row, so submitting a job
  never reads the file again. The exception is Parquet: a job picks its label and feature
  columns, so submitting reads the file's footer (and, for a label column whose row groups
  carry no statistics, that column a row group at a time: scheduler/parquet_dataset.py).

No pickle, ever: object arrays are refused from their header, and stored files are read with
`allow_pickle=False`.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

import numpy as np

from scheduler.datasets import CLASSIFICATION, NEXT_TOKEN, REGRESSION, Dataset, from_arrays
from scheduler.storage import SAFETENSORS_DTYPES, iter_tensors, safetensors_header
from services.errors import InvalidArgument
from services.npz_archive import EntryError, NpyEntry, NpzWriter, iter_values, read_entries
from services.parquet_upload import check_parquet
from services.store import DatasetRecord
from services.upload_limits import (  # services/jobs.py reads both from here
    DEFAULT_MAX_UPLOAD_BYTES as DEFAULT_MAX_UPLOAD_BYTES,
)
from services.upload_limits import UploadLimits

if TYPE_CHECKING:
    from _csv import Reader as CsvReader  # what csv.reader() returns: rows and line_num

FORMATS = ("npz", "csv", "text", "safetensors", "parquet")
# Where an accepted upload is kept, by format: arrays (npz, csv) as .npz, the others as sent.
STORED_SUFFIXES = {"npz": ".npz", "csv": ".npz", "text": ".txt", "safetensors": ".safetensors",
                   "parquet": ".parquet"}
# A text trains as windows of int64 tokens and their int64 targets: 16 bytes per text byte.
TEXT_TRAINING_BYTES = 2 * 8
NPZ_ARRAYS = ("x", "y", "x_val", "y_val")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TRAINING_VALUE_BYTES = 8  # int64 tokens and labels, float64 jobs: the widest a job loads
CSV_BLOCK_ROWS = 4096
COPY_BYTES = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class UploadHeader:
    name: str
    format: str
    label_column: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class DataSummary:
    """What the store keeps about a data set's arrays, so nothing needs to load them to
    validate a job."""

    samples: int
    validation_samples: int
    feature_shape: tuple[int, ...]
    integer_features: bool
    task: str
    num_classes: int
    target_shape: tuple[int, ...]  # () for class labels, (k,) for k regression targets
    # A weights file's (key, shape) of each tensor, in the file's order; None for data.
    tensors: tuple[tuple[str, tuple[int, ...]], ...] | None = None


def check_header(header: UploadHeader | None, max_bytes: int) -> UploadHeader:
    if header is None:
        raise InvalidArgument("header", "the first message of an upload must be its header")
    if not NAME_PATTERN.fullmatch(header.name):
        raise InvalidArgument("header.name", f"must be 1-64 characters from [A-Za-z0-9._-] "
                                             f"starting with a letter or digit, got "
                                             f"{header.name!r}")
    if header.format not in FORMATS:
        raise InvalidArgument("header.format", f"must be one of {', '.join(FORMATS)}, got "
                                               f"{header.format!r}")
    if header.format == "csv" and not header.label_column:
        raise InvalidArgument("header.label_column", "required for CSV: the target column")
    if header.format != "csv" and header.label_column:
        raise InvalidArgument("header.label_column",
                              f"only for CSV; {header.format} has no label column, got "
                              f"{header.label_column!r}")
    if header.size_bytes < 1:
        raise InvalidArgument("header.size_bytes", f"must be >= 1, got {header.size_bytes}")
    if header.size_bytes > max_bytes:
        raise InvalidArgument("header.size_bytes", f"{header.size_bytes} bytes is over this "
                                                   f"server's upload limit of {max_bytes}")
    if not re.fullmatch(r"[0-9a-f]{64}", header.sha256):
        raise InvalidArgument("header.sha256", f"must be 64 lowercase hex digits, got "
                                               f"{header.sha256!r}")
    return header


def receive(header: UploadHeader, chunks: Iterable[bytes], folder: Path) -> Path:
    """Write the chunks to a temporary file in `folder`, checking size and hash; the caller
    owns (and must remove) the returned file."""
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".upload-", dir=folder)
    path = Path(temporary)
    digest, received = hashlib.sha256(), 0
    try:
        with os.fdopen(descriptor, "wb") as handle:
            for chunk in chunks:
                received += len(chunk)
                if received > header.size_bytes:
                    raise InvalidArgument("chunk", f"the stream has more than the "
                                                   f"{header.size_bytes} bytes announced in "
                                                   f"header.size_bytes")
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())  # an accepted .npz is renamed into place as it is
        if received != header.size_bytes:
            raise InvalidArgument("chunk", f"truncated stream: received {received} of the "
                                           f"{header.size_bytes} bytes announced in "
                                           f"header.size_bytes")
        if digest.hexdigest() != header.sha256:
            raise InvalidArgument("header.sha256", f"the data's SHA-256 is "
                                                   f"{digest.hexdigest()}, not {header.sha256!r}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def store_upload(header: UploadHeader, received: Path, destination: Path,
                 limits: UploadLimits) -> DataSummary:
    """Check the received file and put it at `destination` (suffix: STORED_SUFFIXES): an .npz,
    a text or a safetensors file as it was sent, a CSV converted to an .npz. Raises
    InvalidArgument naming the field when the file is not one this server accepts; nothing is
    left at `destination` then."""
    checks = {"npz": lambda: _check_npz(received, header.size_bytes, limits),
              "text": lambda: _check_text(received, header.size_bytes, limits),
              "safetensors": lambda: _check_safetensors(received, limits),
              "parquet": lambda: _check_parquet(received, header.size_bytes, limits)}
    if header.format in checks:
        summary = checks[header.format]()
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(received, destination)
        return summary
    return _write_atomically(destination, lambda handle: _convert_csv(
        received, header.label_column, limits, handle))


def record_for(tenant: str, header: UploadHeader, path: Path,
               summary: DataSummary) -> DatasetRecord:
    return DatasetRecord(
        tenant=tenant, name=header.name, format=header.format, size_bytes=header.size_bytes,
        sha256=header.sha256, path=str(path), samples=summary.samples,
        validation_samples=summary.validation_samples, feature_shape=summary.feature_shape,
        integer_features=summary.integer_features, task=summary.task,
        num_classes=summary.num_classes, target_shape=summary.target_shape,
        tensors=summary.tensors,
    )


def stored_target_shape(path: str | Path) -> tuple[int, ...]:
    """A stored data set's target shape from its `y` header alone (for store rows written
    before the target shape was kept)."""
    with zipfile.ZipFile(path) as archive:
        y = next(entry for entry in read_entries(archive) if entry.key == "y")
    return tuple(y.shape[1:]) or (1,)


# --- at training time ------------------------------------------------------------------------


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def to_dataset(arrays: dict[str, np.ndarray], name: str = "") -> Dataset:
    try:
        return from_arrays(arrays["x"], arrays["y"], arrays.get("x_val"), arrays.get("y_val"),
                           name=name)
    except ValueError as error:
        field = next((key for key in NPZ_ARRAYS if str(error).startswith(key)), "x")
        raise InvalidArgument(field, str(error)) from error


# --- Parquet -------------------------------------------------------------------------------------


def _check_parquet(path: Path, size_bytes: int, limits: UploadLimits) -> DataSummary:
    """A Parquet file's rows and numeric columns: its task and features are each job's choice
    of columns (data.label_column, data.feature_columns), resolved when a job names it."""
    rows, numeric_columns = check_parquet(path, size_bytes, limits)
    return DataSummary(rows, 0, (numeric_columns,), False, "", 0, ())


# --- text ----------------------------------------------------------------------------------------


def _check_text(path: Path, size_bytes: int, limits: UploadLimits) -> DataSummary:
    """A text for language models: UTF-8 (decoded as a stream, so never whole in memory),
    small enough to train on as windows of int64 tokens. A job cuts it by its own
    context_length, so its samples are counted then; here the text is its bytes."""
    if size_bytes * TEXT_TRAINING_BYTES > limits.max_dataset_bytes:
        raise InvalidArgument("header.size_bytes",
                              f"a text of {_size(size_bytes)} trains as "
                              f"{_size(size_bytes * TEXT_TRAINING_BYTES)} of tokens and targets, "
                              f"over this server's limit of {_size(limits.max_dataset_bytes)}; "
                              f"at most {limits.max_dataset_bytes // TEXT_TRAINING_BYTES} bytes")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        try:
            while chunk := handle.read(COPY_BYTES):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            # The decoder may hold back the bytes of an unfinished character from earlier.
            at = offset + error.start - len(decoder.getstate()[0])
            raise InvalidArgument("header.format", f"a text must be UTF-8; byte {max(at, 0)}: "
                                                   f"{error.reason}") from error
    return DataSummary(samples=0, validation_samples=0, feature_shape=(),
                       integer_features=True, task=NEXT_TOKEN, num_classes=256,
                       target_shape=())


# --- safetensors ---------------------------------------------------------------------------------


def _check_safetensors(path: Path, limits: UploadLimits) -> DataSummary:
    """Weights for a spec's model.init_from: a file safetensors' own parser reads (no pickle),
    of tensors NumPy holds, with finite floats. Their names and shapes are kept in the store,
    so a job's init_from is checked against its model without opening the file."""
    try:
        tensors = safetensors_header(path)
    except ValueError as error:
        raise InvalidArgument("header.format", str(error)) from error
    if not tensors:
        raise InvalidArgument("header.format", "the safetensors file holds no tensors")
    if len(tensors) > limits.max_weight_tensors:
        raise InvalidArgument("header.format", f"the file holds {len(tensors)} tensors; this "
                                               f"server accepts at most "
                                               f"{limits.max_weight_tensors}")
    for tensor in tensors:
        if len(tensor.key) > limits.max_weight_key_chars:
            raise InvalidArgument("header.format", f"tensor name {tensor.key[:40]!r}... is "
                                                   f"{len(tensor.key)} characters; at most "
                                                   f"{limits.max_weight_key_chars}")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise InvalidArgument("header.format", f"tensor {tensor.key!r} has dtype "
                                                   f"{tensor.dtype}; accepted: "
                                                   f"{', '.join(SAFETENSORS_DTYPES)}")
    floats = [tensor.key for tensor in tensors if tensor.dtype.startswith("F")]
    try:
        for key, values in iter_tensors(path, floats):  # one tensor in memory at a time
            if not np.all(np.isfinite(values)):
                raise InvalidArgument("header.format", f"tensor {key!r} contains NaN or "
                                                       f"infinite values")
    except ValueError as error:
        raise InvalidArgument("header.format", str(error)) from error
    return DataSummary(samples=0, validation_samples=0, feature_shape=(),
                       integer_features=False, task="", num_classes=0, target_shape=(),
                       tensors=tuple((tensor.key, tensor.shape) for tensor in tensors))


# --- .npz ----------------------------------------------------------------------------------------


def _check_npz(path: Path, upload_bytes: int, limits: UploadLimits) -> DataSummary:
    if not zipfile.is_zipfile(path):  # np.load would try other formats, pickle among them
        raise InvalidArgument("header.format", "not an .npz (zip) archive")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {entry.key: entry for entry in read_entries(archive)}
            _check_names(entries)
            _check_declared_sizes(list(entries.values()), upload_bytes, limits)
            summary = _summary_from_headers(entries)
            classes = [_check_values(archive, entry, limits) for entry in entries.values()]
    except EntryError as error:
        raise InvalidArgument(error.key or "header.format", error.message) from error
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as error:
        # zipfile's reading of a malformed directory (even an OSError: a seek before the start)
        raise InvalidArgument("header.format", f"not a readable .npz archive: {error}") from error
    if summary.task == CLASSIFICATION:
        summary = _with_classes(summary, max(classes))
    return summary


def _check_names(entries: dict[str, NpyEntry]) -> None:
    unknown = sorted(set(entries) - set(NPZ_ARRAYS))
    if unknown:
        raise EntryError(unknown[0], f"unexpected array {unknown[0]!r}; an upload has x, y and "
                                     f"optionally x_val, y_val")
    for key in ("x", "y"):
        if key not in entries:
            raise EntryError(key, f"the archive has no array {key!r} (it has "
                                  f"{sorted(entries)})")
    for key, other in (("x_val", "y_val"), ("y_val", "x_val")):
        if key in entries and other not in entries:
            raise EntryError(key, f"x_val and y_val must both be given or both be left out; "
                                  f"there is no {other}")


def _check_declared_sizes(entries: list[NpyEntry], upload_bytes: int,
                          limits: UploadLimits) -> None:
    """Before any data is read: the sizes the headers declare are within the limits. The
    largest entry is named, with its size."""
    largest = max(entries, key=lambda entry: entry.declared_bytes)
    declared = sum(entry.declared_bytes for entry in entries)
    if declared > limits.max_expansion * upload_bytes:
        raise EntryError(largest.key, f"declares {_size(largest.declared_bytes)} uncompressed "
                                      f"({largest.declared_bytes} bytes, from "
                                      f"{_size(largest.compressed_bytes)} compressed); the "
                                      f"archive expands {declared / upload_bytes:.0f}x, this "
                                      f"server accepts at most {limits.max_expansion:g}x")
    values = sum(entry.data_bytes // entry.dtype.itemsize for entry in entries)
    if values * TRAINING_VALUE_BYTES > limits.max_dataset_bytes:
        raise EntryError(largest.key, f"declares shape {largest.shape} of {largest.dtype} "
                                      f"({largest.declared_bytes} bytes); the data set would "
                                      f"take {_size(values * TRAINING_VALUE_BYTES)} to train on, "
                                      f"over this server's limit of "
                                      f"{_size(limits.max_dataset_bytes)}")


def _summary_from_headers(entries: dict[str, NpyEntry]) -> DataSummary:
    """Shapes, task and sample counts from the declared shapes and dtypes (no data read)."""
    x, y = entries["x"], entries["y"]
    if len(x.shape) < 2:
        raise EntryError("x", f"must have a sample axis and feature axes, got shape {x.shape}")
    if x.shape[0] == 0:
        raise EntryError("x", f"has no samples (shape {x.shape})")
    if 0 in x.shape[1:]:
        raise EntryError("x", f"each sample must have at least one feature, got shape "
                              f"{x.shape}")
    _check_targets(y, "y")
    if len(y.shape) == 0 or y.shape[0] != x.shape[0]:
        raise EntryError("x", f"x has {x.shape[0]} samples but y has "
                              f"{y.shape[0] if y.shape else 'none (a scalar)'}")
    validation = 0
    if "x_val" in entries:
        x_val, y_val = entries["x_val"], entries["y_val"]
        if x_val.shape[1:] != x.shape[1:] or len(x_val.shape) != len(x.shape):
            raise EntryError("x_val", f"x_val samples have shape {x_val.shape[1:]}, x samples "
                                      f"{x.shape[1:]}")
        if x_val.shape[0] == 0:
            raise EntryError("x_val", "has no samples; leave x_val and y_val out to hold out "
                                      "data.validation_fraction instead")
        if _is_integer(x_val) != _is_integer(x):
            raise EntryError("x_val", f"has dtype {x_val.dtype} but x has {x.dtype}: both "
                                      f"tokens (integers) or both floats")
        _check_targets(y_val, "y_val")
        if _is_integer(y_val) != _is_integer(y) or y_val.shape[1:] != y.shape[1:]:
            raise EntryError("y_val", f"has shape {y_val.shape} of {y_val.dtype} but y has "
                                      f"{y.shape} of {y.dtype}: targets must be alike")
        if y_val.shape[0] != x_val.shape[0]:
            raise EntryError("x_val", f"x_val has {x_val.shape[0]} samples but y_val has "
                                      f"{y_val.shape[0]}")
        validation = x_val.shape[0]
    classification = _is_integer(y)
    return DataSummary(
        samples=x.shape[0], validation_samples=validation, feature_shape=tuple(x.shape[1:]),
        integer_features=_is_integer(x), task=CLASSIFICATION if classification else REGRESSION,
        num_classes=0, target_shape=() if classification else (tuple(y.shape[1:]) or (1,)))


def _check_targets(entry: NpyEntry, key: str) -> None:
    if len(entry.shape) == 0:
        raise EntryError(key, "must have one target per sample, got a scalar")
    if _is_integer(entry) and len(entry.shape) != 1:
        raise EntryError(key, f"class labels must be one per sample, shape (n,), got "
                              f"{entry.shape}")


def _check_values(archive: zipfile.ZipFile, entry: NpyEntry, limits: UploadLimits) -> int:
    """Read the entry in chunks: floats must be finite, class labels in [0, max_classes).
    Returns the class count its labels imply (0 for anything but labels)."""
    labels = entry.key in ("y", "y_val") and _is_integer(entry)
    classes = 0
    for values in iter_values(archive, entry):
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise EntryError(entry.key, "contains NaN or infinite values")
        if labels and values.size:
            low, high = int(values.min()), int(values.max())
            if low < 0:
                raise EntryError(entry.key, f"class labels must be >= 0, got {low}")
            if high >= limits.max_classes:
                raise EntryError(entry.key, f"class label {high} is over this server's limit "
                                            f"of {limits.max_classes} classes")
            classes = max(classes, high + 1)
    return classes


def _is_integer(entry: NpyEntry) -> bool:
    return entry.dtype.kind in "biu"


def _with_classes(summary: DataSummary, num_classes: int) -> DataSummary:
    return DataSummary(summary.samples, summary.validation_samples, summary.feature_shape,
                       summary.integer_features, summary.task, num_classes,
                       summary.target_shape)


# --- CSV -----------------------------------------------------------------------------------------


@dataclass
class _LabelStats:
    """Running facts about the label column, for deciding classes or regression at the end."""

    whole: bool = True  # every label a whole number so far: classes
    first_negative: tuple[int, float] | None = None  # (line, value)
    first_too_large: tuple[int, float] | None = None
    largest: float = 0.0

    def add(self, labels: np.ndarray, lines: np.ndarray, max_classes: int) -> None:
        self.whole = self.whole and bool(np.all(labels == np.round(labels)))
        if not self.whole:
            return
        self.largest = max(self.largest, float(labels.max()))
        if self.first_negative is None and np.any(labels < 0):
            at = int(np.argmax(labels < 0))
            self.first_negative = (int(lines[at]), float(labels[at]))
        if self.first_too_large is None and np.any(labels >= max_classes):
            at = int(np.argmax(labels >= max_classes))
            self.first_too_large = (int(lines[at]), float(labels[at]))


def _convert_csv(path: Path, label_column: str, limits: UploadLimits,
                 output: IO[bytes]) -> DataSummary:
    """Parse the CSV a block of rows at a time into temporary raw files (features and labels,
    float64), then write them to `output` as an .npz of x and y."""
    with (open(path, encoding="utf-8-sig", newline="") as text,
          tempfile.TemporaryFile(dir=path.parent) as x_raw,
          tempfile.TemporaryFile(dir=path.parent) as y_raw):
        reader = csv.reader(_bounded_lines(text, limits.max_csv_line_chars))
        try:
            rows, features, stats = _parse_csv(reader, label_column, limits, x_raw, y_raw)
        except csv.Error as error:
            raise InvalidArgument("header.format", f"CSV line {reader.line_num}: "
                                                   f"{error}") from error
        except UnicodeDecodeError as error:
            raise InvalidArgument("header.format", f"a CSV must be UTF-8 text; after line "
                                                   f"{reader.line_num}: {error}") from error
        classification = stats.whole
        if classification:
            for found, problem in ((stats.first_negative, "class labels must be >= 0"),
                                   (stats.first_too_large, f"class labels must be below this "
                                                           f"server's limit of "
                                                           f"{limits.max_classes} classes")):
                if found is not None:
                    raise InvalidArgument(
                        "header.label_column",
                        f"CSV line {found[0]}, column {label_column!r}: {found[1]:g}: {problem} "
                        f"(whole-number labels are classes; regression targets need at least "
                        f"one value with a fraction)")
        label_type = np.dtype(np.int64) if classification else np.dtype(np.float64)
        with NpzWriter(output) as npz:
            npz.add("x", np.dtype(np.float64), (rows, features), _file_chunks(x_raw))
            npz.add("y", label_type, (rows,), (np.frombuffer(chunk, np.float64).astype(
                label_type).tobytes() for chunk in _file_chunks(y_raw)))
    return DataSummary(
        samples=rows, validation_samples=0, feature_shape=(features,), integer_features=False,
        task=CLASSIFICATION if classification else REGRESSION,
        num_classes=int(stats.largest) + 1 if classification else 0,
        target_shape=() if classification else (1,))


def _parse_csv(reader: CsvReader, label_column: str, limits: UploadLimits,
               x_raw: IO[bytes], y_raw: IO[bytes]) -> tuple[int, int, _LabelStats]:
    """(rows, features, label statistics); features and labels are appended to the raw
    files as float64. No `label_column` (""): every column is a feature."""
    header = next((row for row in reader if row), None)
    if header is None:
        raise InvalidArgument("header.format", "a CSV needs a header row and at least one "
                                               "sample row")
    columns = [name.strip() for name in header]
    if len(columns) > limits.max_csv_columns:
        raise InvalidArgument("header.format", f"the CSV has {len(columns)} columns; this "
                                               f"server accepts at most "
                                               f"{limits.max_csv_columns}")
    named = columns.count(label_column) if label_column else 1
    if named == 0:
        shown = columns if len(columns) <= 20 else columns[:20] + ["..."]
        raise InvalidArgument("header.label_column", f"no column {label_column!r}; the columns "
                                                     f"are {shown}")
    if named > 1:
        raise InvalidArgument("header.label_column", f"the CSV has {named} columns named "
                                                     f"{label_column!r}")
    if len(columns) < 1 + bool(label_column):
        raise InvalidArgument("header.label_column", "the CSV has no feature columns")
    label_index = columns.index(label_column) if label_column else None
    feature_indices = [i for i in range(len(columns)) if i != label_index]
    max_rows = min(limits.max_csv_rows,
                   limits.max_dataset_bytes // (TRAINING_VALUE_BYTES * len(columns)))
    block = np.empty((CSV_BLOCK_ROWS, len(columns)))
    lines = np.empty(CSV_BLOCK_ROWS, dtype=np.int64)
    stats, rows, filled = _LabelStats(), 0, 0

    def flush() -> None:
        values = block[:filled]
        finite = np.isfinite(values)
        if not finite.all():
            row, column = np.argwhere(~finite)[0]
            raise InvalidArgument("header.format", f"CSV line {lines[row]}, column "
                                                   f"{columns[column]!r}: {values[row, column]} "
                                                   f"is not finite")
        x_raw.write(values[:, feature_indices].tobytes())
        if label_index is not None:
            y_raw.write(values[:, label_index].tobytes())
            stats.add(values[:, label_index], lines[:filled], limits.max_classes)

    for row in reader:
        if not row:
            continue
        if len(row) != len(columns):
            raise InvalidArgument("header.format", f"CSV line {reader.line_num} has {len(row)} "
                                                   f"fields, the header {len(columns)}")
        rows += 1
        if rows > max_rows:
            raise InvalidArgument("header.format", f"the CSV has more than {max_rows} sample "
                                                   f"rows, this server's limit for "
                                                   f"{len(columns)} columns")
        try:
            block[filled] = [float(cell) for cell in row]
        except ValueError:
            column, cell = next((name, cell) for name, cell in zip(columns, row)
                                if not _is_number(cell))
            raise InvalidArgument("header.format", f"CSV line {reader.line_num}, column "
                                                   f"{column!r}: not a number: "
                                                   f"{cell[:40]!r}") from None
        lines[filled] = reader.line_num
        filled += 1
        if filled == CSV_BLOCK_ROWS:
            flush()
            filled = 0
    if filled:
        flush()
    if rows == 0:
        raise InvalidArgument("header.format", "a CSV needs a header row and at least one "
                                               "sample row")
    return rows, len(feature_indices), stats


# --- rows sent with a request (Predict) ----------------------------------------------------------

ROWS_FORMATS = ("csv", "npz")


def read_rows(data: bytes, format: str, label_column: str, limits: UploadLimits, *,
              max_values: int, field: str) -> np.ndarray:
    """The rows of a file sent whole in one request: a .csv (a header row, then numbers;
    `label_column`, when given, left out) or an .npz's array `x`. Parsed by the upload code,
    with its caps, and never more than `max_values` values held: an .npz's declared shape is
    checked before its data is read, a CSV's rows as they are read. Float64 rows (an .npz's
    integer `x`, tokens, as int64); InvalidArgument naming `field`.format, .data or
    .label_column."""
    if format not in ROWS_FORMATS:
        raise InvalidArgument(f"{field}.format", f"must be one of {', '.join(ROWS_FORMATS)}, "
                                                 f"got {format!r}")
    if not data:
        raise InvalidArgument(f"{field}.data", "is empty")
    if format == "npz":
        if label_column:
            raise InvalidArgument(f"{field}.label_column", "only for CSV; an .npz's rows are "
                                                           "its array x")
        return _npz_rows(data, limits, max_values, field)
    # Values are float64 here as in a data set: the data-set cap is the value cap.
    capped = dataclasses.replace(limits, max_dataset_bytes=max_values * TRAINING_VALUE_BYTES)
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")
    reader = csv.reader(_bounded_lines(text, limits.max_csv_line_chars))
    x_raw, y_raw = io.BytesIO(), io.BytesIO()
    try:
        rows, features, _ = _parse_csv(reader, label_column, capped, x_raw, y_raw)
    except InvalidArgument as error:  # the upload's fields, as this request names them
        part = "label_column" if error.field_path.endswith("label_column") else "data"
        raise InvalidArgument(f"{field}.{part}", error.detail) from error
    except csv.Error as error:
        raise InvalidArgument(f"{field}.data", f"CSV line {reader.line_num}: {error}") from error
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"{field}.data", f"a CSV must be UTF-8 text; after line "
                                               f"{reader.line_num}: {error}") from error
    return np.frombuffer(x_raw.getbuffer(), np.float64).reshape(rows, features).copy()


def _npz_rows(data: bytes, limits: UploadLimits, max_values: int, field: str) -> np.ndarray:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = {entry.key: entry for entry in read_entries(archive)}
            x = entries.get("x")
            if x is None:
                raise EntryError("", f"the archive has no array 'x' (it has "
                                     f"{sorted(entries)})")
            _check_declared_sizes([x], len(data), limits)
            if len(x.shape) < 2 or x.shape[0] == 0:
                raise EntryError("x", f"must have samples and a feature axis, got shape "
                                      f"{x.shape}")
            if math.prod(x.shape) > max_values:
                raise EntryError("x", f"declares shape {x.shape}: {math.prod(x.shape)} values, "
                                      f"over this request's limit of {max_values}")
        # The declared shape is within the caps: numpy reads exactly that many values.
        with np.load(io.BytesIO(data), allow_pickle=False) as archive_arrays:
            rows = archive_arrays["x"]
    except EntryError as error:
        raise InvalidArgument(f"{field}.data", str(error)) from error
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as error:
        raise InvalidArgument(f"{field}.data", f"not a readable .npz archive: {error}") from error
    if rows.dtype.kind not in "biuf":
        raise InvalidArgument(f"{field}.data", f"x must hold numbers, got {rows.dtype}")
    return rows.astype(np.int64 if rows.dtype.kind in "biu" else np.float64)


def _bounded_lines(text: IO[str], max_chars: int) -> Iterator[str]:
    """The text's lines, refusing one longer than `max_chars` before it is held whole."""
    number = 0
    while line := text.readline(max_chars + 1):
        number += 1
        if len(line) > max_chars:
            raise InvalidArgument("header.format", f"CSV line {number} is longer than this "
                                                   f"server's limit of {max_chars} characters")
        yield line


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# --- files ---------------------------------------------------------------------------------------


def _file_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    handle.seek(0)
    while chunk := handle.read(COPY_BYTES):
        yield chunk


def _write_atomically(path: Path, write: Callable[[IO[bytes]], T]) -> T:
    """Write to a temporary name beside `path`, fsync, rename: readers see all or nothing.
    The file is the tenant's data: readable by the server's user only (mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            result = write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return result


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
