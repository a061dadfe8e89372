"""A trained model as an ONNX graph, built with the `onnx` package from the job's weights and
its layer plan (worker/layer_description.py), for `chainrule download JOB --format onnx`.

The graph takes raw rows exactly as Predict does: input `input` is (batch, *feature shape) in
float64 (int64 token ids for a model that starts with an embedding), standardised inside the
graph with the manifest's feature_mean and feature_std in float64, then cast to float32. The
network itself runs in float32 whatever the job's dtype: ONNX Runtime has no float64 kernels
for Conv, LSTM, GRU, RNN or Erf. Output `output` is the network's raw output (logits for a
classifier, as the engine's forward returns them), (batch, *output shape). Dropout is the
identity and batch norms use their running statistics, as in evaluation.

A sequence model (recurrent, attention or transformer layers, and nothing that needs a fixed
length: no flatten, convolution or pooling) takes sequences of any length up to the one it
was trained on: its time axis is the symbolic dimension "sequence", in the output too unless
the model reduces it (last_step, mean_pool). A causal language model so reads a prompt shorter
than its context, and its output at each position is the engine's on the same prefix.

Every layer kind the model builder supports has a translation here; a model with another kind
raises OnnxExportError naming the layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from chainrule.v1 import job_pb2
from scheduler.storage import load_weights, manifest_path
from worker.layer_description import LayerDescription, describe_model
from worker.model_builder import plan_model

OPSET = 17  # LayerNormalization; supported by every current ONNX Runtime
NETWORK_DTYPE = np.float32
INPUT_NAME, OUTPUT_NAME = "input", "output"


class OnnxExportError(ValueError):
    """The model has a layer this exporter cannot translate (the message names it)."""


class _Graph:
    """Nodes and constants being collected; every value gets a fresh name."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], sequence_input: bool = False):
        self.state_dict = state_dict
        # The time axis (axis 1) is as long as the input's, not the planned length.
        self.sequence_input = sequence_input
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, value: Any, hint: str = "const", dtype: Any = NETWORK_DTYPE) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, key: str, transpose: bool = False) -> str:
        value = np.asarray(self.state_dict[key], dtype=NETWORK_DTYPE)
        return self.constant(value.T if transpose else value, key)

    def op(self, op_type: str, inputs: list[str], **attributes: Any) -> str:
        output = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attributes))
        return output

    def first_steps(self, table: str, like: str, axes: list[int]) -> str:
        """`table` cut to the length of `like`'s time axis (axis 1) along each of `axes`."""
        length = self.op("Slice", [self.op("Shape", [like]),
                                   self.constant([1], dtype=np.int64),
                                   self.constant([2], dtype=np.int64)])
        ends = self.op("Concat", [length] * len(axes), axis=0)
        return self.op("Slice", [table, self.constant([0] * len(axes), dtype=np.int64), ends,
                                 self.constant(axes, dtype=np.int64)])


def export_weights_file(spec: job_pb2.JobSpec, weights_path: str | Path) -> bytes:
    """The ONNX model of a trained job's weights file: its layer plan from the spec and the
    input shape its manifest records, its standardisation from the manifest."""
    manifest_file = manifest_path(weights_path)
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    if not manifest.get("input_shape") or not manifest.get("input_dtype"):
        raise OnnxExportError(f"the manifest {manifest_file.name} does not record the model's "
                              f"input shape (written by an older version)")
    plan = plan_model(spec.model, tuple(manifest["input_shape"]), manifest["input_dtype"])
    mean, std = manifest.get("feature_mean"), manifest.get("feature_std")
    return export_onnx(describe_model(plan), load_weights(weights_path), plan.input_shape,
                       plan.input_dtype, None if mean is None else np.asarray(mean),
                       None if std is None else np.asarray(std), name=spec.name or "chainrule")


