"""The ONNX export: for every family of model the builder makes (MLP, CNN, LSTM, GRU, RNN,
transformer classifier, causal language model), the exported graph run in ONNX Runtime gives
the engine's outputs on raw rows, with the job's standardisation inside the graph.

The reference is the engine in float64 on the same (float32) weights, after the same
standardisation in float64; the ONNX graph runs in float32 (its documented type), so the 1e-5
bound measures float32 round-off and nothing else. Weights are the builder's initialisation
with batch-norm statistics moved off their defaults: no training needed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.onnx_export import (
    EXPORTABLE_KINDS,
    INPUT_NAME,
    OnnxExportError,
    adaptive_average_matrix,
    export_onnx,
    takes_any_length,
)
from worker.backprop import Tensor
from worker.backprop.tensor import no_grad
from worker.layer_description import LayerDescription, describe_model
from worker.model_builder import LAYER_KINDS, build_planned_model, plan_model

TOLERANCE = 1e-5

MLP = """{layers: [
  {linear: {out_features: 24}}, {batch_norm: {}}, {relu: {}}, {dropout: {p: 0.3}},
  {residual: {layers: [{linear: {out_features: 24}}, {gelu: {}}, {layer_norm: {}}]}},
  {linear: {out_features: 16, bias: false}}, {leaky_relu: {negative_slope: 0.2}},
  {linear: {out_features: 16}}, {silu: {}}, {linear: {out_features: 12}}, {tanh: {}},
  {linear: {out_features: 8}}, {gelu: {approximate: tanh}}, {sigmoid: {}},
  {linear: {out_features: 3}}]}"""

CNN = """{layers: [
  {conv2d: {out_channels: 6, kernel_size: 4, padding: same}}, {batch_norm2d: {}}, {relu: {}},
  {max_pool2d: {kernel_size: 3, stride: 1, padding: 1, dilation: 1}}, {dropout2d: {p: 0.2}},
  {conv2d: {out_channels: 8, kernel_size: [3, 2], stride: [1, 2], dilation: [2, 1],
            groups: 2}},
  {avg_pool2d: {kernel_size: 2, stride: 1, padding: 1, count_include_pad: false}},
  {adaptive_avg_pool2d: {output_size: [3, 2]}}, {flatten: {}}, {linear: {out_features: 5}}]}"""

CONV1D = """{layers: [
  {conv1d: {out_channels: 4, kernel_size: 3, padding: valid, bias: false}}, {relu: {}},
  {conv1d: {out_channels: 4, kernel_size: 2, padding: same, dilation: 2}},
  {flatten: {}}, {linear: {out_features: 2}}]}"""

LSTM = """{layers: [
  {lstm: {hidden_size: 6, num_layers: 2, bidirectional: true, dropout: 0.1}},
  {last_step: {}}, {linear: {out_features: 3}}]}"""

GRU = """{layers: [
  {gru: {hidden_size: 5, num_layers: 2}}, {mean_pool: {}}, {linear: {out_features: 2}}]}"""

RNN = """{layers: [
  {rnn: {hidden_size: 5, nonlinearity: relu, bidirectional: true}}, {rnn: {hidden_size: 4}},
  {last_step: {}}, {linear: {out_features: 2}}]}"""

TRANSFORMER_CLASSIFIER = """{layers: [
  {linear: {out_features: 16}}, {positional_embedding: {num_positions: 10}},
  {transformer_encoder_layer: {nhead: 4, dim_feedforward: 32, activation: gelu}},
  {multihead_attention: {num_heads: 2, bias: false}}, {layer_norm: {eps: 0.001}},
  {mean_pool: {}}, {linear: {out_features: 4}}]}"""

CAUSAL_LANGUAGE_MODEL = """{layers: [
  {embedding: {num_embeddings: 40, embedding_dim: 16}}, {positional_embedding: {}},
  {transformer_encoder_layer: {nhead: 4, dim_feedforward: 32, is_causal: true}},
  {transformer_encoder_layer: {nhead: 2, dim_feedforward: 24, activation: gelu,
                               norm_first: true, is_causal: true}},
  {multihead_attention: {num_heads: 4, is_causal: true}},
  {linear: {out_features: 40}}]}"""

FAMILIES = {  # model, one sample's shape, its dtype
    "mlp": (MLP, (7,), "float32"),
    "cnn": (CNN, (2, 9, 8), "float32"),
    "conv1d": (CONV1D, (3, 10), "float32"),
    "lstm": (LSTM, (5, 4), "float32"),
    "gru": (GRU, (6, 3), "float32"),
    "rnn": (RNN, (4, 3), "float32"),
    "transformer_classifier": (TRANSFORMER_CLASSIFIER, (8, 5), "float32"),
    "causal_language_model": (CAUSAL_LANGUAGE_MODEL, (12,), "int64"),
}


def _model_spec(layers: str):
    return load_job_spec(f"name: t\nmodel: {layers}\n").model


def _trained_like_weights(plan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The builder's float32 initialisation, with batch-norm statistics and affine parameters
    moved off 0 and 1 so that evaluation mode is really exercised."""
    state = {key: value.copy() for key, value in
             build_planned_model(plan, np.float32, seed=3).state_dict().items()}
    for key, value in state.items():
        if key.endswith(("running_mean", "norm.bias")) or ".bias" in key and value.ndim == 1:
            state[key] = (value + rng.normal(0, 0.3, value.shape)).astype(value.dtype)
        if key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
    return state


