"""Training on a Parquet file, on real embedded Ray: every replica reads only the row groups
of its own micro-batches, the weights do not depend on the worker count, and a worker's memory
is bounded by the batch and a few row groups, not by the file."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from chainrule.spec_file import load_job_spec
from scheduler.job_runner import JobRunner
from scheduler.parquet_dataset import load_parquet, parquet_shape
from worker.resolved_job import resolve

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SPEC = """
name: parquet
model: {{layers: [{{linear: {{out_features: 32}}}}, {{tanh: {{}}}},
                  {{linear: {{out_features: 10}}}}]}}
loss: cross_entropy
optimizer: {{adamw: {{lr: 0.01}}}}
data: {{dataset: "parquet:{path}", label_column: digit, batch_size: 192, epochs: 2,
       validation_fraction: 0.2, micro_batches: 4}}
seed: 5
"""


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory):
    """scikit-learn's digits as a Parquet file of 18 row groups of 100 rows."""
    x, y = load_digits(return_X_y=True)
    path = tmp_path_factory.mktemp("parquet") / "digits.parquet"
    pq.write_table(pa.table({**{f"pixel{i}": x[:, i] for i in range(64)}, "digit": y}), path,
                   row_group_size=100)
    return path


def prepared(path):
    spec = load_job_spec(SPEC.format(path=path))
    job = resolve(spec, parquet_shape(spec.data, spec.seed))
    return spec, load_parquet(job)


def train(path, workers, **options):
    spec, dataset = prepared(path)
    return JobRunner.for_spec(spec, dataset, workers=workers, **options).run()


@pytest.fixture(scope="module")
def one_worker(local_ray, digits_parquet):
    return train(digits_parquet, 1)


@pytest.mark.parametrize("workers, transport", [(2, "auto"), (4, "object_store")])
def test_two_and_four_workers_read_their_own_rows_and_give_bitwise_one_workers_weights(
        one_worker, digits_parquet, workers, transport):
    result = train(digits_parquet, workers, transport=transport)
    for key, value in one_worker.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def test_a_parquet_job_learns_and_uses_every_training_row_once_an_epoch(one_worker,
                                                                       digits_parquet):
    _, dataset = prepared(digits_parquet)
    per_epoch: dict[int, int] = {}
    for record in one_worker.history.steps:
        per_epoch[record.epoch] = per_epoch.get(record.epoch, 0) + record.samples
    assert per_epoch == {0: dataset.shape.samples, 1: dataset.shape.samples}
    assert one_worker.final_evaluation.accuracy > 0.85
    assert one_worker.validation_split.rule == "hashed_rows"
