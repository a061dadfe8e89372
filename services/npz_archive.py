"""An .npz archive read without trusting it, and one written from streams.

An .npz is a zip archive of .npy files. The zip's central directory declares each entry's
compressed and uncompressed size, and each .npy header declares its array's dtype and shape.
`read_entries` checks all of that before a byte of array data is decompressed (so a small
archive that claims gigabytes, a zip bomb, costs nothing), and `iter_values` then reads an
array in bounded chunks: memory stays at one chunk whatever the array's size.

Refused outright: duplicate entry names (each copy would be decompressed, and which one counts
differs between readers), encrypted entries, compression methods other than stored and deflate
(an LZMA entry names its own dictionary size, up to gigabytes), object dtypes (loading them
means unpickling) and headers whose shape disagrees with the entry's declared size.
`NpzWriter` writes an uncompressed .npz entry by entry from chunks of bytes.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

ALLOWED_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats
MAX_HEADER_BYTES = 10_000  # numpy's own default limit for a .npy header
CHUNK_BYTES = 1 << 20
# What reading a damaged entry can raise: bad CRC, truncated or corrupt deflate data.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


class EntryError(ValueError):
    """A problem with one entry (`key`, e.g. "x" for x.npy), or with the archive (key "")."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)


@dataclass(frozen=True)
class NpyEntry:
    """One .npy entry as its headers declare it; no data has been read."""

    key: str  # the array's name: "x" for x.npy
    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]
    header_bytes: int  # bytes of the .npy preamble before the data
    fortran_order: bool = False  # values column-major (numpy saves an F-contiguous array so)

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def declared_bytes(self) -> int:
        """The entry's uncompressed size, as its zip header declares it."""
        return self.info.file_size

    @property
    def compressed_bytes(self) -> int:
        return self.info.compress_size


def entry_key(filename: str) -> str:
    return filename.removesuffix(".npy")


def read_entries(archive: zipfile.ZipFile) -> list[NpyEntry]:
    """Every entry's declared dtype and shape, checked against its declared size; reads only
    the .npy headers (at most MAX_HEADER_BYTES each)."""
    infos = archive.infolist()
    seen: set[str] = set()
    for info in infos:
        key = entry_key(info.filename)
        if key in seen:  # "x.npy" twice, or "x" and "x.npy": numpy would load one of them
            raise EntryError(key, f"the archive has more than one entry for array {key!r}")
        seen.add(key)
        if info.flag_bits & 0x1:
            raise EntryError(key, "the entry is encrypted")
        if info.compress_type not in ALLOWED_COMPRESSION:
            raise EntryError(key, f"compression method {info.compress_type} is not accepted; "
                                  f"use stored or deflate (numpy.savez, savez_compressed)")
    return [_read_header(archive, info) for info in infos]


def _read_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> NpyEntry:
    key = entry_key(info.filename)
    try:
        with archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                    stream, max_header_size=MAX_HEADER_BYTES)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(
                    stream, max_header_size=MAX_HEADER_BYTES)
            else:
                raise EntryError(key, f".npy format version {version} is not accepted (1.0 or "
                                      f"2.0, as numpy writes numeric arrays)")
            header_bytes = stream.tell()
    except EntryError:
        raise
    except _READ_ERRORS as error:
        raise EntryError(key, f"not a readable .npy entry: {error}") from error
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject or dtype.fields is not None:
        raise EntryError(key, f"must hold numbers, got dtype {dtype}"
                              + (" (object arrays are pickles and are never loaded)"
                                 if dtype.hasobject else ""))
    if any(not isinstance(size, int) or size < 0 for size in shape):
        raise EntryError(key, f"invalid shape {shape}")
    entry = NpyEntry(key, info, dtype, tuple(shape), header_bytes, bool(fortran))
    if entry.header_bytes + entry.data_bytes != entry.declared_bytes:
        raise EntryError(key, f"its .npy header declares shape {entry.shape} of {dtype} "
                              f"({entry.data_bytes} bytes of data) but the zip entry holds "
                              f"{entry.declared_bytes - entry.header_bytes} bytes of data")
    return entry


def iter_values(archive: zipfile.ZipFile, entry: NpyEntry,
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The entry's values in file order, a chunk at a time (1-D arrays of its dtype); the
    zip's CRC is checked when the last chunk is read."""
    per_chunk = max(1, chunk_bytes // max(1, entry.dtype.itemsize)) * entry.dtype.itemsize
    remaining = entry.data_bytes
    try:
        with archive.open(entry.info) as stream:
            stream.read(entry.header_bytes)
            while remaining > 0:
                data = stream.read(min(per_chunk, remaining))
                if not data:
                    raise EntryError(entry.key, f"the entry ends {remaining} bytes early")
                remaining -= len(data)
                yield np.frombuffer(data, dtype=entry.dtype)
            if stream.read(1):  # also reaches the end, where zipfile checks the CRC
                raise EntryError(entry.key, "the entry has data past its array")
    except EntryError:
        raise
    except _READ_ERRORS as error:
        raise EntryError(entry.key, f"unreadable data: {error}") from error


def iter_rows(archive: zipfile.ZipFile, entry: NpyEntry, rows: int) -> Iterator[np.ndarray]:
    """The entry's array `rows` rows (first-axis entries) at a time, each of shape
    (k, *shape[1:]): memory stays at one block of rows whatever the array's size. A
    column-major array of two or more axes has no contiguous rows: it is read whole."""
    if not entry.shape:
        raise EntryError(entry.key, "a scalar has no rows")
    if entry.fortran_order and len(entry.shape) > 1:
        values = np.concatenate(list(iter_values(archive, entry)))
        whole = values.reshape(entry.shape, order="F")
        for start in range(0, entry.shape[0], rows):
            yield whole[start:start + rows]
        return
    row_shape = entry.shape[1:]
    per_row = math.prod(row_shape)
    if per_row == 0:  # rows of no values: nothing to read
        for start in range(0, entry.shape[0], rows):
            yield np.empty((min(rows, entry.shape[0] - start), *row_shape), entry.dtype)
        return
    per_block = rows * per_row
    pending = np.empty(0, dtype=entry.dtype)
    for chunk in iter_values(archive, entry, chunk_bytes=per_block * entry.dtype.itemsize):
        pending = np.concatenate([pending, chunk]) if len(pending) else chunk
        while len(pending) >= per_block:
            yield pending[:per_block].reshape((rows, *row_shape))
            pending = pending[per_block:]
    if len(pending):
        yield pending.reshape((-1, *row_shape))


class NpzWriter:
    """An uncompressed .npz written one entry at a time from chunks of bytes:

        with NpzWriter(handle) as npz:
            npz.add("x", np.dtype("float64"), (n, 3), chunks)
    """

    def __init__(self, handle: IO[bytes]):
        self._zip = zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()

    def add(self, key: str, dtype: np.dtype, shape: tuple[int, ...],
            chunks: Iterable[bytes]) -> None:
        expected = math.prod(shape) * dtype.itemsize
        written = 0
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_1_0(entry, {
                "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": tuple(shape)})
            for chunk in chunks:
                entry.write(chunk)
                written += len(chunk)
        if written != expected:  # a bug in the caller: the file would not load
            raise AssertionError(f"{key}: wrote {written} bytes for shape {shape} of {dtype}, "
                                 f"expected {expected}")
