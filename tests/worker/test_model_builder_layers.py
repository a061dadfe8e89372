"""Convolutional, pooling, attention and transformer layers from a job spec: output shapes and
parameter counts inferred without building, the built model agreeing with them and loading
strictly into the PyTorch model of the same layers, and a SpecError naming the layer and the fix
when one does not fit."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule.spec_file import SpecError, load_job_spec
from chainrule.v1 import job_pb2
from worker.backprop import Tensor
from worker.model_builder import (
    build_loss,
    build_model,
    check_model_fits_data,
    plan_model,
    predictions_per_sample,
)

torch = pytest.importorskip("torch")

CNN = """
model: {layers: [
  {conv2d: {out_channels: 6, kernel_size: 5, padding: 2}}, {batch_norm2d: {}}, {relu: {}},
  {max_pool2d: {kernel_size: 2}},
  {conv2d: {out_channels: 16, kernel_size: [3, 5], stride: [1, 2], dilation: 1, groups: 2}},
  {relu: {}}, {avg_pool2d: {kernel_size: 2, stride: 1}}, {dropout2d: {p: 0.1}},
  {adaptive_avg_pool2d: {output_size: [2, 1]}}, {flatten: {}},
  {linear: {out_features: 10}}]}
loss: cross_entropy
data: {dataset: "sklearn:digits_images", batch_size: 8, epochs: 1}
"""

TRANSFORMER = """
model: {layers: [
  {embedding: {num_embeddings: 256, embedding_dim: 16}}, {positional_embedding: {}},
  {transformer_encoder_layer: {nhead: 4, dim_feedforward: 32, dropout: 0, is_causal: true}},
  {transformer_encoder_layer: {nhead: 2, dim_feedforward: 24, dropout: 0, activation: gelu,
                               norm_first: true}},
  {multihead_attention: {num_heads: 4, is_causal: true}},
  {linear: {out_features: 256}}]}
