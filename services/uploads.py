"""Uploaded data sets: receive a stream of chunks, check it, and keep it as a validated .npz.

The bytes go to a temporary file while their size and SHA-256 are counted; only a complete
stream with the announced size and hash is parsed, only a file that parses into a valid
data set (numbers only, matching sample counts) is moved into place, and only then is the
store's row written. Any failure removes the temporary file: a bad upload leaves nothing.

No pickle, ever: `.npz` files are read with `allow_pickle=False`, so an object array (which
would need unpickling) is refused instead of run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.datasets import Dataset, from_arrays
from services.errors import InvalidArgument
from services.store import DatasetRecord

FORMATS = ("npz", "csv")
NPZ_ARRAYS = ("x", "y", "x_val", "y_val")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class UploadHeader:
    name: str
    format: str
    label_column: str
    size_bytes: int
    sha256: str


def check_header(header: UploadHeader | None, max_bytes: int) -> UploadHeader:
    if header is None:
        raise InvalidArgument("header", "the first message of an upload must be its header")
    if not NAME_PATTERN.fullmatch(header.name):
        raise InvalidArgument("header.name", f"must be 1-64 characters from [A-Za-z0-9._-] "
                                             f"starting with a letter or digit, got "
                                             f"{header.name!r}")
    if header.format not in FORMATS:
        raise InvalidArgument("header.format", f"must be 'npz' or 'csv', got {header.format!r}")
    if header.format == "csv" and not header.label_column:
        raise InvalidArgument("header.label_column", "required for CSV: the target column")
    if header.format == "npz" and header.label_column:
        raise InvalidArgument("header.label_column",
                              f"only for CSV; an npz has its labels in 'y', got "
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


def parse(header: UploadHeader, path: Path) -> dict[str, np.ndarray]:
    """The arrays x, y (and x_val, y_val) of a received file, checked to form a data set."""
    arrays = _read_npz(path) if header.format == "npz" else _read_csv(path, header.label_column)
    to_dataset(arrays)  # raises InvalidArgument when the arrays do not form a data set
    return arrays


def to_dataset(arrays: dict[str, np.ndarray], name: str = "") -> Dataset:
    try:
        return from_arrays(arrays["x"], arrays["y"], arrays.get("x_val"), arrays.get("y_val"),
                           name=name)
    except ValueError as error:
        field = next((key for key in NPZ_ARRAYS if str(error).startswith(key)), "x")
        raise InvalidArgument(field, str(error)) from error


def store_arrays(arrays: dict[str, np.ndarray], folder: Path, name: str) -> Path:
    """Write the canonical .npz atomically (the temporary name, fsync, rename)."""
    from worker.weights_file import _write_atomically

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = folder / f"{name}.npz"
    _write_atomically(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def record_for(tenant: str, header: UploadHeader, path: Path,
               arrays: dict[str, np.ndarray]) -> DatasetRecord:
    dataset = to_dataset(arrays)
    return DatasetRecord(
        tenant=tenant, name=header.name, format=header.format, size_bytes=header.size_bytes,
        sha256=header.sha256, path=str(path), samples=len(dataset.x),
        validation_samples=0 if dataset.x_val is None else len(dataset.x_val),
        feature_shape=tuple(dataset.feature_shape),
        integer_features=dataset.integer_features, task=dataset.task,
        num_classes=dataset.num_classes,
    )


# --- formats ---------------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # np.load would try other formats, pickle among them
        raise InvalidArgument("header.format", "not an .npz (zip) archive")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise InvalidArgument("header.format", f"not a readable .npz archive: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InvalidArgument("header.format", "a single .npy array, not an .npz archive with "
                                               "arrays x and y")
    arrays: dict[str, np.ndarray] = {}
    with archive:
        unknown = sorted(set(archive.files) - set(NPZ_ARRAYS))
        if unknown:
            raise InvalidArgument(unknown[0], f"unexpected array {unknown[0]!r}; an upload has "
                                              f"x, y and optionally x_val, y_val")
        for key in ("x", "y"):
            if key not in archive.files:
                raise InvalidArgument(key, f"the archive has no array {key!r} (it has "
                                           f"{sorted(archive.files)})")
        for key in archive.files:
            try:
                array = archive[key]
            except ValueError as error:  # "Object arrays cannot be loaded when allow_pickle=False"
                raise InvalidArgument(key, f"refused: {error} (pickled objects are never "
                                           f"loaded)") from error
            except (OSError, zipfile.BadZipFile, EOFError) as error:
                raise InvalidArgument(key, f"unreadable array: {error}") from error
            if array.dtype.kind not in "biuf":
                raise InvalidArgument(key, f"must hold numbers, got dtype {array.dtype}")
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise InvalidArgument(key, "contains NaN or infinite values")
            arrays[key] = array
    return arrays


def _read_csv(path: Path, label_column: str) -> dict[str, np.ndarray]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument("header.format", f"a CSV must be UTF-8 text: {error}") from error
    rows = list(csv.reader(io.StringIO(text)))
    rows = [row for row in rows if row]
    if len(rows) < 2:
        raise InvalidArgument("header.format", "a CSV needs a header row and at least one "
                                               "sample row")
    columns = [name.strip() for name in rows[0]]
    if label_column not in columns:
        raise InvalidArgument("header.label_column", f"no column {label_column!r}; the columns "
                                                     f"are {columns}")
    if len(columns) < 2:
        raise InvalidArgument("header.label_column", "the CSV has no feature columns")
    label_index = columns.index(label_column)
    features, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns):
            raise InvalidArgument("header.format", f"CSV line {line} has {len(row)} fields, "
                                                   f"the header {len(columns)}")
        values = []
        for column, cell in zip(columns, row):
            try:
                values.append(float(cell))
            except ValueError:
                raise InvalidArgument("header.format", f"CSV line {line}, column {column!r}: "
                                                       f"not a number: {cell!r}") from None
            if not np.isfinite(values[-1]):
                raise InvalidArgument("header.format", f"CSV line {line}, column {column!r}: "
                                                       f"{cell!r} is not finite")
        labels.append(values.pop(label_index))
        features.append(values)
    y = np.asarray(labels, dtype=np.float64)
    if np.all(y == np.round(y)):  # whole-number labels are classes
        y = y.astype(np.int64)
    return {"x": np.asarray(features, dtype=np.float64), "y": y}


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]
