"""How a job's model starts from pretrained weights (`model.init_from`): which of the model's
parameters and buffers take a weights file's values, decided when the job is resolved.

The decision needs only the file's header, its tensor names and shapes (`WeightsShape`), never
its values: the service keeps them in the upload's store row, `chainrule train` reads them from
a local file's header. The values are read once, by the job runner, into its initial parameter
vector and its master buffers (scheduler/job_runner.py), so every replica and every
parameter-server shard starts from them, whatever the transport and the worker count.

The rules are PyTorch's `load_state_dict`: strict (the spec's default) wants exactly the model's
keys, parameters and buffers (BatchNorm statistics) alike; non-strict lets the model keep the
seed's initialisation for the keys the file lacks (a new head) and ignores the file's keys the
model lacks (an old head). A key present in both with another shape is always an error, and so
is a file none of whose keys the model has (the wrong file, or another naming).

A spec names the file as "upload:NAME" (a safetensors upload of the job's tenant; the service
resolves it) or, for `chainrule train` only, "file:PATH" (a local safetensors file). The
service refuses "file:": a client must never make the server read a path of its choosing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from worker.spec_error import SpecError

UPLOAD_PREFIX = "upload:"
FILE_PREFIX = "file:"
FIELD = "model.init_from"
LISTED_KEYS = 10  # per kind of problem; the rest are counted


@dataclass(frozen=True)
class WeightsShape:
    """What resolving needs to know of a weights file, without its values."""

    path: str  # where the job runner reads it
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (key, shape), in the file's order
    name: str = ""  # as the spec named it, for messages

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.tensors)


@dataclass(frozen=True)
class InitialWeights:
    """The resolved `model.init_from`: the job runner loads `keys` from `path`."""

    path: str  # a safetensors file on the runner's host
    keys: tuple[str, ...]  # the model's state_dict keys that take the file's values
    strict: bool  # every key of the model came from the file


def weights_reference(init_from: str) -> tuple[str, str]:
    """("upload", NAME) for "upload:NAME" or a bare NAME, ("file", PATH) for "file:PATH"."""
    if init_from.startswith(FILE_PREFIX):
        path = init_from.removeprefix(FILE_PREFIX)
        if not path:
            raise SpecError(FIELD, "'file:' needs a path: file:weights.safetensors")
        return "file", path
    name = init_from.removeprefix(UPLOAD_PREFIX)
    if not name:
        raise SpecError(FIELD, "'upload:' needs the name of a safetensors upload")
    return "upload", name


def match_weights(model_shapes: Mapping[str, tuple[int, ...]], weights: WeightsShape,
                  strict: bool) -> InitialWeights:
    """The keys the model takes from the file, or a SpecError on `model.init_from` listing
    every missing, unexpected and mis-shaped key with its shape."""
    file_shapes = weights.shapes
    shared = [key for key in model_shapes if key in file_shapes]
    misshaped = [f"{key}: file {file_shapes[key]}, model {tuple(model_shapes[key])}"
                 for key in shared if not fits(file_shapes[key], model_shapes[key])]
    problems = []
    if strict:
        missing = [f"{key} {tuple(shape)}" for key, shape in model_shapes.items()
                   if key not in file_shapes]
        unexpected = [f"{key} {shape}" for key, shape in weights.tensors
                      if key not in model_shapes]
        if missing:
            problems.append(f"missing keys (the model's, not in the file): {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys (the file's, not in the model): "
                            f"{_listed(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_listed(misshaped)}")
    if not shared:
        problems.append(f"none of the file's {len(file_shapes)} keys "
                        f"({_listed(list(file_shapes))}) is a key of the model "
                        f"({_listed(list(model_shapes))})")
    if problems:
        hint = (" (init_strict: false keeps the seed's initialisation for missing keys and "
                "ignores unexpected ones; a mis-shaped key is always an error)"
                if strict and not misshaped and shared else "")
        raise SpecError(FIELD, f"the weights {weights.name or weights.path!r} do not fit the "
                               f"model: {'; '.join(problems)}{hint}")
    return InitialWeights(weights.path, tuple(shared), strict)


def fits(file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> bool:
    """Same shape, or a scalar the file holds as one value (PyTorch loads a (1,) tensor into a
    0-d one, for num_batches_tracked saved by older writers, chainrule's among them)."""
    return tuple(file_shape) == tuple(model_shape) or (
        tuple(model_shape) == () and tuple(file_shape) == (1,))


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED_KEYS])
    return shown if len(items) <= LISTED_KEYS else f"{shown} and {len(items) - LISTED_KEYS} more"
