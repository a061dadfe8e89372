"""Built-in data sets, the seeded validation split, and standardisation fitted on training only."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule.spec_file import SpecError, load_job_spec
from scheduler.datasets import (
    BUILTIN_DATASETS,
    CLASSIFICATION,
    NEXT_TOKEN,
    REGRESSION,
    builtin_shape,
    builtin_text,
    from_arrays,
    from_text,
    load_builtin,
    split_and_standardize,
)
from worker.resolved_job import resolve

# name -> (samples, feature shape, task, classes, feature dtype kind)
EXPECTED = {
    "sklearn:digits": (1797, (64,), CLASSIFICATION, 10, "f"),
    "sklearn:digits_images": (1797, (1, 8, 8), CLASSIFICATION, 10, "f"),
    "sklearn:iris": (150, (4,), CLASSIFICATION, 3, "f"),
    "sklearn:wine": (178, (13,), CLASSIFICATION, 3, "f"),
    "sklearn:breast_cancer": (569, (30,), CLASSIFICATION, 2, "f"),
    "sklearn:diabetes": (442, (10,), REGRESSION, 0, "f"),
    "synthetic:spirals": (1000, (2,), CLASSIFICATION, 2, "f"),
    "synthetic:xor": (1000, (2,), CLASSIFICATION, 2, "f"),
    "synthetic:parity": (2000, (10, 1), CLASSIFICATION, 2, "f"),
    "synthetic:sequence_sum": (2000, (12,), CLASSIFICATION, 2, "i"),
}


TEXTS = {"text:python_help"}


def test_every_builtin_is_covered_by_this_table():
    assert set(BUILTIN_DATASETS) == set(EXPECTED) | TEXTS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_loads_with_expected_shapes_types_and_classes(name):
    samples, feature_shape, task, classes, kind = EXPECTED[name]
    data = load_builtin(name, seed=0)
    assert data.x.shape == (samples, *feature_shape)
    assert data.feature_shape == feature_shape
    assert data.task == task and data.num_classes == classes
    assert data.x_val is None and data.y_val is None
    assert data.x.dtype.kind == kind
    if kind == "f":
        assert data.x.dtype == np.float32
    if task == CLASSIFICATION:
        assert data.y.shape == (samples,) and data.y.dtype == np.int64
        assert set(np.unique(data.y)) == set(range(classes))  # every class present
    else:
        assert data.y.shape == (samples, 1) and data.y.dtype == np.float32


def test_float64_is_available_for_float64_jobs():
    assert load_builtin("sklearn:iris", dtype=np.float64).x.dtype == np.float64


@pytest.mark.parametrize("name", ["synthetic:spirals", "synthetic:xor", "synthetic:parity",
                                  "synthetic:sequence_sum"])
def test_synthetic_sets_are_deterministic_per_seed(name):
    a, b, c = load_builtin(name, 3), load_builtin(name, 3), load_builtin(name, 4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


def test_synthetic_labels_follow_their_rules():
    xor = load_builtin("synthetic:xor", 0)
    np.testing.assert_array_equal(xor.y, (xor.x[:, 0] > 0) != (xor.x[:, 1] > 0))
    parity = load_builtin("synthetic:parity", 0)
    np.testing.assert_array_equal(parity.y, parity.x[:, :, 0].sum(axis=1).astype(int) % 2)
    tokens = load_builtin("synthetic:sequence_sum", 0)
    assert tokens.x.min() >= 0 and tokens.x.max() <= 9
    np.testing.assert_array_equal(tokens.y, tokens.x.sum(axis=1) >= 54)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_builtin_shape_known_without_loading_is_the_shape_it_loads_with(name):
    assert builtin_shape(name) == load_builtin(name, seed=7).shape


def test_unknown_builtin_is_a_spec_error_on_the_dataset_field():
    with pytest.raises(SpecError) as info:
        load_builtin("sklearn:mnist", 0)
    assert info.value.field_path == "data.dataset"
    assert "sklearn:digits" in info.value.message  # lists what exists


# --- the split -------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete():
    data = from_arrays(np.arange(100.0).reshape(100, 1), np.arange(100) % 3)
    a = split_and_standardize(data, 0.2, standardize=False, seed=7)
    b = split_and_standardize(data, 0.2, standardize=False, seed=7)
    c = split_and_standardize(data, 0.2, standardize=False, seed=8)
    assert len(a.x) == 80 and len(a.x_val) == 20
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    train, held_out = set(a.x[:, 0]), set(a.x_val[:, 0])
    assert not train & held_out
    assert train | held_out == set(range(100))
    np.testing.assert_array_equal(a.y, a.x[:, 0].astype(int) % 3)  # labels travel with samples


def test_split_keeps_an_existing_validation_part():
    rng = np.random.default_rng(0)
    data = from_arrays(rng.normal(size=(30, 2)), rng.integers(0, 2, 30),
                       rng.normal(size=(10, 2)), rng.integers(0, 2, 10))
    out = split_and_standardize(data, 0.5, standardize=False, seed=0)
    assert len(out.x) == 30 and len(out.x_val) == 10


def test_zero_fraction_means_no_validation_split():
    out = split_and_standardize(load_builtin("sklearn:iris"), 0.0, True, 0)
    assert len(out.x) == 150 and out.x_val is None


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_validation_fraction_outside_zero_one_is_a_spec_error(fraction):
    with pytest.raises(SpecError) as info:
        split_and_standardize(load_builtin("sklearn:iris"), fraction, True, 0)
    assert info.value.field_path == "data.validation_fraction"


# --- standardisation ---------------------------------------------------------------------------


def test_standardization_uses_only_training_statistics():
    data = load_builtin("sklearn:wine")
    out = split_and_standardize(data, 0.25, standardize=True, seed=1)
    np.testing.assert_allclose(out.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.x.std(axis=0), 1.0, atol=1e-4)
    # The validation split went through the same numbers, fitted on the raw training split.
    raw = split_and_standardize(data, 0.25, standardize=False, seed=1)
    mean = raw.x.astype(np.float64).mean(axis=0)
    std = raw.x.astype(np.float64).std(axis=0)
    np.testing.assert_allclose(out.feature_mean, mean)
    np.testing.assert_allclose(out.feature_std, std)
    np.testing.assert_allclose(out.x_val, (raw.x_val - mean) / std, rtol=1e-5, atol=1e-5)
    # ... which are not the validation split's own statistics.
    assert np.abs(out.x_val.mean(axis=0)).max() > 0.01
    np.testing.assert_allclose(out.transform(raw.x_val), out.x_val)


def test_constant_features_are_centred_not_divided_by_zero():
    out = split_and_standardize(load_builtin("sklearn:digits"), 0.2, True, 0)
    assert np.all(np.isfinite(out.x)) and np.all(np.isfinite(out.x_val))
    varying = out.x.std(axis=0) > 0
    assert varying.sum() < 64  # digits has always-blank pixels
    np.testing.assert_allclose(out.x.std(axis=0)[varying], 1.0, atol=1e-4)


def test_sequence_features_are_standardized_per_channel_over_time():
    out = split_and_standardize(load_builtin("synthetic:parity"), 0.2, True, 0)
    assert out.feature_mean.shape == (1,)
    assert abs(out.x.mean()) < 1e-5 and abs(out.x.std() - 1.0) < 1e-4


def test_integer_tokens_are_never_standardized():
    data = load_builtin("synthetic:sequence_sum")
    out = split_and_standardize(data, 0.2, standardize=True, seed=0)
    assert out.x.dtype == np.int64 and out.feature_mean is None
    assert set(np.unique(out.x)) <= set(range(10))


def test_dtype_and_label_types_after_split():
    cls = split_and_standardize(load_builtin("sklearn:iris"), 0.2, True, 0, dtype=np.float64)
    assert cls.x.dtype == cls.x_val.dtype == np.float64
    assert cls.y.dtype == cls.y_val.dtype == np.int64
    reg = split_and_standardize(load_builtin("sklearn:diabetes"), 0.2, True, 0)
    assert reg.x.dtype == np.float32 and reg.y.dtype == np.float32
    assert reg.y.shape[1:] == reg.y_val.shape[1:] == (1,)


# --- images and text ---------------------------------------------------------------------------


def test_digits_images_are_the_digits_as_one_channel_8x8_images_standardised_per_channel():
    flat = load_builtin("sklearn:digits")
    images = load_builtin("sklearn:digits_images")
    assert images.feature_shape == (1, 8, 8) and images.num_classes == 10
    np.testing.assert_array_equal(images.x.reshape(len(images.x), 64), flat.x)
    split = split_and_standardize(images, 0.2, True, seed=0)
    assert split.feature_mean.shape == (1, 1, 1) and split.feature_std.shape == (1, 1, 1)
    assert abs(float(split.x.mean())) < 1e-6 and abs(float(split.x.std()) - 1) < 1e-6
    np.testing.assert_allclose(split.transform(images.x[:3]),
                               (images.x[:3] - split.feature_mean) / split.feature_std,
                               rtol=1e-6)


def test_text_windows_predict_the_next_byte_and_validation_bytes_are_never_trained_on():
    text = bytes(range(256)) * 40  # 10,240 bytes, each window's content tells where it lies
    dataset = from_text(text, context_length=16, validation_fraction=0.25)
    assert dataset.task == NEXT_TOKEN and dataset.num_classes == 256
    assert dataset.x.shape[1:] == (16,) and dataset.y.shape == dataset.x.shape
    np.testing.assert_array_equal(dataset.x[:, 1:], dataset.y[:, :-1])  # y is x one byte on
    cut = len(text) - len(text) // 4
    assert dataset.x.shape[0] == (cut - 1) // 16
    # Training windows, targets included, come from the first 75% of the text only.
    trained_on = np.concatenate([dataset.x.ravel(), dataset.y[:, -1]])
    np.testing.assert_array_equal(trained_on[:dataset.x.size], np.frombuffer(
        text, np.uint8)[:dataset.x.size])
    assert (dataset.x.size + 1) <= cut
    first_validation = np.frombuffer(text, np.uint8)[cut:cut + 16]
    np.testing.assert_array_equal(dataset.x_val[0], first_validation)


def test_a_text_too_short_for_its_windows_names_the_field():
    with pytest.raises(SpecError) as error:
        from_text(b"abc", context_length=8, validation_fraction=0.0)
    assert error.value.field_path == "data.context_length"
    with pytest.raises(SpecError) as error:
        from_text(b"x" * 100, context_length=8, validation_fraction=0.05)
    assert error.value.field_path == "data.validation_fraction"


def test_the_builtin_text_is_python_help_and_its_shape_is_its_length():
    text = builtin_text("text:python_help")
    assert len(text) > 400_000 and b"The \"for\" statement" in text
    assert builtin_shape("text:python_help").text_bytes == len(text)


def test_a_text_is_cut_into_windows_by_the_spec_and_resolves_like_any_data_set():
    spec = load_job_spec("""
name: lm
model: {layers: [{embedding: {num_embeddings: 256, embedding_dim: 8}},
                 {linear: {out_features: 256}}]}
loss: next_token_cross_entropy
data: {dataset: "text:python_help", batch_size: 16, epochs: 1, context_length: 32,
       validation_fraction: 0.1}
""")
    job = resolve(spec, builtin_shape("text:python_help"))
    dataset = from_text(builtin_text("text:python_help"), 32, 0.1)
    assert job.training_samples == len(dataset.x) and job.validation_samples == len(dataset.x_val)
    assert job.context_length == 32 and job.predictions_per_sample == 32
    with pytest.raises(SpecError) as error:
        resolve(spec, builtin_shape("sklearn:digits"))
    assert error.value.field_path == "data.context_length"