def export_onnx(layers: tuple[LayerDescription, ...], state_dict: Mapping[str, np.ndarray],
                input_shape: tuple[int, ...], input_dtype: str,
                feature_mean: np.ndarray | None, feature_std: np.ndarray | None,
                name: str = "chainrule") -> bytes:
    """The serialized ONNX model (checked by onnx.checker) of a planned, trained model."""
    sequence_input = takes_any_length(layers)
    graph = _Graph(state_dict, sequence_input)
    tokens = np.dtype(input_dtype).kind in "iu"
    x = INPUT_NAME
    if tokens:
        x = graph.op("Cast", [x], to=TensorProto.INT64)
    else:
        if feature_mean is not None and feature_std is not None:
            mean = graph.constant(feature_mean, "feature_mean", np.float64)
            std = graph.constant(feature_std, "feature_std", np.float64)
            x = graph.op("Div", [graph.op("Sub", [x, mean]), std])
        x = graph.op("Cast", [x], to=TensorProto.FLOAT)
    x = _sequence(graph, layers, x)
    graph.nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME]))

    input_dims: list[str | int] = ["batch", *input_shape]
    output_dims: list[str | int] = ["batch", *layers[-1].output_shape]
    if sequence_input:
        input_dims[1] = "sequence"
        if not any(layer.kind in _TIME_REDUCING_KINDS for layer in layers):
            output_dims[1] = "sequence"
    inputs = [helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.INT64 if tokens else TensorProto.DOUBLE, input_dims)]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, output_dims)]
    model = helper.make_model(
        helper.make_graph(graph.nodes, name, inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="chainrule")
    model.ir_version = 8  # the newest most runtimes read (ONNX Runtime >= 1.14)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


# What a sequence model is made of: layers that act per position, or over the time axis
# whatever its length. One other kind (flatten, a convolution, a pooling) fixes the length.
_SEQUENCE_KINDS = frozenset({"lstm", "gru", "rnn", "multihead_attention",
                             "transformer_encoder_layer", "positional_embedding", "last_step",
                             "mean_pool"})
_TIME_REDUCING_KINDS = frozenset({"last_step", "mean_pool"})
_PER_POSITION_KINDS = frozenset({"linear", "relu", "tanh", "sigmoid", "gelu", "silu",
                                 "leaky_relu", "dropout", "layer_norm", "embedding", "residual"})


def takes_any_length(layers: tuple[LayerDescription, ...]) -> bool:
    """Whether the model is a sequence model that reads any length up to its planned one."""
    def kinds(described: tuple[LayerDescription, ...]) -> set[str]:
        return {kind for layer in described for kind in (layer.kind, *kinds(layer.layers))}

    found = kinds(layers)
    return bool(found & _SEQUENCE_KINDS) and found <= _SEQUENCE_KINDS | _PER_POSITION_KINDS


def _sequence(graph: _Graph, layers: tuple[LayerDescription, ...], x: str) -> str:
    for layer in layers:
        translate = _TRANSLATIONS.get(layer.kind)
        if translate is None:
            raise OnnxExportError(f"{layer.path}: layer kind {layer.kind!r} has no ONNX "
                                  f"translation")
        x = translate(graph, layer, x)
    return x


def _keys(layer: LayerDescription) -> dict[str, str]:
    """The layer's own parameter names ("weight", "running_mean", "self_attn.in_proj_weight")
    to their full state_dict keys."""
    prefix = layer_prefix(layer)
    return {key[len(prefix):]: key for key in layer.parameters}


def layer_prefix(layer: LayerDescription) -> str:
    """The state_dict prefix of a layer ("3.", "5.block.0."), from its path."""
    parts = layer.path.split(".")[1:]  # ["layers[5]", "residual", "layers[0]", "linear"]
    prefix = []
    for part in parts:
        if part.startswith("layers["):
            prefix.append(part[len("layers["):-1])
        elif part == "residual":
            prefix.append("block")
    return ".".join(prefix) + "."


# --- dense layers and activations -------------------------------------------------------------


def _linear_by(graph: _Graph, x: str, weight_key: str, bias_key: str | None) -> str:
    y = graph.op("MatMul", [x, graph.weight(weight_key, transpose=True)])
    return y if bias_key is None else graph.op("Add", [y, graph.weight(bias_key)])


def _linear(graph: _Graph, layer: LayerDescription, x: str) -> str:
    keys = _keys(layer)
    return _linear_by(graph, x, keys["weight"], keys.get("bias"))


def _unary(op_type: str, **attributes: Any) -> Callable[[_Graph, LayerDescription, str], str]:
    return lambda graph, layer, x: graph.op(op_type, [x], **attributes)


def _leaky_relu(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return graph.op("LeakyRelu", [x], alpha=float(layer.arguments["negative_slope"]))


def _silu(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return graph.op("Mul", [x, graph.op("Sigmoid", [x])])


def _gelu_of(graph: _Graph, x: str, approximate: str) -> str:
    half_x = graph.op("Mul", [x, graph.constant(0.5)])
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = graph.op("Mul", [graph.op("Mul", [x, x]), x])
        inner = graph.op("Add", [x, graph.op("Mul", [cube, graph.constant(0.044715)])])
        curve = graph.op("Tanh", [graph.op("Mul", [inner,
                                                   graph.constant(math.sqrt(2 / math.pi))])])
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        curve = graph.op("Erf", [graph.op("Mul", [x, graph.constant(1 / math.sqrt(2))])])
    return graph.op("Mul", [half_x, graph.op("Add", [curve, graph.constant(1.0)])])


def _gelu(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return _gelu_of(graph, x, layer.arguments["approximate"])


def _identity(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return x  # dropout in evaluation


def _residual(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return graph.op("Add", [x, _sequence(graph, layer.layers, x)])


def _flatten(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return graph.op("Flatten", [x], axis=1)


def _embedding(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return graph.op("Gather", [graph.weight(_keys(layer)["weight"]), x], axis=0)


# --- normalisation ----------------------------------------------------------------------------


def _batch_norm(graph: _Graph, layer: LayerDescription, x: str) -> str:
    keys = _keys(layer)
    return graph.op("BatchNormalization",
                    [x, graph.weight(keys["weight"]), graph.weight(keys["bias"]),
                     graph.weight(keys["running_mean"]), graph.weight(keys["running_var"])],
                    epsilon=float(layer.arguments["eps"]))


def _layer_norm_by(graph: _Graph, x: str, weight_key: str, bias_key: str | None,
                   eps: float) -> str:
    scale = graph.weight(weight_key)
    if bias_key is None:
        return graph.op("LayerNormalization", [x, scale], axis=-1, epsilon=eps)
    return graph.op("LayerNormalization", [x, scale, graph.weight(bias_key)], axis=-1,
                    epsilon=eps)


def _layer_norm(graph: _Graph, layer: LayerDescription, x: str) -> str:
    keys = _keys(layer)
    return _layer_norm_by(graph, x, keys["weight"], keys.get("bias"),
                          float(layer.arguments["eps"]))


# --- images -----------------------------------------------------------------------------------


def _pads(padding: Any, kernel: list[int], dilation: list[int]) -> list[int]:
    """ONNX's pads (all begins, then all ends) from torch's padding: per-axis numbers, "valid",
    or "same" (total d (k - 1), the odd one after, as torch)."""
    if padding == "valid":
        return [0] * 2 * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [t // 2 for t in totals] + [t - t // 2 for t in totals]
    return list(padding) * 2


def _conv(graph: _Graph, layer: LayerDescription, x: str) -> str:
    keys, arguments = _keys(layer), layer.arguments
    inputs = [x, graph.weight(keys["weight"])]
    if "bias" in keys:
        inputs.append(graph.weight(keys["bias"]))
    kernel, dilation = arguments["kernel_size"], arguments["dilation"]
    return graph.op("Conv", inputs, kernel_shape=kernel, strides=arguments["stride"],
                    dilations=dilation, group=arguments["groups"],
                    pads=_pads(arguments["padding"], kernel, dilation))


def _max_pool2d(graph: _Graph, layer: LayerDescription, x: str) -> str:
    arguments = layer.arguments
    kernel, dilation = arguments["kernel_size"], arguments["dilation"]
    return graph.op("MaxPool", [x], kernel_shape=kernel, strides=arguments["stride"],
                    dilations=dilation, pads=_pads(arguments["padding"], kernel, dilation))


def _avg_pool2d(graph: _Graph, layer: LayerDescription, x: str) -> str:
    arguments = layer.arguments
    kernel = arguments["kernel_size"]
    return graph.op("AveragePool", [x], kernel_shape=kernel, strides=arguments["stride"],
                    pads=_pads(arguments["padding"], kernel, [1, 1]),
                    count_include_pad=int(arguments["count_include_pad"]))


def adaptive_average_matrix(size: int, output_size: int) -> np.ndarray:
    """(output_size, size): row i averages torch's adaptive window i,
    floor(i size / out) .. ceil((i + 1) size / out) - 1."""
    matrix = np.zeros((output_size, size))
    for i in range(output_size):
        start, end = (i * size) // output_size, -((-(i + 1) * size) // output_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _adaptive_avg_pool2d(graph: _Graph, layer: LayerDescription, x: str) -> str:
    # Y = A_h X A_w^T: one exact form for every output size, overlapping windows included.
    (_, height, width), (out_height, out_width) = layer.input_shape, layer.output_shape[1:]
    rows = graph.constant(adaptive_average_matrix(height, out_height), "adaptive_rows")
    columns = graph.constant(adaptive_average_matrix(width, out_width).T, "adaptive_columns")
    return graph.op("MatMul", [graph.op("MatMul", [rows, x]), columns])


# --- sequences --------------------------------------------------------------------------------

# torch stacks the gates (i, f, g, o) for the LSTM and (r, z, n) for the GRU; ONNX wants
# (i, o, f, c) and (z, r, h).
_GATE_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}


def _gates(value: np.ndarray, kind: str) -> np.ndarray:
    blocks = np.split(np.asarray(value), len(_GATE_ORDER[kind]), axis=0)
    return np.concatenate([blocks[i] for i in _GATE_ORDER[kind]], axis=0)


def _recurrent(graph: _Graph, layer: LayerDescription, x: str) -> str:
    kind, arguments, keys = layer.kind, layer.arguments, _keys(layer)
    hidden, directions = arguments["hidden_size"], 2 if arguments["bidirectional"] else 1
    rows = len(_GATE_ORDER[kind]) * hidden
    x = graph.op("Transpose", [x], perm=[1, 0, 2])  # ONNX's recurrences run time-major
    for number in range(arguments["num_layers"]):
        suffixes = [f"_l{number}", f"_l{number}_reverse"][:directions]
        w = np.stack([_gates(graph.state_dict[keys["weight_ih" + s]], kind) for s in suffixes])
        r = np.stack([_gates(graph.state_dict[keys["weight_hh" + s]], kind) for s in suffixes])
        if "bias_ih" + suffixes[0] in keys:
            b = np.stack([np.concatenate([_gates(graph.state_dict[keys["bias_ih" + s]], kind),
                                          _gates(graph.state_dict[keys["bias_hh" + s]], kind)])
                          for s in suffixes])
        else:
            b = np.zeros((directions, 2 * rows))
        attributes: dict[str, Any] = {
            "hidden_size": hidden, "direction": "bidirectional" if directions == 2 else "forward"}
        if kind == "gru":
            attributes["linear_before_reset"] = 1  # torch applies r to (W_hn h + b_hn)
        if kind == "rnn":
            activation = "Relu" if arguments["nonlinearity"] == "relu" else "Tanh"
            attributes["activations"] = [activation] * directions
        hidden_states = graph.op(kind.upper(), [x, graph.constant(w, "W"), graph.constant(r, "R"),
                                                graph.constant(b, "B")], **attributes)
        # (time, directions, batch, hidden) -> (time, batch, directions * hidden)
        x = graph.op("Reshape", [graph.op("Transpose", [hidden_states], perm=[0, 2, 1, 3]),
                                 graph.constant([0, 0, directions * hidden], dtype=np.int64)])
    return graph.op("Transpose", [x], perm=[1, 0, 2])


def _last_step(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return graph.op("Gather", [x, graph.constant(-1, dtype=np.int64)], axis=1)


def _mean_pool(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return graph.op("ReduceMean", [x], axes=[1], keepdims=0)


def _positional_embedding(graph: _Graph, layer: LayerDescription, x: str) -> str:
    table = np.asarray(graph.state_dict[_keys(layer)["weight"]])
    if graph.sequence_input:
        positions = graph.first_steps(graph.constant(table, "positions"), x, axes=[0])
    else:
        positions = graph.constant(table[:layer.input_shape[0]], "positions")
    return graph.op("Add", [x, positions])


def _self_attention(graph: _Graph, x: str, keys: dict[str, str], prefix: str,
                    steps: int, width: int, heads: int, causal: bool) -> str:
    """torch.nn.MultiheadAttention(x, x, x) in evaluation: softmax(q k^T / sqrt(d)) v per head,
    merged, then out_proj; a causal mask adds -inf above the diagonal."""
    head_dim = width // heads
    bias_key = keys.get(prefix + "in_proj_bias")
    qkv = _linear_by(graph, x, keys[prefix + "in_proj_weight"], bias_key)  # (batch, T, 3 E)
    split = graph.op("Reshape", [qkv, graph.constant([0, 0, 3, heads, head_dim],
                                                     dtype=np.int64)])
    by_head = graph.op("Transpose", [split], perm=[2, 0, 3, 1, 4])  # (3, batch, heads, T, d)
    q, k, v = (graph.op("Gather", [by_head, graph.constant(i, dtype=np.int64)], axis=0)
               for i in range(3))
    scores = graph.op("Mul", [graph.op("MatMul", [q, graph.op("Transpose", [k],
                                                              perm=[0, 1, 3, 2])]),
                              graph.constant(1 / math.sqrt(head_dim))])
    if causal:
        mask = graph.constant(np.triu(np.full((steps, steps), -np.inf), k=1), "causal_mask")
        if graph.sequence_input:
            mask = graph.first_steps(mask, x, axes=[0, 1])
        scores = graph.op("Add", [scores, mask])
    weights = graph.op("Softmax", [scores], axis=-1)
    merged = graph.op("Reshape", [graph.op("Transpose", [graph.op("MatMul", [weights, v])],
                                           perm=[0, 2, 1, 3]),
                                  graph.constant([0, 0, width], dtype=np.int64)])
    return _linear_by(graph, merged, keys[prefix + "out_proj.weight"],
                      keys.get(prefix + "out_proj.bias"))


def _multihead_attention(graph: _Graph, layer: LayerDescription, x: str) -> str:
    return _self_attention(graph, x, _keys(layer), "", layer.input_shape[0],
                           layer.arguments["embed_dim"], layer.arguments["num_heads"],
                           bool(layer.call.get("is_causal")))


def _transformer_encoder_layer(graph: _Graph, layer: LayerDescription, x: str) -> str:
    keys, arguments = _keys(layer), layer.arguments
    eps = float(arguments["layer_norm_eps"])

    def norm(number: int, value: str) -> str:
        return _layer_norm_by(graph, value, keys[f"norm{number}.weight"],
                              keys.get(f"norm{number}.bias"), eps)

    def attention(value: str) -> str:
        return _self_attention(graph, value, keys, "self_attn.", layer.input_shape[0],
                               arguments["d_model"], arguments["nhead"],
                               bool(layer.call.get("is_causal")))

    def feed_forward(value: str) -> str:
        hidden = _linear_by(graph, value, keys["linear1.weight"], keys.get("linear1.bias"))
        hidden = (graph.op("Relu", [hidden]) if arguments["activation"] == "relu"
                  else _gelu_of(graph, hidden, "none"))
        return _linear_by(graph, hidden, keys["linear2.weight"], keys.get("linear2.bias"))

    if arguments["norm_first"]:
        x = graph.op("Add", [x, attention(norm(1, x))])
        return graph.op("Add", [x, feed_forward(norm(2, x))])
    x = norm(1, graph.op("Add", [x, attention(x)]))
    return norm(2, graph.op("Add", [x, feed_forward(x)]))


_TRANSLATIONS: dict[str, Callable[[_Graph, LayerDescription, str], str]] = {
    "linear": _linear,
    "relu": _unary("Relu"),
    "tanh": _unary("Tanh"),
    "sigmoid": _unary("Sigmoid"),
    "gelu": _gelu,
    "silu": _silu,
    "leaky_relu": _leaky_relu,
    "dropout": _identity,
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "embedding": _embedding,
    "residual": _residual,
    "lstm": _recurrent,
    "gru": _recurrent,
    "rnn": _recurrent,
    "last_step": _last_step,
    "flatten": _flatten,
    "conv1d": _conv,
    "conv2d": _conv,
    "max_pool2d": _max_pool2d,
    "avg_pool2d": _avg_pool2d,
    "adaptive_avg_pool2d": _adaptive_avg_pool2d,
    "batch_norm2d": _batch_norm,
    "dropout2d": _identity,
    "multihead_attention": _multihead_attention,
    "transformer_encoder_layer": _transformer_encoder_layer,
    "positional_embedding": _positional_embedding,
    "mean_pool": _mean_pool,
}
EXPORTABLE_KINDS = tuple(_TRANSLATIONS)
