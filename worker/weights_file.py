"""Trained weights on disk: safetensors or .npz with PyTorch key names, plus a JSON manifest.

Written to a temporary name in the same folder, fsynced, then renamed: a reader sees the old
file or the whole new one, never half a file. `.npz` is read with allow_pickle=False, so a
weights file can never run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = (".safetensors", ".npz")


def manifest_path(weights_path: str | Path) -> Path:
    return Path(f"{weights_path}.json")


def save_weights(path: str | Path, state_dict: Mapping[str, np.ndarray],
                 manifest: Mapping[str, Any] | None = None) -> Path:
    """Write the state dict (format from the suffix) and, beside it, `<path>.json`."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"weights file must end in {' or '.join(FORMATS)}, got {path.name!r}")
    arrays = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
    _write_atomically(path, lambda handle: _serialize(path.suffix, arrays, handle))
    if manifest is not None:
        text = json.dumps(dict(manifest), indent=2, sort_keys=True, default=str).encode()
        _write_atomically(manifest_path(path), lambda handle: handle.write(text))
    return path


def weights_bytes(state_dict: Mapping[str, np.ndarray], suffix: str = ".safetensors") -> bytes:
    """The file's content in memory (for streaming a download)."""
    import io

    buffer = io.BytesIO()
    _serialize(suffix, {k: np.ascontiguousarray(v) for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    raise ValueError(f"weights file must end in {' or '.join(FORMATS)}, got {path.name!r}")


def _serialize(suffix: str, arrays: dict[str, np.ndarray], handle) -> None:
    if suffix == ".safetensors":
        from safetensors.numpy import save

        handle.write(save(arrays))
    else:
        np.savez(handle, **arrays)


def _write_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; a weights file is not secret
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
