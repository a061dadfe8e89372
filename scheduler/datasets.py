"""Which data a job trains on: the built-in data sets, the validation split and standardisation.

Plain NumPy, no Ray: the job runner puts the arrays into the object store once, after this.

- `load_builtin(name, seed)`: scikit-learn's bundled data sets (read from the installed package,
  never downloaded) and seeded synthetic ones, as a `Dataset`.
- `split_and_standardize(dataset, validation_fraction, standardize, seed)`: a seeded hold-out
  split when the data set has no validation part, then feature standardisation fitted on the
  TRAINING split only. The fitted mean and standard deviation stay on the Dataset, so validation
  data, test data and a served model all see the same transform (`Dataset.transform`); fitting
  on all the data would leak the validation split's statistics into training.

Arrays: float features in the job's dtype (float32 unless the spec says float64), integer
(token) features as int64 and never standardised; labels int64 of shape (n,) for
classification, floats of shape (n, k) for regression.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from worker.resolved_job import (
    BYTE_VOCABULARY,
    DataShape,
    text_windows,
    validation_split_size,
)
from worker.spec_error import SpecError
from worker.training_rows import InMemoryRows

CLASSIFICATION = "classification"
REGRESSION = "regression"
# Next-byte prediction on a text: x and y are (n, context_length) byte tokens, y[i, t] being the
# byte after x[i, t]; a classification over 256 classes at every position.
NEXT_TOKEN = "next_token"

# Keeps the split's random stream apart from every other use of the job's seed.
_SPLIT_STREAM = 0x5B17


@dataclass(frozen=True)
class ValidationSplit:
    """How a job's validation samples were chosen, enough to choose them again outside
    chainrule; the weights' manifest carries it (README, "Rebuilding a model in PyTorch")."""

    rule: str  # one of SPLIT_RULES
    samples: int = 0  # the data set's samples (rows, or a text's windows) before the split
    validation_samples: int = 0
    seed: int = 0  # seeded_permutation: the job's seed
    text_bytes: int = 0  # text_tail: the text's length and its first validation byte
    text_cut: int = 0
    fraction: float = 0.0  # hashed_rows: the job's validation_fraction

    def to_json(self) -> dict[str, Any]:
        """The manifest's "validation_split": the rule, its numbers and, in `how`, the rule
        in words and NumPy."""
        common = {"rule": self.rule, "validation_samples": self.validation_samples}
        if self.rule == SEEDED_PERMUTATION:
            return {**common, "samples": self.samples, "seed": self.seed,
                    "stream": _SPLIT_STREAM,
                    "how": "order = numpy.random.default_rng([seed, stream]).permutation("
                           "samples); validation rows = sorted(order[:validation_samples]), "
                           "training rows = sorted(order[validation_samples:]), as indices "
                           "into the data set's rows in their stored order"}
        if self.rule == TEXT_TAIL:
            return {**common, "text_bytes": self.text_bytes, "cut": self.text_cut,
                    "how": "training windows are cut from the text's bytes [:cut], validation "
                           "windows from [cut:]: non-overlapping windows of context_length "
                           "bytes, each byte's target the byte after it"}
        if self.rule == HASHED_ROWS:
            return {**common, "samples": self.samples, "seed": self.seed,
                    "fraction": self.fraction,
                    "how": "row r (0-based, in the Parquet file's order) is a validation row "
                           "when splitmix64((r + seed * 2**32 + 0x5B17) mod 2**64) < "
                           "fraction * 2**64 (worker/parquet_rows.py's held_out)"}
        if self.rule == GIVEN:
            return {**common, "how": "the data set's own validation part (x_val, y_val)"}
        return {**common, "how": "no validation split"}


SEEDED_PERMUTATION, GIVEN, TEXT_TAIL, NO_VALIDATION = ("seeded_permutation", "given",
                                                       "text_tail", "none")
