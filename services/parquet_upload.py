"""An uploaded Parquet file: what is checked before it is kept, and how a spec names it.

A Parquet upload is kept as it was sent and trained on as any Parquet data set is
(scheduler/parquet_dataset.py): each worker reads the row groups of its own micro-batches from
the stored file, so the file is never whole in memory, neither here nor on a worker. A spec
names it `parquet:upload:NAME`, with `data.label_column` (and optionally
`data.feature_columns`): the columns a job trains on are the job's choice, not the upload's.

Checked at upload, a row group at a time (memory bounded by one row group, never the file):
- the footer parses and declares at least one row and two numeric columns;
- what its row groups declare is bounded before any is decoded: a row group's numeric values
  (8 bytes each) within what a worker may hold of it (it keeps ROW_GROUPS_HELD row
  groups, worker/parquet_rows.py, within `max_dataset_bytes`), and the whole file's within
  `max_expansion` times the bytes sent (a page of repeated values is a Parquet zip bomb);
- every numeric column of every row group decodes, without missing, NaN or infinite values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.errors import InvalidArgument
from services.upload_limits import UploadLimits
from worker.parquet_rows import ROW_GROUPS_HELD

PARQUET_UPLOAD_PREFIX = "parquet:upload:"
VALUE_BYTES = 8  # a float64 job reads every feature as 8 bytes


def parquet_upload_name(dataset: str) -> str | None:
    """NAME of a spec's `data.dataset: "parquet:upload:NAME"`, or None for another data set."""
    if dataset.startswith(PARQUET_UPLOAD_PREFIX):
        return dataset[len(PARQUET_UPLOAD_PREFIX):]
    return None


def check_parquet(path: Path, size_bytes: int, limits: UploadLimits) -> tuple[int, int]:
    """(rows, numeric columns) of the Parquet file at `path`, or InvalidArgument naming
    header.format with what is wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise InvalidArgument("header.format", f"not a readable Parquet file: {error}") from error
    schema = parquet_file.schema_arrow
    numeric = [field.name for field in schema
               if pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
               or pa.types.is_boolean(field.type)]
    metadata = parquet_file.metadata
    rows = metadata.num_rows
    if rows < 1:
        raise InvalidArgument("header.format", "the Parquet file has no rows")
    if len(numeric) < 2:
        raise InvalidArgument("header.format", f"the Parquet file has {len(numeric)} numeric "
                                               f"column(s); a data set needs a label column "
                                               f"and at least one feature")
    group_budget = limits.max_dataset_bytes // ROW_GROUPS_HELD
    for group in range(metadata.num_row_groups):
        group_bytes = metadata.row_group(group).num_rows * len(numeric) * VALUE_BYTES
        if group_bytes > group_budget:
            raise InvalidArgument("header.format", f"row group {group} holds {group_bytes:,} "
                                                   f"bytes of numbers; a worker keeps "
                                                   f"{ROW_GROUPS_HELD} row groups, and this "
                                                   f"server allows {group_budget:,} bytes each: "
                                                   f"write the file with smaller row groups")
    total_bytes = rows * len(numeric) * VALUE_BYTES
    if total_bytes > size_bytes * limits.max_expansion:
        raise InvalidArgument("header.format", f"the Parquet file declares {total_bytes:,} "
                                               f"bytes of numbers in {size_bytes:,} bytes sent, "
                                               f"over this server's limit of "
                                               f"{limits.max_expansion:g}x")
    for group in range(metadata.num_row_groups):
        _check_group(parquet_file, group, numeric)
    return rows, len(numeric)


def _check_group(parquet_file, group: int, columns: list[str]) -> None:
    import pyarrow as pa

    try:  # one thread decodes: Arrow's pool threads would each keep an arena of freed memory
        table = parquet_file.read_row_group(group, columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as error:
        raise InvalidArgument("header.format", f"row group {group} cannot be read: "
                                               f"{error}") from error
    for name in columns:
        column = table.column(name)
        if column.null_count:
            raise InvalidArgument("header.format", f"column {name!r} has missing values in "
                                                   f"row group {group}")
        values = column.to_numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise InvalidArgument("header.format", f"column {name!r} has NaN or infinite "
                                                   f"values in row group {group}")
