"""A SUCCEEDED job's model put to use on the service process: Predict, EvaluateJob, Generate.

The model is rebuilt from the job's spec, the input shape its manifest records (for a model
saved before the manifest did: the spec resolved against its data set, as in training) and its
stored weights; new rows go through the same
standardisation as the training rows (the manifest's feature_mean/feature_std, computed in
float64, then cast to the job's dtype: `scheduler.datasets.apply_standardization`).

Bounds, because this runs on the RPC threads of the API process:
- Predict takes at most MAX_PREDICT_ROWS rows and MAX_PREDICT_VALUES values per request,
  also from a file sent with it (a CSV or .npz, parsed by services/uploads.py with the
  server's upload caps, the values counted before they are held);
- forward passes run MAX_BATCH rows at a time; EvaluateJob also reads the upload MAX_BATCH
  rows at a time, so its memory stays at one batch's rows and activations whatever the data
  set's size;
- Generate writes at most MAX_GENERATE_TOKENS bytes after a prompt of at most
  MAX_PROMPT_BYTES;
- at most CACHED_MODELS loaded models are kept (least recently used dropped first).
"""

from __future__ import annotations

import codecs
import json
import math
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chainrule.v1 import job_pb2
from scheduler.datasets import apply_standardization
from scheduler.job_states import SUCCEEDED
from scheduler.storage import load_weights, manifest_path
from services import npz_archive, uploads
from services.errors import FailedPrecondition, InvalidArgument
from services.job_inputs import data_shape
from services.jobs import JobService
from services.store import DatasetRecord
from services.validation import upload_name
from worker.backprop import nn
from worker.backprop.tensor import Tensor, no_grad
from worker.model_builder import (
    ModelPlan,
    build_loss,
    build_planned_model,
    plan_model,
    resolve_dtype,
)
from worker.resolved_job import resolve
from worker.text_sampling import BYTE_VALUES, generate_bytes, longest_window

MAX_PREDICT_ROWS = 4096
MAX_PREDICT_VALUES = 1 << 19  # 4 MiB of doubles: well under gRPC's 8 MiB message limit
MAX_BATCH = 256
MAX_GENERATE_TOKENS = 4096
DEFAULT_GENERATE_TOKENS = 128
MAX_PROMPT_BYTES = 4096
CACHED_MODELS = 4

CLASSIFICATION_LOSSES = ("cross_entropy", "binary_cross_entropy_with_logits")
LANGUAGE_MODEL_LOSS = "next_token_cross_entropy"


