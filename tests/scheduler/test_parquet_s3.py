"""A Parquet data set in object storage (s3://bucket/key), read through pyarrow.fs from a real
S3-compatible server on loopback (moto's server mode), with the endpoint and credentials taken
from the environment as every S3 client does: the same shape, statistics and rows as the same
file on disk."""

import os
import socket

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from chainrule.spec_file import load_job_spec
from scheduler.parquet_dataset import load_parquet, parquet_shape
from worker.resolved_job import resolve
from worker.spec_error import SpecError

SPEC = """
model: {{layers: [{{linear: {{out_features: 4}}}}]}}
loss: cross_entropy
optimizer: {{sgd: {{lr: 0.1}}}}
data: {{dataset: "parquet:{location}", label_column: label, batch_size: 16, epochs: 1,
       validation_fraction: 0.25}}
seed: 2
"""


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port, named by the environment for the test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as environment:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_REGION": "us-east-1"}.items():
            environment.setenv(name, value)
        pyarrow.fs.S3FileSystem(endpoint_override=endpoint,
                                allow_bucket_creation=True).create_dir("data")
        yield
    server.stop()


@pytest.fixture(scope="module")
def local_and_s3(s3_server, tmp_path_factory):
    rng = np.random.default_rng(3)
    table = pa.table({"a": rng.standard_normal(400), "b": rng.standard_normal(400),
                      "label": rng.integers(0, 4, 400)})
    local = tmp_path_factory.mktemp("s3") / "rows.parquet"
    pq.write_table(table, local, row_group_size=50)
    filesystem, path = pyarrow.fs.FileSystem.from_uri("s3://data/rows.parquet")
    pq.write_table(table, path, filesystem=filesystem, row_group_size=50)
    return str(local), "s3://data/rows.parquet"


def prepared(location):
    spec = load_job_spec(SPEC.format(location=location))
    job = resolve(spec, parquet_shape(spec.data, spec.seed))
    return job, load_parquet(job)


def test_an_s3_object_gives_the_local_files_shape_statistics_validation_and_rows(local_and_s3):
    (local_job, local), (s3_job, remote) = map(prepared, local_and_s3)
    assert s3_job.training_samples == local_job.training_samples
    assert remote.shape == local.shape
    assert np.array_equal(remote.feature_mean, local.feature_mean)
    assert np.array_equal(remote.x_val, local.x_val)
    indices = np.arange(0, local.shape.samples, 7)
    for mine, theirs in zip(remote.training_rows().take(indices, 0),
                            local.training_rows().take(indices, 0)):
        assert np.array_equal(mine, theirs)


def test_a_missing_object_is_refused_naming_data_dataset(s3_server):
    spec = load_job_spec(SPEC.format(location="s3://data/missing.parquet"))
    with pytest.raises(SpecError) as refused:
        parquet_shape(spec.data, spec.seed)
    assert refused.value.field_path == "data.dataset"
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
