"""One manifest beside every weights file: `chainrule train -o` and the service's download write
the same one for the same job, feature standardisation included (a served model needs it)."""

from __future__ import annotations

import json

import pytest

from chainrule.client import state_name
from chainrule.spec_file import dump_job_spec
from services import cli
from tests.services.helpers import iris_spec, wait_until_done

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_the_train_command_and_the_service_write_the_same_manifest(client, tmp_path):
    spec = iris_spec(epochs=3)
    job = client.submit(spec)
    assert state_name(wait_until_done(client, job.id).state) == "SUCCEEDED"
    served = json.loads(client.download(job.id, tmp_path / "served.safetensors").manifest_json)

    spec_path = tmp_path / "iris.yaml"
    spec_path.write_text(dump_job_spec(spec))
    output = tmp_path / "local.safetensors"
    assert cli.main(["train", str(spec_path), "-o", str(output)]) == 0
    local = json.loads((tmp_path / "local.safetensors.json").read_text())

    assert served.pop("job_id") == job.id  # the only difference: the service's job id
    assert local == served
    assert len(local["feature_mean"]) == len(local["feature_std"]) == 4  # iris has 4 features
    assert local["steps"] == 3 * 4 and local["validation_accuracy"] is not None
    # The layer plan and the split rule, for rebuilding in PyTorch (README; followed by
    # tests/scheduler/test_rebuilding_in_pytorch.py).
    assert [(layer["kind"], layer["torch"], layer["output_shape"]) for layer in local["layers"]] \
        == [("linear", "torch.nn.Linear", [8]), ("relu", "torch.nn.ReLU", [8]),
            ("linear", "torch.nn.Linear", [3])]
    assert local["layers"][0]["parameters"] == {"0.weight": [8, 4], "0.bias": [8]}
    split = local["validation_split"]
    assert (split["rule"], split["samples"], split["validation_samples"], split["seed"]) == (
        "seeded_permutation", 150, 30, 0)
