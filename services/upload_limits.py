"""What one upload may cost the server: the limits `chainrule serve` sets from its flags
(services/cli.py) and services/uploads.py enforces. Apart from the upload code so that the CLI
can show their defaults without importing it."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 256 * MiB  # an upload's size as sent (`serve --max-upload-bytes`)


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may cost the server, beyond its size (`max_upload_bytes`)."""

    # The data set as a job loads it (8 bytes a value): what training it costs in memory.
    max_dataset_bytes: int = 1024 * MiB
    # Uncompressed bytes an .npz may declare per uploaded byte. Real data compresses a few
    # times, a zip bomb about a thousand times; the limit keeps a small upload small on disk.
    max_expansion: float = 100.0
    max_csv_rows: int = 10_000_000
    max_csv_columns: int = 10_000
    max_csv_line_chars: int = 1 * MiB
    # Class labels are 0..max; the model's output needs one unit per class.
    max_classes: int = 1 << 20
    # A weights file's tensors, and the length of a tensor's name: their names and shapes are
    # kept in the store's row.
    max_weight_tensors: int = 20_000
    max_weight_key_chars: int = 512
    # An upload whose client sends nothing for this long is abandoned (its thread freed).
    idle_seconds: float = 30.0
