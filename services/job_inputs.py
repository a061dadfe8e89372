"""What a job reads, looked up within its tenant: the shape of its data set and the header of
the weights its model starts from. Validation resolves a spec against these at submit, and the
lifecycle host again when the job starts (the upload may have been deleted meanwhile)."""

from __future__ import annotations

from chainrule.v1 import job_pb2
from scheduler.datasets import builtin_shape, text_shape
from scheduler.parquet_dataset import is_parquet, parquet_shape
from services import uploads
from services.errors import InvalidArgument
from services.parquet_upload import PARQUET_UPLOAD_PREFIX, parquet_upload_name
from services.store import DatasetRecord, Store
from services.validation import upload_name
from worker.initial_weights import WeightsShape, weights_reference
from worker.resolved_job import DataShape
from worker.spec_error import SpecError


def data_shape(store: Store, tenant: str, spec: job_pb2.JobSpec) -> DataShape | None:
    """The shape of the data set a spec names: a built-in one's, the tenant's upload's from
    the store's row, or an uploaded Parquet file's for the spec's columns and split (from the
    file's footer). None when there is no such data set (validation names the field)."""
    dataset = spec.data.dataset
    if is_parquet(dataset):
        record = parquet_upload(store, tenant, dataset)
        if record is None:
            return None
        try:
            return parquet_shape(spec.data, spec.seed, location=record.path)
        except SpecError as error:
            raise InvalidArgument(error.field_path, error.message) from error
    name = upload_name(dataset)
    if name is None:
        return builtin_shape(dataset) if dataset else None
    record = store.get_dataset(tenant, name)
    if record is None:
        return None
    if record.format == "safetensors":
        raise InvalidArgument("data.dataset", f"{name!r} is a safetensors upload: weights "
                                              f"for model.init_from, not a data set")
    if record.format == "parquet":
        raise InvalidArgument("data.dataset", f"{name!r} is a Parquet upload: name it as "
                                              f"\"{PARQUET_UPLOAD_PREFIX}{name}\", with "
                                              f"data.label_column")
    if record.format == "text":  # a text's samples are its bytes (resolve cuts windows)
        return text_shape(record.size_bytes)
    target_shape = record.target_shape
    if target_shape is None:  # a row from before the store kept it: the file's header
        target_shape = (() if record.task == "classification"
                        else uploads.stored_target_shape(record.path))
    return DataShape(record.samples, record.validation_samples, record.feature_shape,
                     record.integer_features, record.task, record.num_classes, target_shape)


def parquet_upload(store: Store, tenant: str, dataset: str) -> DatasetRecord | None:
    """The tenant's Parquet upload a `parquet:upload:NAME` data set names (None: no upload of
    that name); InvalidArgument for any other `parquet:` location, which the service does not
    read (a local path is the server's file, and object storage its credentials), or for an
    upload of another format."""
    name = parquet_upload_name(dataset)
    if name is None:
        raise InvalidArgument("data.dataset", f"the service reads uploaded Parquet files only "
                                              f"(upload it, then name it as "
                                              f"\"{PARQUET_UPLOAD_PREFIX}NAME\"), or train "
                                              f"{dataset!r} with chainrule train")
    record = store.get_dataset(tenant, name)
    if record is not None and record.format != "parquet":
        raise InvalidArgument("data.dataset", f"{name!r} is a {record.format} upload, not a "
                                              f"Parquet file: name it as \"upload:{name}\"")
    return record


def weights_shape(store: Store, tenant: str, spec: job_pb2.JobSpec) -> WeightsShape | None:
    """The header of the upload a spec's model.init_from names (None without init_from),
    from the store's row: InvalidArgument when there is no such upload of weights."""
    if not spec.model.init_from:
        return None
    try:
        kind, name = weights_reference(spec.model.init_from)
    except SpecError as error:
        raise InvalidArgument(error.field_path, error.message) from error
    if kind == "file":
        raise InvalidArgument("model.init_from", "the service reads no local files: upload "
                                                 "the weights (chainrule upload "
                                                 "FILE.safetensors --format safetensors) "
                                                 "and name them as upload:NAME")
    record = store.get_dataset(tenant, name)
    if record is None:
        raise InvalidArgument("model.init_from", f"no uploaded weights {name!r}")
    if record.format != "safetensors" or record.tensors is None:
        raise InvalidArgument("model.init_from", f"{name!r} is a {record.format} upload, not "
                                                 f"weights (upload a .safetensors file with "
                                                 f"--format safetensors)")
    return WeightsShape(record.path, record.tensors, name)


def initialises_from(spec: job_pb2.JobSpec, name: str) -> bool:
    """Whether the spec's model starts from the weights upload `name`."""
    try:
        return bool(spec.model.init_from) and weights_reference(spec.model.init_from) == (
            "upload", name)
    except SpecError:
        return False
