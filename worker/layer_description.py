"""A model's layer plan as plain data: each layer's kind, its PyTorch equivalent with the
constructor arguments resolved (in_features, kernel sizes, "same" padding, ...), its input and
output shapes per sample, and its state_dict keys with their shapes.

It goes into the weights' manifest, so that a user can rebuild the network in PyTorch and load
the weights with strict=True (README, "Rebuilding a model in PyTorch"), and it is what the
ONNX export (scheduler/onnx_export.py) builds its graph from. The arguments are read from the
engine modules the model builder makes, which follow PyTorch's names, so every default the
spec leaves out is resolved here exactly as training resolved it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from chainrule.v1 import job_pb2
from worker.backprop import nn
from worker.backprop.nn.transformer import ACTIVATIONS
from worker.model_builder import ModelPlan, build_planned_model, plan_model

# Layers that torch.nn has no module for; the README gives their one-line forward.
NO_TORCH_MODULE = ("residual", "last_step", "mean_pool", "positional_embedding")


@dataclass(frozen=True)
class LayerDescription:
    """One layer. `torch` is the torch.nn class to build it with and `arguments` its
    constructor's keyword arguments ("" and the layer's own settings for NO_TORCH_MODULE
    kinds); `call` holds what torch takes in forward instead (is_causal). `parameters` maps
    each full state_dict key ("3.weight") to its shape; a residual's block is `layers`."""

    path: str  # as in the spec: "model.layers[2].conv2d"
    kind: str  # the Layer oneof's name: "conv2d"
    torch: str
    arguments: dict[str, Any]
    call: dict[str, Any]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    parameters: dict[str, tuple[int, ...]]
    layers: tuple[LayerDescription, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "torch": self.torch,
                "arguments": self.arguments, "call": self.call,
                "input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
                "parameters": {key: list(shape) for key, shape in self.parameters.items()},
                "layers": [layer.to_json() for layer in self.layers]}

    @staticmethod
    def from_json(data: dict[str, Any]) -> LayerDescription:
        return LayerDescription(
            data["path"], data["kind"], data["torch"], dict(data["arguments"]),
            dict(data["call"]), tuple(data["input_shape"]), tuple(data["output_shape"]),
            {key: tuple(shape) for key, shape in data["parameters"].items()},
            tuple(LayerDescription.from_json(layer) for layer in data["layers"]))


def describe_model(plan: ModelPlan) -> tuple[LayerDescription, ...]:
    """The top-level layers of a planned model, described. Builds the model once (with
    throwaway weights) to read every resolved argument from the engine modules."""
    model_spec = job_pb2.ModelSpec.FromString(plan.spec)
    model = build_planned_model(plan, np.float32, seed=0)
    return _describe(model_spec.layers, list(model), plan.input_shape, plan.input_dtype,
                     "model.layers", "")


def _describe(layers: Any, modules: list[nn.Module], input_shape: tuple[int, ...],
              input_dtype: str, path: str, key_prefix: str) -> tuple[LayerDescription, ...]:
    # Every layer's shapes from the builder's own walk, nested blocks included.
    plan = plan_model(job_pb2.ModelSpec(layers=layers), input_shape, input_dtype, path="model")
    described = []
    shape = tuple(input_shape)
    for index, (layer, module, planned) in enumerate(zip(layers, modules, plan.layers)):
        kind = layer.WhichOneof("kind")
        prefix = f"{key_prefix}{index}."
        parameters = {prefix + key: tuple(value.shape)
                      for key, value in module.state_dict().items()}
        nested: tuple[LayerDescription, ...] = ()
        if kind == "residual":
            assert isinstance(module, nn.Residual) and isinstance(module.block, nn.Sequential)
            nested = _describe(layer.residual.layers, list(module.block), shape, input_dtype,
                               f"{path}[{index}].residual.layers", f"{prefix}block.")
        torch, arguments, call = _torch_equivalent(kind, module)
        described.append(LayerDescription(f"{path}[{index}].{kind}", kind, torch, arguments,
                                          call, shape, tuple(planned.output_shape), parameters,
                                          nested))
        shape = tuple(planned.output_shape)
        input_dtype = "float32"  # only the model's input can be integer tokens
    return tuple(described)


