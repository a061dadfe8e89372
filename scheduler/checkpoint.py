"""A job's resumable state at an optimizer-step boundary, and its file format.

Resuming is deterministic replay: the sampler is a function of (seed, epoch), so knowing how
many optimizer steps were done says exactly which batch comes next. A checkpoint therefore
holds only the step count, the flat parameter vector, the buffers (BatchNorm statistics) and
the optimizer state, assembled over all shards so that any shard count can resume it.

On disk: one `.npz` (read with allow_pickle=False) written to a temporary name, fsynced and
renamed, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from worker.weights_file import _write_atomically


@dataclass
class Checkpoint:
    step: int  # optimizer steps completed
    parameters: np.ndarray  # the flat parameter vector
    optimizer_steps: int  # the optimizer's own step count (t in its update formulas)
    # Elementwise optimizers: each state array over the whole flat vector ("exp_avg", ...).
    # Others (Adafactor): "parameter name/state key" for each whole parameter.
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    arrays = {"parameters": checkpoint.parameters}
    arrays.update({f"optimizer/{k}": v for k, v in checkpoint.optimizer_state.items()})
    arrays.update({f"buffer/{k}": v for k, v in checkpoint.buffers.items()})
    header = {"step": checkpoint.step, "optimizer_steps": checkpoint.optimizer_steps}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = Path(path)
    _write_atomically(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    with np.load(path, allow_pickle=False) as archive:
        header = json.loads(archive["header"].tobytes().decode())
        optimizer, buffers = {}, {}
        for key in archive.files:
            if key.startswith("optimizer/"):
                optimizer[key.removeprefix("optimizer/")] = archive[key]
            elif key.startswith("buffer/"):
                buffers[key.removeprefix("buffer/")] = archive[key]
        return Checkpoint(int(header["step"]), archive["parameters"],
                          int(header["optimizer_steps"]), optimizer, buffers)
