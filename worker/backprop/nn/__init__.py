"""Layers, losses and initialisers with torch.nn's names, shapes and state_dict keys."""

from worker.backprop.nn import capture, functional, init
from worker.backprop.nn.attention import MultiheadAttention
from worker.backprop.nn.conv import AdaptiveAvgPool2d, AvgPool2d, Conv1d, Conv2d, MaxPool2d
from worker.backprop.nn.layers import (
    GELU,
    Dropout,
    Dropout2d,
    Embedding,
    FeedbackAlignmentLinear,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    LogSoftmax,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from worker.backprop.nn.module import Module, Parameter
from worker.backprop.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm
from worker.backprop.nn.recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, detach_state
from worker.backprop.nn.transformer import (
    PositionalEmbedding,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "GELU", "BatchNorm1d", "Dropout", "Embedding", "Flatten", "Identity", "LayerNorm",
    "LeakyReLU", "Linear", "LogSoftmax", "Module", "Parameter", "ReLU", "Residual",
    "Sequential", "SiLU", "Sigmoid", "Softmax", "Tanh", "functional", "init",
    "GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "detach_state",
    "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv1d", "Conv2d", "Dropout2d",
    "MaxPool2d",
    "MultiheadAttention", "PositionalEmbedding", "TransformerEncoder",
    "TransformerEncoderLayer",
    "FeedbackAlignmentLinear", "capture",
]