def _listed(value: Any) -> Any:
    """Tuples as lists (JSON), ints as ints; strings ("same") as they are."""
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return value


def _torch_equivalent(kind: str, module: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(torch.nn class, constructor arguments, forward arguments) of one engine module."""
    simple = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "silu": "SiLU",
              "flatten": "Flatten"}
    if kind in simple:
        return f"torch.nn.{simple[kind]}", {}, {}
    if kind == "linear":
        return "torch.nn.Linear", {"in_features": module.in_features,
                                   "out_features": module.out_features,
                                   "bias": module.bias is not None}, {}
    if kind == "gelu":
        return "torch.nn.GELU", {"approximate": module.approximate}, {}
    if kind == "leaky_relu":
        return "torch.nn.LeakyReLU", {"negative_slope": float(module.negative_slope)}, {}
    if kind in ("dropout", "dropout2d"):
        return f"torch.nn.{'Dropout2d' if kind == 'dropout2d' else 'Dropout'}", \
            {"p": float(module.p)}, {}
    if kind in ("batch_norm", "batch_norm2d"):
        return f"torch.nn.BatchNorm{'2d' if kind == 'batch_norm2d' else '1d'}", \
            {"num_features": module.num_features, "eps": float(module.eps),
             "momentum": float(module.momentum)}, {}
    if kind == "layer_norm":
        return "torch.nn.LayerNorm", {"normalized_shape": _listed(module.normalized_shape),
                                      "eps": float(module.eps)}, {}
    if kind == "embedding":
        return "torch.nn.Embedding", {"num_embeddings": module.num_embeddings,
                                      "embedding_dim": module.embedding_dim}, {}
    if kind in ("lstm", "gru", "rnn"):
        arguments = {"input_size": module.input_size, "hidden_size": module.hidden_size,
                     "num_layers": module.num_layers, "bidirectional": module.bidirectional,
                     "dropout": float(module.dropout), "batch_first": True}
        if kind == "rnn":
            arguments["nonlinearity"] = module.nonlinearity
        return f"torch.nn.{kind.upper()}", arguments, {}
    if kind in ("conv1d", "conv2d"):
        return f"torch.nn.Conv{kind[-2:]}", {
            "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": _listed(module.kernel_size), "stride": _listed(module.stride),
            "padding": _listed(module.padding), "dilation": _listed(module.dilation),
            "groups": module.groups, "bias": module.bias is not None}, {}
    if kind == "max_pool2d":
        return "torch.nn.MaxPool2d", {"kernel_size": _listed(module.kernel_size),
                                      "stride": _listed(module.stride),
                                      "padding": _listed(module.padding),
                                      "dilation": _listed(module.dilation)}, {}
    if kind == "avg_pool2d":
        return "torch.nn.AvgPool2d", {"kernel_size": _listed(module.kernel_size),
                                      "stride": _listed(module.stride),
                                      "padding": _listed(module.padding),
                                      "count_include_pad": bool(module.count_include_pad)}, {}
    if kind == "adaptive_avg_pool2d":
        return "torch.nn.AdaptiveAvgPool2d", {"output_size": _listed(module.output_size)}, {}
    if kind == "multihead_attention":
        return "torch.nn.MultiheadAttention", {
            "embed_dim": module.embed_dim, "num_heads": module.num_heads,
            "dropout": float(module.dropout), "bias": module.in_proj_bias is not None,
            "batch_first": True}, {"is_causal": bool(module.is_causal)}
    if kind == "transformer_encoder_layer":
        return "torch.nn.TransformerEncoderLayer", {
            "d_model": module.self_attn.embed_dim, "nhead": module.self_attn.num_heads,
            "dim_feedforward": module.linear1.out_features,
            "dropout": float(module.dropout.p),
            "activation": "relu" if module.activation is ACTIVATIONS["relu"] else "gelu",
            "layer_norm_eps": float(module.norm1.eps), "norm_first": bool(module.norm_first),
            "batch_first": True}, {"is_causal": bool(module.is_causal)}
    if kind == "positional_embedding":
        return "", {"num_positions": module.num_positions,
                    "embedding_dim": module.embedding_dim}, {}
    if kind in ("residual", "last_step", "mean_pool"):
        return "", {}, {}
    raise ValueError(f"no description for layer kind {kind!r}")