HASHED_ROWS = "hashed_rows"  # a Parquet data set's (scheduler/parquet_dataset.py)
SPLIT_RULES = (SEEDED_PERMUTATION, GIVEN, TEXT_TAIL, NO_VALIDATION, HASHED_ROWS)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set ready for training; `x_val`/`y_val` are None when there is no validation part.

    `feature_mean`/`feature_std` are set once standardisation has been fitted (on the training
    split), with the shape of the last feature axis.
    """

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    task: str  # "classification" or "regression"
    num_classes: int  # 0 for regression
    feature_shape: tuple[int, ...]  # one sample's shape, x.shape[1:]
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    name: str = ""
    # How x_val was chosen; None until split_and_standardize (or from_text) says.
    validation_split: ValidationSplit | None = None

    def __post_init__(self) -> None:
        _check_pair(self.x, self.y, "x", "y")
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError("x_val and y_val must both be given or both be None")
        if self.x_val is not None and self.y_val is not None:  # both or neither, checked above
            _check_pair(self.x_val, self.y_val, "x_val", "y_val")
            if self.x_val.shape[1:] != self.x.shape[1:]:
                raise ValueError(f"x_val samples have shape {self.x_val.shape[1:]}, x samples "
                                 f"{self.x.shape[1:]}")
        if self.task not in (CLASSIFICATION, REGRESSION, NEXT_TOKEN):
            raise ValueError(f"task must be {CLASSIFICATION!r}, {REGRESSION!r} or "
                             f"{NEXT_TOKEN!r}, got {self.task!r}")
        if tuple(self.feature_shape) != self.x.shape[1:]:
            raise ValueError(f"feature_shape {self.feature_shape} does not match x's samples "
                             f"{self.x.shape[1:]}")

    @property
    def target_shape(self) -> tuple[int, ...]:
        """One target's shape: () for a class label, (k,) for k regression outputs."""
        return self.y.shape[1:]

    @property
    def integer_features(self) -> bool:
        return self.x.dtype.kind in "iu"

    @property
    def shape(self) -> DataShape:
        """What a job is resolved against (worker/resolved_job.py)."""
        return DataShape(len(self.x), 0 if self.x_val is None else len(self.x_val),
                         tuple(self.feature_shape), self.integer_features, self.task,
                         self.num_classes, tuple(self.target_shape))

    def training_rows(self) -> InMemoryRows:
        """What the replicas read their micro-batches from: these arrays, whole."""
        return InMemoryRows(self.x, self.y)

    @property
    def training_row_groups(self) -> tuple[int, ...]:
        """Training samples per row group, for a windowed shuffle; none for arrays (one
        permutation of every sample)."""
        return ()

    def transform(self, x: np.ndarray) -> np.ndarray:
        """New features (validation, test, serving) through the transform fitted on training:
        the same standardisation and the same dtype as `self.x`."""
        x = np.asarray(x)
        if self.integer_features:
            return x.astype(np.int64, copy=False)
        return apply_standardization(x, self.feature_mean, self.feature_std, self.x.dtype)