@dataclass
class LoadedModel:
    job_id: str
    model: nn.Sequential
    loss: str
    dtype: np.dtype
    feature_shape: tuple[int, ...]
    integer_features: bool
    feature_mean: np.ndarray | None
    feature_std: np.ndarray | None
    output_width: int
    # Forward passes of one model one at a time: modules keep per-call state (eval mode).
    lock: threading.Lock

    @property
    def vocabulary(self) -> float:
        """How many token ids the model's first embedding takes (inf without one)."""
        for module in self.model.modules():
            if isinstance(module, nn.Embedding):
                return module.num_embeddings
        return math.inf

    @property
    def multi_label(self) -> bool:
        return self.loss == "binary_cross_entropy_with_logits" and self.output_width > 1

    @property
    def task(self) -> str:
        if self.loss in CLASSIFICATION_LOSSES:
            return "classification"
        if self.loss == LANGUAGE_MODEL_LOSS:
            return "next_token"
        return "regression"

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """Raw rows as the model saw its training rows."""
        if self.integer_features:
            return x.astype(np.int64)
        return apply_standardization(x, self.feature_mean, self.feature_std, self.dtype)

    def forward(self, x: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(start, outputs) per batch of at most MAX_BATCH standardised rows."""
        with self.lock, no_grad():
            self.model.eval()
            for start in range(0, len(x), MAX_BATCH):
                yield start, self.model(Tensor(self.standardize(x[start:start + MAX_BATCH]))).data


@dataclass(frozen=True)
class RowsFile:
    """A file of rows sent with a Predict request (RowsFile in the proto)."""

    format: str  # "csv" or "npz"
    data: bytes
    label_column: str = ""


@dataclass(frozen=True)
class Predictions:
    task: str
    samples: int
    classes: np.ndarray | None = None  # (n,) int64
    probabilities: np.ndarray | None = None  # (n, k)
    values: np.ndarray | None = None  # (n, *value_shape)


@dataclass(frozen=True)
class Evaluation:
    samples: int
    loss: float
    accuracy: float | None
    confusion_matrix: np.ndarray | None  # (k, k): row the true class, column the predicted


class ModelServing:
    def __init__(self, service: JobService, cached_models: int = CACHED_MODELS):
        self.service = service
        self.cached_models = cached_models
        self._cache: OrderedDict[tuple[str, str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    # --- the RPCs ----------------------------------------------------------------------------

    def predict(self, tenant: str, job_id: str, rows: tuple[list[float], list[int]] | None,
                dataset: str = "", file: RowsFile | None = None) -> Predictions:
        """The model's predictions on `rows` (values, shape), an upload's x (`dataset`) or the
        rows of a `file` sent with the request."""
        loaded = self.load(tenant, job_id)
        if loaded.task == "next_token":
            raise FailedPrecondition(f"job_id: job {job_id} is a language model; use Generate")
        if rows is not None:
            x = _rows(rows[0], rows[1], loaded, "rows")
        elif file is not None:
            if len(file.data) > self.service.max_upload_bytes:
                raise InvalidArgument("file.data", f"{len(file.data)} bytes is over this "
                                                   f"server's upload limit of "
                                                   f"{self.service.max_upload_bytes}")
            x = uploads.read_rows(file.data, file.format, file.label_column,
                                  self.service.upload_limits, max_values=MAX_PREDICT_VALUES,
                                  field="file")
            if len(x) > MAX_PREDICT_ROWS:
                raise InvalidArgument("file.data", f"1 to {MAX_PREDICT_ROWS} rows per request, "
                                                   f"got {len(x)}")
            if file.format == "csv":
                x = _samples_of_flat_rows(x, loaded)
            _check_features(x, loaded, "file")
        else:
            x = self._dataset_arrays(tenant, dataset, "dataset")[0]
            _check_features(x, loaded, "dataset")
        outputs = np.concatenate([out for _, out in loaded.forward(x)]) if len(x) else None
        assert outputs is not None
        return _predictions(loaded, outputs)

    def evaluate(self, tenant: str, job_id: str, dataset: str) -> Evaluation:
        """Loss (and accuracy and confusion matrix for a classifier) of the job's model on an
        upload, its training and validation parts, read MAX_BATCH rows at a time from the
        stored file: memory stays at one batch's rows and activations, whatever its size."""
        loaded = self.load(tenant, job_id)
        if loaded.task == "next_token":
            raise FailedPrecondition(f"job_id: job {job_id} is a language model; EvaluateJob "
                                     f"takes array data sets")
        job = self.service.get(tenant, job_id)
        loss = build_loss(job.spec, "sum")
        total, correct, samples = 0.0, 0, 0
        single_class = loaded.task == "classification" and not loaded.multi_label
        classes = _class_count(loaded) if single_class else 0
        confusion = np.zeros((classes, classes), dtype=np.int64) if classes else None
        for x, y in self._dataset_batches(tenant, dataset, "dataset", loaded):
            _check_features(x, loaded, "dataset")
            if single_class and (y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= classes):
                raise InvalidArgument("dataset", f"the labels must be classes 0 to "
                                                 f"{classes - 1} for this model")
            for _, out in loaded.forward(x):  # one pass: x is at most MAX_BATCH rows
                total += float(loss(Tensor(out), y).data)
                correct += loss.correct(out, y)
                if confusion is not None:
                    np.add.at(confusion, (y.reshape(-1), _classes(loaded, out)), 1)
            samples += len(x)
        # Multi-label: the share of right labels (each sample has output_width of them).
        per_sample = loaded.output_width if loaded.multi_label else 1
        accuracy = (correct / (samples * per_sample)
                    if loaded.task == "classification" else None)
        return Evaluation(samples, total / samples, accuracy, confusion)

    def generate(self, tenant: str, job_id: str, prompt: str, temperature: float, top_k: int,
                 max_tokens: int, seed: int) -> Iterator[bytes]:
        """The sampled bytes after `prompt`, one at a time (each draw after the previous one
        was sent, so a cancelled stream stops the work)."""
        tokens = list(prompt.encode("utf-8"))
        if not tokens:
            raise InvalidArgument("prompt", "must be at least one byte")
        if len(tokens) > MAX_PROMPT_BYTES:
            raise InvalidArgument("prompt", f"must be at most {MAX_PROMPT_BYTES} bytes, got "
                                            f"{len(tokens)}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidArgument("temperature", f"must be >= 0, got {temperature}")
        if top_k > BYTE_VALUES:
            raise InvalidArgument("top_k", f"must be at most {BYTE_VALUES}, got {top_k}")
        if max_tokens > MAX_GENERATE_TOKENS:
            raise InvalidArgument("max_tokens", f"must be at most {MAX_GENERATE_TOKENS}, got "
                                                f"{max_tokens}")
        count = max_tokens or DEFAULT_GENERATE_TOKENS
        loaded = self.load(tenant, job_id)
        if loaded.task != "next_token":
            raise FailedPrecondition(f"job_id: job {job_id} is not a language model (loss "
                                     f"{loaded.loss}); use Predict")
        window = longest_window(loaded.model) or loaded.feature_shape[0]
        for token in generate_bytes(loaded.model, bytes(tokens), count, temperature, seed,
                                    top_k=top_k, context_length=window, lock=loaded.lock):
            yield bytes([token])

    # --- loading -----------------------------------------------------------------------------

    def load(self, tenant: str, job_id: str) -> LoadedModel:
        """The job's model, from the cache when its weights file has not changed."""
        job = self.service.get(tenant, job_id)  # NOT_FOUND for another tenant's job
        if job.state != SUCCEEDED or not job.weights_path:
            raise FailedPrecondition(f"job_id: job {job_id} is {job.state}; only a SUCCEEDED "
                                     f"job has a model")
        path = Path(job.weights_path)
        key = (job_id, str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        loaded = self._build(tenant, job_id, job.spec, path)
        with self._lock:
            self._cache[key] = loaded
            self._cache.move_to_end(key)
            while len(self._cache) > self.cached_models:
                self._cache.popitem(last=False)
        return loaded

    def _build(self, tenant: str, job_id: str, spec: job_pb2.JobSpec,
               path: Path) -> LoadedModel:
        manifest_file = manifest_path(path)
        manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
        plan = self._plan(tenant, job_id, spec, manifest)
        dtype = resolve_dtype(spec)
        model = build_planned_model(plan, dtype, seed=0)
        model.load_state_dict(load_weights(path))
        mean, std = manifest.get("feature_mean"), manifest.get("feature_std")
        return LoadedModel(
            job_id, model, spec.loss, dtype, tuple(plan.input_shape),
            np.dtype(plan.input_dtype).kind in "iu",
            None if mean is None else np.asarray(mean, dtype=np.float64),
            None if std is None else np.asarray(std, dtype=np.float64),
            plan.output_shape[-1], threading.Lock())

    def _plan(self, tenant: str, job_id: str, spec: job_pb2.JobSpec,
              manifest: dict) -> ModelPlan:
        """The model's layer plan: from the input shape the manifest records, or (a model
        saved before it did) from the spec resolved against the job's data set."""
        if manifest.get("input_shape") and manifest.get("input_dtype"):
            return plan_model(spec.model, tuple(manifest["input_shape"]),
                              manifest["input_dtype"])
        shape = data_shape(self.service.store, tenant, spec)
        if shape is None:
            raise FailedPrecondition(f"job_id: the data set {spec.data.dataset!r} job {job_id} "
                                     f"was trained on was deleted, and its model's manifest "
                                     f"predates input_shape: its input shape is not known")
        return resolve(spec, shape).model

    def _dataset_arrays(self, tenant: str, name: str, field: str) -> tuple[np.ndarray,
                                                                          np.ndarray]:
        record = self._array_upload(tenant, name, field)
        arrays = uploads.load_arrays(record.path)
        x, y = arrays["x"], arrays["y"]
        if "x_val" in arrays and "y_val" in arrays:
            x = np.concatenate([x, arrays["x_val"]])
            y = np.concatenate([y, arrays["y_val"]])
        return x, y


    def _dataset_batches(self, tenant: str, name: str, field: str, loaded: LoadedModel,
                         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """An upload's (x, y) rows, MAX_BATCH at a time, its training part then its
        validation part, read from the stored .npz as a stream; its feature shape checked
        against the model's from the headers, before a row is read."""
        record = self._array_upload(tenant, name, field)
        with zipfile.ZipFile(record.path) as archive:
            entries = {entry.key: entry for entry in npz_archive.read_entries(archive)}
            if tuple(entries["x"].shape[1:]) != loaded.feature_shape:
                raise InvalidArgument(f"{field}.shape", f"this model takes samples of shape "
                                                        f"{list(loaded.feature_shape)}, got "
                                                        f"{list(entries['x'].shape[1:])}")
            parts = [("x", "y")] + ([("x_val", "y_val")]
                                    if "x_val" in entries and "y_val" in entries else [])
            blocks = (block for x_key, y_key in parts for block in zip(
                npz_archive.iter_rows(archive, entries[x_key], MAX_BATCH),
                npz_archive.iter_rows(archive, entries[y_key], MAX_BATCH)))
            yield from _in_batches(blocks, MAX_BATCH)

    def _array_upload(self, tenant: str, name: str, field: str) -> DatasetRecord:
        upload = upload_name(name) if name else None
        if not name or upload is None:
            raise InvalidArgument(field, f"must name an upload of yours (npz or csv), got "
                                         f"{name!r}")
        record = self.service.store.get_dataset(tenant, upload)
        if record is None:
            raise InvalidArgument(field, f"no uploaded data set {upload!r}")
        if record.format not in ("npz", "csv"):
            raise InvalidArgument(field, f"{upload!r} is a {record.format} upload; an npz or "
                                         f"csv data set is needed")
        return record


def _in_batches(blocks: Iterator[tuple[np.ndarray, np.ndarray]],
                rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) blocks cut again into batches of `rows` (the last may be less), across the
    parts' boundary: the batches of the parts concatenated, so the figures are those of one
    pass over them, batch for batch."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    held = 0
    for x, y in blocks:
        xs.append(x)
        ys.append(y)
        held += len(x)
        while held >= rows:
            x_all, y_all = np.concatenate(xs), np.concatenate(ys)
            yield x_all[:rows], y_all[:rows]
            xs, ys, held = [x_all[rows:]], [y_all[rows:]], held - rows
    if held:
        yield np.concatenate(xs), np.concatenate(ys)


def _rows(values: list[float], shape: list[int], loaded: LoadedModel, field: str) -> np.ndarray:
    if len(values) > MAX_PREDICT_VALUES:
        raise InvalidArgument(f"{field}.values", f"at most {MAX_PREDICT_VALUES} values per "
                                                 f"request, got {len(values)}")
    if not shape:
        raise InvalidArgument(f"{field}.shape", "required: (samples, *feature shape)")
    if shape[0] < 1 or shape[0] > MAX_PREDICT_ROWS:
        raise InvalidArgument(f"{field}.shape", f"1 to {MAX_PREDICT_ROWS} rows per request, got "
                                                f"{shape[0]}")
    if math.prod(shape) != len(values):
        raise InvalidArgument(f"{field}.values", f"shape {list(shape)} needs "
                                                 f"{math.prod(shape)} values, got {len(values)}")
    x = np.asarray(values, dtype=np.float64).reshape(tuple(shape))
    _check_features(x, loaded, field)
    return x


def _samples_of_flat_rows(x: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """A CSV row is flat: for a model whose samples have several axes (an image's channel,
    row and column), it holds one sample's values in C order, as numpy's reshape reads them
    (sklearn's 8x8 digits are such rows)."""
    if x.ndim == 2 and len(loaded.feature_shape) > 1 \
            and x.shape[1] == math.prod(loaded.feature_shape):
        return x.reshape(len(x), *loaded.feature_shape)
    return x


def _check_features(x: np.ndarray, loaded: LoadedModel, field: str) -> None:
    if tuple(x.shape[1:]) != loaded.feature_shape:
        raise InvalidArgument(f"{field}.shape", f"this model takes samples of shape "
                                                f"{list(loaded.feature_shape)}, got "
                                                f"{list(x.shape[1:])}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InvalidArgument(f"{field}.values", "must be finite numbers (no NaN or inf)")
    if loaded.integer_features and (np.any(x != np.round(x)) or np.any(x < 0)
                                    or np.any(x >= loaded.vocabulary)):
        raise InvalidArgument(f"{field}.values", f"this model takes token ids: whole numbers "
                                                 f"from 0 to {loaded.vocabulary - 1}")


def _class_count(loaded: LoadedModel) -> int:
    return 2 if loaded.loss == "binary_cross_entropy_with_logits" else loaded.output_width


def _classes(loaded: LoadedModel, outputs: np.ndarray) -> np.ndarray:
    if loaded.loss == "binary_cross_entropy_with_logits":
        return (outputs[:, 0] > 0).astype(np.int64)
    return outputs.argmax(axis=-1).astype(np.int64)


def _predictions(loaded: LoadedModel, outputs: np.ndarray) -> Predictions:
    samples = len(outputs)
    if loaded.task != "classification":
        return Predictions("regression", samples, values=outputs.astype(np.float64))
    logits = outputs.astype(np.float64)
    if loaded.loss == "cross_entropy":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
        return Predictions("classification", samples, probabilities.argmax(axis=-1),
                           probabilities)
    positive = 1.0 / (1.0 + np.exp(-logits))
    if logits.shape[-1] == 1:  # one-logit binary: P(class 1) = sigmoid(logit)
        probabilities = np.concatenate([1.0 - positive, positive], axis=-1)
        return Predictions("classification", samples, (logits[:, 0] > 0).astype(np.int64),
                           probabilities)
    # Multi-label: each label's own probability; no single class.
    return Predictions("classification", samples, None, positive)


def utf8_text(chunks: Iterator[bytes]) -> Iterator[str]:
    """Decoded text from a stream of bytes whose characters may span chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