def _engine_outputs(plan, state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    model = build_planned_model(plan, np.float64, seed=0)
    model.load_state_dict(state)
    model.eval()
    with no_grad():
        return model(Tensor(x)).data


def _onnx_outputs(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model_bytes, options,
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: x})[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exported_graph_gives_the_engines_outputs_on_raw_rows(family):
    layers, shape, dtype = FAMILIES[family]
    rng = np.random.default_rng(0)
    plan = plan_model(_model_spec(layers), shape, dtype)
    state = _trained_like_weights(plan, rng)
    if dtype == "int64":
        raw = rng.integers(0, 40, size=(5, *shape)).astype(np.int64)
        mean = std = None
        standardized = raw
    else:
        raw = rng.normal(3.0, 4.0, size=(5, *shape))
        statistics_shape = (shape[0], 1, 1) if len(shape) == 3 else shape[-1:]
        mean = rng.normal(3.0, 1.0, statistics_shape)
        std = rng.uniform(2.0, 5.0, statistics_shape)
        standardized = (raw - mean) / std
    exported = export_onnx(describe_model(plan), state, plan.input_shape, plan.input_dtype,
                           mean, std)

    outputs = _onnx_outputs(exported, raw)

    expected = _engine_outputs(plan, state, standardized)
    assert outputs.dtype == np.float32 and outputs.shape == expected.shape
    assert np.abs(expected).max() > 0.1  # a real signal, not everything near 0
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=TOLERANCE)


def test_every_layer_kind_the_builder_knows_is_exportable():
    assert set(EXPORTABLE_KINDS) == set(LAYER_KINDS)
    tested = {kind for layers, _, _ in FAMILIES.values() for kind in LAYER_KINDS
              if f"{{{kind}:" in layers}
    assert tested == set(LAYER_KINDS)


def test_the_graph_declares_raw_rows_in_and_a_batch_of_outputs():
    plan = plan_model(_model_spec(CNN), (2, 9, 8), "float32")
    state = _trained_like_weights(plan, np.random.default_rng(1))
    model = onnx.load_from_string(export_onnx(describe_model(plan), state, plan.input_shape,
                                              plan.input_dtype, None, None))
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert dims == ["batch", 2, 9, 8]
    assert [d.dim_param or d.dim_value
            for d in graph_output.type.tensor_type.shape.dim] == ["batch", 5]


def test_a_language_model_reads_a_prompt_shorter_than_its_context():
    layers, shape, dtype = FAMILIES["causal_language_model"]
    rng = np.random.default_rng(2)
    plan = plan_model(_model_spec(layers), shape, dtype)
    state = _trained_like_weights(plan, rng)
    exported = export_onnx(describe_model(plan), state, plan.input_shape, plan.input_dtype,
                           None, None)
    tokens = rng.integers(0, 40, size=(3, *shape)).astype(np.int64)
    full = _engine_outputs(plan, state, tokens)
    for length in (1, 5, shape[0]):  # causal: position t sees only the tokens up to t
        outputs = _onnx_outputs(exported, tokens[:, :length])
        np.testing.assert_allclose(outputs, full[:, :length], rtol=0, atol=TOLERANCE)
    (graph_input,), (graph_output,) = onnx.load_from_string(exported).graph.input, \
        onnx.load_from_string(exported).graph.output
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [
        "batch", "sequence"]
    assert [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim] == [
        "batch", "sequence", 40]


@pytest.mark.parametrize("family, sequence", [("lstm", True), ("transformer_classifier", True),
                                              ("mlp", False), ("cnn", False),
                                              ("conv1d", False)])
def test_only_sequence_models_take_any_length(family, sequence):
    layers, shape, dtype = FAMILIES[family]
    assert takes_any_length(describe_model(plan_model(_model_spec(layers), shape, dtype))) \
        == sequence


def test_a_layer_kind_without_a_translation_is_named():
    plan = plan_model(_model_spec(MLP), (7,), "float32")
    layers = describe_model(plan)
    state = build_planned_model(plan, np.float32, seed=0).state_dict()
    unknown = LayerDescription("model.layers[1].mystery", "mystery", "", {}, {}, (24,), (24,),
                               {})
    with pytest.raises(OnnxExportError, match=r"model.layers\[1\].mystery.*'mystery'"):
        export_onnx((layers[0], unknown), state, (7,), "float32", None, None)


def test_adaptive_windows_are_torchs_overlapping_ones():
    # 5 -> 3: windows [0, 2), [1, 4), [3, 5)
    np.testing.assert_allclose(adaptive_average_matrix(5, 3),
                               [[.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0],
                                [0, 0, 0, .5, .5]])