def _check_pair(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> None:
    if x.ndim < 2:
        raise ValueError(f"{x_name} must have a sample axis and feature axes, got {x.shape}")
    if len(x) != len(y):
        raise ValueError(f"{x_name} has {len(x)} samples but {y_name} has {len(y)}")


def from_arrays(x: Any, y: Any, x_val: Any = None, y_val: Any = None, *, name: str = "",
                dtype: Any = np.float32) -> Dataset:
    """A Dataset from plain arrays (an upload, a test): integer labels make a classification
    task with classes 0..max, float labels a regression task with targets of shape (n, k)."""
    x = _features(np.asarray(x), dtype)
    y = np.asarray(y)
    if y.dtype.kind in "iub":
        if y.ndim != 1:
            raise ValueError(f"class labels must be one per sample, shape (n,), got {y.shape}")
        labels = [y] + ([np.asarray(y_val)] if y_val is not None else [])
        if any(part.size and part.min() < 0 for part in labels):
            raise ValueError("class labels must be >= 0")
        num_classes = int(max(part.max() for part in labels if part.size) + 1) if y.size else 0
        task, targets = CLASSIFICATION, (lambda t: np.asarray(t).astype(np.int64))
    elif y.dtype.kind == "f":
        num_classes = 0
        task = REGRESSION

        def targets(t: Any) -> np.ndarray:
            t = np.asarray(t, dtype=dtype)
            return t.reshape(len(t), 1) if t.ndim == 1 else t
    else:
        raise ValueError(f"labels must be integers (classes) or floats (regression), "
                         f"got {y.dtype}")
    return Dataset(
        x=x, y=targets(y),
        x_val=None if x_val is None else _features(np.asarray(x_val), dtype),
        y_val=None if y_val is None else targets(y_val),
        task=task, num_classes=num_classes, feature_shape=x.shape[1:], name=name,
    )


def _features(x: np.ndarray, dtype: Any) -> np.ndarray:
    if x.dtype.kind in "iub":
        return x.astype(np.int64)  # tokens: an embedding looks them up, nothing rescales them
    if x.dtype.kind != "f":
        raise ValueError(f"features must be numbers, got {x.dtype}")
    return x.astype(dtype)


# --- built-in data sets ----------------------------------------------------------------------


def _sklearn(loader_name: str) -> Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]:
    def load(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        import sklearn.datasets  # imported on use: the service starts faster without it

        x, y = getattr(sklearn.datasets, loader_name)(return_X_y=True)
        return x, y

    return load


def _digits_images(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as one-channel images, (n, 1, 8, 8): for conv2d layers."""
    import sklearn.datasets

    digits = sklearn.datasets.load_digits()
    return digits.images[:, None, :, :], digits.target


def _spirals(rng: np.random.Generator, n: int = 1000, turns: float = 1.5,
             noise: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved spirals, one per class: the second is the first turned by 180 degrees.
    Not linearly separable, so it needs hidden layers."""
    y = np.arange(n) % 2
    t = np.sqrt(rng.random(n))  # sqrt: samples spread evenly along the arm, not bunched inside
    angle = t * turns * 2 * np.pi + np.pi * y
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
    return x + noise * rng.standard_normal(x.shape), y


def _xor(rng: np.random.Generator, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Points in [-1, 1]^2, class 1 where exactly one coordinate is positive."""
    x = rng.uniform(-1.0, 1.0, size=(n, 2))
    return x, ((x[:, 0] > 0) != (x[:, 1] > 0)).astype(np.int64)


def _parity(rng: np.random.Generator, n: int = 2000,
            length: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of `length` bits, x (n, length, 1) floats; the class is the parity of the
    number of ones. Every bit matters to the answer, so it takes a memory of the whole
    sequence (a recurrent layer)."""
    bits = rng.integers(0, 2, size=(n, length))
    return bits[:, :, None].astype(np.float64), bits.sum(axis=1) % 2


def _sequence_sum(rng: np.random.Generator, n: int = 2000,
                  length: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of `length` digit tokens, x (n, length) int64; class 1 when their sum is at
    least its expected value 4.5 * length (about half the samples). For embedding + RNN."""
    tokens = rng.integers(0, 10, size=(n, length))
    return tokens, (tokens.sum(axis=1) >= 4.5 * length).astype(np.int64)


_LOADERS: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "sklearn:digits": _sklearn("load_digits"),
    "sklearn:digits_images": _digits_images,
    "sklearn:iris": _sklearn("load_iris"),
    "sklearn:wine": _sklearn("load_wine"),
    "sklearn:breast_cancer": _sklearn("load_breast_cancer"),
    "sklearn:diabetes": _sklearn("load_diabetes"),
    "synthetic:spirals": _spirals,
    "synthetic:xor": _xor,
    "synthetic:parity": _parity,
    "synthetic:sequence_sum": _sequence_sum,
}
_REGRESSION_SETS = {"sklearn:diabetes"}




def _python_help_text() -> bytes:
    """The text of Python's own help() topics (pydoc_data, shipped with every CPython): about
    450 KB of English prose and examples, a corpus no download is needed for."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


# Built-in texts, for language models (data.context_length says how they are cut).
_TEXTS: dict[str, Callable[[], bytes]] = {
    "text:python_help": _python_help_text,
}

BUILTIN_DATASETS: tuple[str, ...] = tuple(_LOADERS) + tuple(_TEXTS)


def is_builtin(name: str) -> bool:
    return name in _LOADERS or name in _TEXTS


def is_builtin_text(name: str) -> bool:
    return name in _TEXTS


@functools.cache
def builtin_text(name: str) -> bytes:
    return _TEXTS[name]()


def text_shape(text_bytes: int) -> DataShape:
    """A text's shape before a spec cuts it into windows (resolve() does, by context_length)."""
    return DataShape(0, 0, (), True, NEXT_TOKEN, BYTE_VOCABULARY, (), text_bytes=text_bytes)


# scikit-learn's packaged sets, whose shapes are fixed: known without importing scikit-learn,
# which costs over a second of CPU, most of what a refused `chainrule train` would take.
# tests/scheduler/test_datasets.py checks each against a real load.
_PACKAGED_SHAPES = {
    "sklearn:digits": DataShape(1797, 0, (64,), False, CLASSIFICATION, 10, ()),
    "sklearn:digits_images": DataShape(1797, 0, (1, 8, 8), False, CLASSIFICATION, 10, ()),
    "sklearn:iris": DataShape(150, 0, (4,), False, CLASSIFICATION, 3, ()),
    "sklearn:wine": DataShape(178, 0, (13,), False, CLASSIFICATION, 3, ()),
    "sklearn:breast_cancer": DataShape(569, 0, (30,), False, CLASSIFICATION, 2, ()),
    "sklearn:diabetes": DataShape(442, 0, (10,), False, REGRESSION, 0, (1,)),
}


@functools.cache
def builtin_shape(name: str) -> DataShape:
    """A built-in's shape, which does not depend on the seed (synthetic sets only redraw
    values): scikit-learn's from the table above, a text's its length, any other loaded once
    per name."""
    if name in _TEXTS:
        return text_shape(len(builtin_text(name)))
    return _PACKAGED_SHAPES.get(name) or load_builtin(name, 0).shape


def load_builtin(name: str, seed: int = 0, dtype: Any = np.float32) -> Dataset:
    """A built-in data set by name ("sklearn:digits", "synthetic:spirals", ...), with no
    validation part (split_and_standardize makes one). Synthetic sets are drawn from `seed`:
    the same seed gives the same arrays."""
    loader = _LOADERS.get(name)
    if loader is None:
        raise SpecError("data.dataset", f"unknown built-in data set {name!r}; built-ins are: "
                                        f"{', '.join(BUILTIN_DATASETS)}")
    x, y = loader(np.random.default_rng(seed))
    if name in _REGRESSION_SETS:
        y = np.asarray(y, dtype=np.float64)
    else:
        y = np.asarray(y).astype(np.int64)
    return from_arrays(x, y, name=name, dtype=dtype)


# --- text ---------------------------------------------------------------------------------------


def from_text(text: bytes, context_length: int, validation_fraction: float, *,
              name: str = "") -> Dataset:
    """Byte-level windows of a text for next-token prediction: window i holds the bytes
    [i*T, (i+1)*T) as x and the bytes one further as y (T = context_length), so each of its T
    positions predicts the next byte. No tokenizer: the vocabulary is the 256 byte values.

    The validation split is the text's last `validation_fraction`, cut before the windows are
    (`text_windows`): its bytes, targets included, never appear in a training window, which
    random windows drawn from one text could not promise.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise SpecError("data.validation_fraction",
                        f"must be in [0, 1), got {validation_fraction}")
    windows = text_windows(len(text), context_length, validation_fraction)
    tokens = np.frombuffer(text, dtype=np.uint8)
    x, y = _windows(tokens[:windows.cut], context_length)
    x_val = y_val = None
    if validation_fraction > 0:
        x_val, y_val = _windows(tokens[windows.cut:], context_length)
    split = ValidationSplit(TEXT_TAIL, len(x) + (0 if x_val is None else len(x_val)),
                            0 if x_val is None else len(x_val), text_bytes=len(text),
                            text_cut=windows.cut)
    return Dataset(x=x, y=y, x_val=x_val, y_val=y_val, task=NEXT_TOKEN,
                   num_classes=BYTE_VOCABULARY, feature_shape=x.shape[1:], name=name,
                   validation_split=split)


def _windows(tokens: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of `length` tokens and, for each, the tokens one step later."""
    count = (len(tokens) - 1) // length
    usable = tokens[:count * length + 1].astype(np.int64)
    return usable[:-1].reshape(count, length), usable[1:].reshape(count, length)


# --- validation split and standardisation ------------------------------------------------------


def split_and_standardize(dataset: Dataset, validation_fraction: float, standardize: bool,
                          seed: int, dtype: Any = None) -> Dataset:
    """Hold out `validation_fraction` of the samples (seeded; only when the data set has no
    validation part), then standardise float features with the training split's statistics.

    Per feature (the last axis; for sequences, over all samples and time steps), the training
    split gets mean 0 and standard deviation 1; a constant feature is only centred (its
    standard deviation is taken as 1, as scikit-learn's StandardScaler does). `dtype` (default:
    the data set's float type) is the type of the returned float features.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise SpecError("data.validation_fraction",
                        f"must be in [0, 1), got {validation_fraction}")
    x, y, x_val, y_val = dataset.x, dataset.y, dataset.x_val, dataset.y_val
    split = dataset.validation_split
    if x_val is None and validation_fraction > 0:
        train, held_out = _split_indices(len(x), validation_fraction, seed)
        split = ValidationSplit(SEEDED_PERMUTATION, len(x), len(held_out), seed)
        x, y, x_val, y_val = x[train], y[train], x[held_out], y[held_out]
    elif split is None:
        split = (ValidationSplit(NO_VALIDATION, len(x)) if x_val is None else
                 ValidationSplit(GIVEN, len(x) + len(x_val), len(x_val)))

    if x.dtype.kind != "f":  # integer tokens: nothing to standardise or convert
        return replace(dataset, x=x, y=y, x_val=x_val, y_val=y_val, validation_split=split)
    dtype = np.dtype(dtype) if dtype is not None else x.dtype
    mean, std = _fit_standardization(x) if standardize else (None, None)
    regression = dataset.task == REGRESSION
    return replace(
        dataset,
        x=apply_standardization(x, mean, std, dtype),
        y=y.astype(dtype) if regression else y,
        x_val=None if x_val is None else apply_standardization(x_val, mean, std, dtype),
        y_val=y_val.astype(dtype) if regression and y_val is not None else y_val,
        feature_mean=mean,
        feature_std=std,
        validation_split=split,
    )


def _split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) sample indices, each sorted, disjoint, covering range(n)."""
    held_out_count = validation_split_size(n, fraction)  # the size the job was resolved with
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return np.sort(order[held_out_count:]), np.sort(order[:held_out_count])


def _fit_standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each feature over the training samples: of the last axis
    for vectors and sequences, of each channel for images (samples (channels, height, width),
    statistics of shape (channels, 1, 1), as torchvision's Normalize)."""
    images = x.ndim == 4
    axes = (0, 2, 3) if images else tuple(range(x.ndim - 1))
    values = x.astype(np.float64)
    mean = values.mean(axis=axes, keepdims=images)[0] if images else values.mean(axis=axes)
    std = values.std(axis=axes, keepdims=images)[0] if images else values.std(axis=axes)
    return usable_statistics(mean, std)


def usable_statistics(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fitted (mean, std) made safe to divide by: a constant feature's standard deviation is
    taken as 1 (it is only centred); SpecError when the features held NaN or infinities."""
    std = std.copy()
    std[~(std > 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0))] = 1.0
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise SpecError("data.dataset", "the features contain NaN or infinite values")
    return mean, std


def apply_standardization(x: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None,
                           dtype: Any) -> np.ndarray:
    """(x - mean) / std computed in float64, then stored as `dtype`; just the cast when no
    standardisation was fitted."""
    if mean is None:
        return x.astype(dtype)
    return ((x.astype(np.float64) - mean) / std).astype(dtype)