loss: next_token_cross_entropy
data: {dataset: "corpus", batch_size: 8, epochs: 1, context_length: 12}
"""


def _spec(text: str) -> job_pb2.JobSpec:
    return load_job_spec("name: t\n" + text)


def _error(text: str, shape: tuple[int, ...], dtype: str = "float32") -> SpecError:
    with pytest.raises(SpecError) as info:
        plan_model(_spec(text).model, shape, dtype)
    return info.value


def test_a_cnn_plans_its_shapes_and_counts_then_builds_a_model_that_agrees():
    spec = _spec(CNN)
    plan = plan_model(spec.model, (1, 28, 28), "float32")
    shapes = [layer.output_shape for layer in plan.layers]
    assert shapes[0] == (6, 28, 28) and shapes[3] == (6, 14, 14)
    assert shapes[4] == (16, 12, 5)  # (14 - 3) + 1, (14 - 5) // 2 + 1
    assert shapes[6] == (16, 11, 4) and shapes[8] == (16, 2, 1) and plan.output_shape == (10,)
    model = build_model(spec.model, (1, 28, 28), np.float64, seed=0)
    assert plan.parameters == sum(p.data.size for p in model.parameters())
    out = model(Tensor(np.random.default_rng(0).standard_normal((3, 1, 28, 28))))
    assert out.shape == (3, 10)


def test_the_cnn_loads_strictly_into_the_same_pytorch_layers_and_computes_the_same_outputs():
    spec = _spec(CNN)
    ours = build_model(spec.model, (1, 28, 28), np.float64, seed=3)
    nn = torch.nn
    theirs = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, (3, 5), stride=(1, 2), groups=2), nn.ReLU(), nn.AvgPool2d(2, 1),
        nn.Dropout2d(0.1), nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(), nn.Linear(32, 10),
    ).double()
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                            ours.state_dict().items()}, strict=True)
    ours.eval()
    theirs.eval()
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28))
    np.testing.assert_allclose(ours(Tensor(x)).data, theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-10, atol=1e-12)


def test_a_causal_transformer_language_model_plans_builds_and_matches_pytorch():
    spec = _spec(TRANSFORMER)
    plan = plan_model(spec.model, (12,), "int64")
    assert plan.output_shape == (12, 256)
    ours = build_model(spec.model, (12,), np.float64, seed=0, input_dtype="int64")
    assert plan.parameters == sum(p.data.size for p in ours.parameters())
    check_model_fits_data(spec, (12,), task="next_token", num_classes=256)
    nn = torch.nn
    layers = [nn.TransformerEncoderLayer(16, 4, 32, 0.0, batch_first=True),
              nn.TransformerEncoderLayer(16, 2, 24, 0.0, activation="gelu", batch_first=True,
                                         norm_first=True)]
    embedding, positions = nn.Embedding(256, 16), nn.Embedding(12, 16)
    attention, head = nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 256)
    modules = nn.ModuleDict({"0": embedding, "1": positions, "2": layers[0], "3": layers[1],
                             "4": attention, "5": head}).double()
    modules.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                             ours.state_dict().items()}, strict=True)
    tokens = np.random.default_rng(2).integers(0, 256, (3, 12))
    causal = nn.Transformer.generate_square_subsequent_mask(12, dtype=torch.float64)
    x = embedding(torch.from_numpy(tokens)) + positions.weight[:12]
    x = layers[0](x, src_mask=causal, is_causal=True)
    x = layers[1](x)
    x = attention(x, x, x, attn_mask=causal, need_weights=False)[0]
    expected = head(x).detach().numpy()
    ours.eval()
    np.testing.assert_allclose(ours(Tensor(tokens)).data, expected, rtol=1e-9, atol=1e-10)


def test_next_token_loss_averages_positions_and_its_sum_form_adds_up_to_the_mean():
    logits = Tensor(np.random.default_rng(0).standard_normal((6, 5, 256)))
    tokens = np.random.default_rng(1).integers(0, 256, (6, 5))
    spec = _spec(TRANSFORMER)
    mean = float(build_loss(spec)(logits, tokens).data)
    reference = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.data).reshape(-1, 256), torch.from_numpy(tokens).reshape(-1))
    assert mean == pytest.approx(float(reference), rel=1e-12)
    summed = build_loss(spec, "sum")
    parts = float(summed(logits[:2], tokens[:2]).data) + float(summed(logits[2:], tokens[2:]).data)
    assert parts / 6 == pytest.approx(mean, rel=1e-12)
    assert predictions_per_sample("next_token_cross_entropy", (5, 256)) == 5


def test_binary_accuracy_thresholds_the_one_logit_at_zero():
    spec = _spec(CNN.replace("cross_entropy", "binary_cross_entropy_with_logits"))
    loss = build_loss(spec)
    logits = np.array([[2.0], [-1.0], [0.5], [-3.0]])
    labels = np.array([1, 0, 0, 0])
    assert loss.correct(logits, labels) == 3  # argmax over one column would say 1 (class 0s)
    assert predictions_per_sample("binary_cross_entropy_with_logits", (1,)) == 1


@pytest.mark.parametrize("layers, shape, path, words", [
    ("[{conv2d: {out_channels: 4, kernel_size: 9}}]", (1, 8, 8),
     "model.layers[0].conv2d.kernel_size", "kernel spans 9 along height but the input is only 8"),
    ("[{flatten: {}}, {conv2d: {out_channels: 4, kernel_size: 3}}]", (1, 8, 8),
     "model.layers[1].conv2d", "a conv after a flatten"),
    ("[{conv2d: {out_channels: 4, kernel_size: 3, stride: 2, padding: same}}]", (1, 8, 8),
     "model.layers[0].conv2d.padding", "'same' needs stride 1"),
    ("[{conv2d: {out_channels: 3, kernel_size: 3, groups: 2}}]", (2, 8, 8),
     "model.layers[0].conv2d.groups", "divisible by groups 2"),
    ("[{conv2d: {out_channels: 3, kernel_size: [3, 3, 3]}}]", (2, 8, 8),
     "model.layers[0].conv2d.kernel_size", "a list of 2 numbers"),
    ("[{conv2d: {out_channels: 3, kernel_size: 1.5}}]", (2, 8, 8),
     "model.layers[0].conv2d.kernel_size", "integers >= 1"),
    ("[{conv2d: {out_channels: 3, kernel_size: 3, padding: half}}]", (2, 8, 8),
     "model.layers[0].conv2d.padding", "'same'"),
    ("[{conv2d: {out_channels: 3}}]", (2, 8, 8), "model.layers[0].conv2d.kernel_size",
     "required"),
    ("[{max_pool2d: {kernel_size: 2, padding: 2}}]", (2, 8, 8),
     "model.layers[0].max_pool2d.padding", "at most half the kernel"),
    ("[{batch_norm2d: {}}]", (64,), "model.layers[0].batch_norm2d", "(channels, height, width)"),
    ("[{conv1d: {out_channels: 4, kernel_size: 3}}]", (8, 8, 8), "model.layers[0].conv1d",
     "(channels, length)"),
    ("[{multihead_attention: {num_heads: 3}}]", (5, 16),
     "model.layers[0].multihead_attention.num_heads", "embed_dim 16"),
    ("[{transformer_encoder_layer: {nhead: 5}}]", (5, 16),
     "model.layers[0].transformer_encoder_layer.nhead", "use one of [1, 2, 4, 8, 16]"),
    ("[{transformer_encoder_layer: {nhead: 2, activation: tanh}}]", (5, 16),
     "model.layers[0].transformer_encoder_layer.activation", "'relu' or 'gelu'"),
    ("[{positional_embedding: {num_positions: 4}}]", (5, 16),
     "model.layers[0].positional_embedding.num_positions", "at least the sequence length 5"),
    ("[{mean_pool: {}}]", (16,), "model.layers[0].mean_pool", "needs a sequence"),
])
def test_a_layer_that_does_not_fit_is_named_with_the_fix(layers, shape, path, words):
    error = _error(f"model: {{layers: {layers}}}\nloss: mse\n"
                   f"data: {{dataset: x, batch_size: 1, epochs: 1}}", shape)
    assert error.field_path == path
    assert words in error.message


def test_next_token_loss_needs_a_text_and_a_score_per_byte_at_each_position():
    spec = _spec(TRANSFORMER.replace("out_features: 256", "out_features: 10"))
    with pytest.raises(SpecError, match=r"needs \(12, 256\)") as info:
        check_model_fits_data(spec, (12,), task="next_token", num_classes=256)
    assert info.value.field_path == "model.layers[5]"
    with pytest.raises(SpecError, match="go together") as info:
        check_model_fits_data(_spec(TRANSFORMER), (12,), task="classification", num_classes=2)
    assert info.value.field_path == "loss"
