from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobSpec(_message.Message):
    __slots__ = ("name", "model", "loss", "label_smoothing", "optimizer", "schedule", "clipping", "data", "gradient_accumulation_steps", "eval_interval_steps", "resources", "seed", "dtype", "checkpoint", "priority", "early_stopping", "communication")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLIPPING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_INTERVAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    COMMUNICATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: ModelSpec
    loss: str
    label_smoothing: float
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    clipping: ClippingSpec
    data: DataSpec
    gradient_accumulation_steps: int
    eval_interval_steps: int
    resources: ResourceSpec
    seed: int
    dtype: str
    checkpoint: CheckpointSpec
    priority: int
    early_stopping: EarlyStoppingSpec
    communication: CommunicationSpec
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., loss: _Optional[str] = ..., label_smoothing: _Optional[float] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., schedule: _Optional[_Union[ScheduleSpec, _Mapping]] = ..., clipping: _Optional[_Union[ClippingSpec, _Mapping]] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., gradient_accumulation_steps: _Optional[int] = ..., eval_interval_steps: _Optional[int] = ..., resources: _Optional[_Union[ResourceSpec, _Mapping]] = ..., seed: _Optional[int] = ..., dtype: _Optional[str] = ..., checkpoint: _Optional[_Union[CheckpointSpec, _Mapping]] = ..., priority: _Optional[int] = ..., early_stopping: _Optional[_Union[EarlyStoppingSpec, _Mapping]] = ..., communication: _Optional[_Union[CommunicationSpec, _Mapping]] = ...) -> None: ...

class CommunicationSpec(_message.Message):
    __slots__ = ("compression",)
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    compression: CompressionSpec
    def __init__(self, compression: _Optional[_Union[CompressionSpec, _Mapping]] = ...) -> None: ...

class CompressionSpec(_message.Message):
    __slots__ = ("powersgd", "topk")
    POWERSGD_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    powersgd: PowerSGDSpec
    topk: TopKSpec
    def __init__(self, powersgd: _Optional[_Union[PowerSGDSpec, _Mapping]] = ..., topk: _Optional[_Union[TopKSpec, _Mapping]] = ...) -> None: ...

class PowerSGDSpec(_message.Message):
    __slots__ = ("rank",)
    RANK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    def __init__(self, rank: _Optional[int] = ...) -> None: ...

class TopKSpec(_message.Message):
    __slots__ = ("ratio",)
    RATIO_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    def __init__(self, ratio: _Optional[float] = ...) -> None: ...

class EarlyStoppingSpec(_message.Message):
    __slots__ = ("patience", "min_delta", "restore_best")
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESTORE_BEST_FIELD_NUMBER: _ClassVar[int]
    patience: int
    min_delta: float
    restore_best: bool
    def __init__(self, patience: _Optional[int] = ..., min_delta: _Optional[float] = ..., restore_best: _Optional[bool] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("layers", "init_from", "init_strict")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INIT_FROM_FIELD_NUMBER: _ClassVar[int]
    INIT_STRICT_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    init_from: str
    init_strict: bool
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., init_from: _Optional[str] = ..., init_strict: _Optional[bool] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("linear", "relu", "tanh", "sigmoid", "gelu", "silu", "leaky_relu", "dropout", "batch_norm", "layer_norm", "embedding", "residual", "lstm", "gru", "rnn", "last_step", "flatten", "conv1d", "conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm2d", "dropout2d", "multihead_attention", "transformer_encoder_layer", "positional_embedding", "mean_pool", "trainable")
    class Linear(_message.Message):
        __slots__ = ("out_features", "bias", "feedback")
        OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
        BIAS_FIELD_NUMBER: _ClassVar[int]
        FEEDBACK_FIELD_NUMBER: _ClassVar[int]
        out_features: int
        bias: bool
        feedback: str
        def __init__(self, out_features: _Optional[int] = ..., bias: _Optional[bool] = ..., feedback: _Optional[str] = ...) -> None: ...
    class ReLU(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Tanh(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Sigmoid(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class GELU(_message.Message):
        __slots__ = ("approximate",)
        APPROXIMATE_FIELD_NUMBER: _ClassVar[int]
        approximate: str
        def __init__(self, approximate: _Optional[str] = ...) -> None: ...
    class SiLU(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class LeakyReLU(_message.Message):
        __slots__ = ("negative_slope",)
        NEGATIVE_SLOPE_FIELD_NUMBER: _ClassVar[int]
        negative_slope: float
        def __init__(self, negative_slope: _Optional[float] = ...) -> None: ...
    class Dropout(_message.Message):
        __slots__ = ("p",)
        P_FIELD_NUMBER: _ClassVar[int]
        p: float
        def __init__(self, p: _Optional[float] = ...) -> None: ...
    class BatchNorm(_message.Message):
        __slots__ = ("eps", "momentum")
        EPS_FIELD_NUMBER: _ClassVar[int]
        MOMENTUM_FIELD_NUMBER: _ClassVar[int]
        eps: float
        momentum: float
        def __init__(self, eps: _Optional[float] = ..., momentum: _Optional[float] = ...) -> None: ...
    class LayerNorm(_message.Message):
        __slots__ = ("eps",)
        EPS_FIELD_NUMBER: _ClassVar[int]
        eps: float
        def __init__(self, eps: _Optional[float] = ...) -> None: ...
    class Embedding(_message.Message):
        __slots__ = ("num_embeddings", "embedding_dim")
        NUM_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
        EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
        num_embeddings: int
        embedding_dim: int
        def __init__(self, num_embeddings: _Optional[int] = ..., embedding_dim: _Optional[int] = ...) -> None: ...
    class Residual(_message.Message):
        __slots__ = ("layers",)
        LAYERS_FIELD_NUMBER: _ClassVar[int]
        layers: _containers.RepeatedCompositeFieldContainer[Layer]
        def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...
    class Recurrent(_message.Message):
        __slots__ = ("hidden_size", "num_layers", "bidirectional", "dropout", "nonlinearity")
        HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
        NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
        BIDIRECTIONAL_FIELD_NUMBER: _ClassVar[int]
        DROPOUT_FIELD_NUMBER: _ClassVar[int]
        NONLINEARITY_FIELD_NUMBER: _ClassVar[int]
        hidden_size: int
        num_layers: int
        bidirectional: bool
        dropout: float
        nonlinearity: str
        def __init__(self, hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., bidirectional: _Optional[bool] = ..., dropout: _Optional[float] = ..., nonlinearity: _Optional[str] = ...) -> None: ...
    class LastStep(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Flatten(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Conv1d(_message.Message):
        __slots__ = ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias")
        OUT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
        KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
        STRIDE_FIELD_NUMBER: _ClassVar[int]
        PADDING_FIELD_NUMBER: _ClassVar[int]
        DILATION_FIELD_NUMBER: _ClassVar[int]
        GROUPS_FIELD_NUMBER: _ClassVar[int]
        BIAS_FIELD_NUMBER: _ClassVar[int]
        out_channels: int
        kernel_size: _struct_pb2.Value
        stride: _struct_pb2.Value
        padding: _struct_pb2.Value
        dilation: _struct_pb2.Value
        groups: int
        bias: bool
        def __init__(self, out_channels: _Optional[int] = ..., kernel_size: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., stride: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., padding: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., dilation: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., groups: _Optional[int] = ..., bias: _Optional[bool] = ...) -> None: ...
    class Conv2d(_message.Message):
        __slots__ = ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias")
        OUT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
        KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
        STRIDE_FIELD_NUMBER: _ClassVar[int]
        PADDING_FIELD_NUMBER: _ClassVar[int]
        DILATION_FIELD_NUMBER: _ClassVar[int]
        GROUPS_FIELD_NUMBER: _ClassVar[int]
        BIAS_FIELD_NUMBER: _ClassVar[int]
        out_channels: int
        kernel_size: _struct_pb2.Value
        stride: _struct_pb2.Value
        padding: _struct_pb2.Value
        dilation: _struct_pb2.Value
        groups: int
        bias: bool
        def __init__(self, out_channels: _Optional[int] = ..., kernel_size: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., stride: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., padding: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., dilation: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., groups: _Optional[int] = ..., bias: _Optional[bool] = ...) -> None: ...
    class MaxPool2d(_message.Message):
        __slots__ = ("kernel_size", "stride", "padding", "dilation")
        KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
        STRIDE_FIELD_NUMBER: _ClassVar[int]
        PADDING_FIELD_NUMBER: _ClassVar[int]
        DILATION_FIELD_NUMBER: _ClassVar[int]
        kernel_size: _struct_pb2.Value
        stride: _struct_pb2.Value
        padding: _struct_pb2.Value
        dilation: _struct_pb2.Value
        def __init__(self, kernel_size: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., stride: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., padding: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., dilation: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    class AvgPool2d(_message.Message):
        __slots__ = ("kernel_size", "stride", "padding", "count_include_pad")
        KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
        STRIDE_FIELD_NUMBER: _ClassVar[int]
        PADDING_FIELD_NUMBER: _ClassVar[int]
        COUNT_INCLUDE_PAD_FIELD_NUMBER: _ClassVar[int]
        kernel_size: _struct_pb2.Value
        stride: _struct_pb2.Value
        padding: _struct_pb2.Value
        count_include_pad: bool
        def __init__(self, kernel_size: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., stride: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., padding: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., count_include_pad: _Optional[bool] = ...) -> None: ...
    class AdaptiveAvgPool2d(_message.Message):
        __slots__ = ("output_size",)
        OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
        output_size: _struct_pb2.Value
        def __init__(self, output_size: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    class MultiheadAttention(_message.Message):
        __slots__ = ("num_heads", "dropout", "bias", "is_causal")
        NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
        DROPOUT_FIELD_NUMBER: _ClassVar[int]
        BIAS_FIELD_NUMBER: _ClassVar[int]
        IS_CAUSAL_FIELD_NUMBER: _ClassVar[int]
        num_heads: int
        dropout: float
        bias: bool
        is_causal: bool
        def __init__(self, num_heads: _Optional[int] = ..., dropout: _Optional[float] = ..., bias: _Optional[bool] = ..., is_causal: _Optional[bool] = ...) -> None: ...
    class TransformerEncoderLayer(_message.Message):
        __slots__ = ("nhead", "dim_feedforward", "dropout", "activation", "norm_first", "layer_norm_eps", "is_causal")
        NHEAD_FIELD_NUMBER: _ClassVar[int]
        DIM_FEEDFORWARD_FIELD_NUMBER: _ClassVar[int]
        DROPOUT_FIELD_NUMBER: _ClassVar[int]
        ACTIVATION_FIELD_NUMBER: _ClassVar[int]
        NORM_FIRST_FIELD_NUMBER: _ClassVar[int]
        LAYER_NORM_EPS_FIELD_NUMBER: _ClassVar[int]
        IS_CAUSAL_FIELD_NUMBER: _ClassVar[int]
        nhead: int
        dim_feedforward: int
        dropout: float
        activation: str
        norm_first: bool
        layer_norm_eps: float
        is_causal: bool
        def __init__(self, nhead: _Optional[int] = ..., dim_feedforward: _Optional[int] = ..., dropout: _Optional[float] = ..., activation: _Optional[str] = ..., norm_first: _Optional[bool] = ..., layer_norm_eps: _Optional[float] = ..., is_causal: _Optional[bool] = ...) -> None: ...
    class PositionalEmbedding(_message.Message):
        __slots__ = ("num_positions",)
        NUM_POSITIONS_FIELD_NUMBER: _ClassVar[int]
        num_positions: int
        def __init__(self, num_positions: _Optional[int] = ...) -> None: ...
    class MeanPool(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    RELU_FIELD_NUMBER: _ClassVar[int]
    TANH_FIELD_NUMBER: _ClassVar[int]
    SIGMOID_FIELD_NUMBER: _ClassVar[int]
    GELU_FIELD_NUMBER: _ClassVar[int]
    SILU_FIELD_NUMBER: _ClassVar[int]
    LEAKY_RELU_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    BATCH_NORM_FIELD_NUMBER: _ClassVar[int]
    LAYER_NORM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    LSTM_FIELD_NUMBER: _ClassVar[int]
    GRU_FIELD_NUMBER: _ClassVar[int]
    RNN_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    CONV1D_FIELD_NUMBER: _ClassVar[int]
    CONV2D_FIELD_NUMBER: _ClassVar[int]
    MAX_POOL2D_FIELD_NUMBER: _ClassVar[int]
    AVG_POOL2D_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_AVG_POOL2D_FIELD_NUMBER: _ClassVar[int]
    BATCH_NORM2D_FIELD_NUMBER: _ClassVar[int]
    DROPOUT2D_FIELD_NUMBER: _ClassVar[int]
    MULTIHEAD_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMER_ENCODER_LAYER_FIELD_NUMBER: _ClassVar[int]
    POSITIONAL_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MEAN_POOL_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    linear: Layer.Linear
    relu: Layer.ReLU
    tanh: Layer.Tanh
    sigmoid: Layer.Sigmoid
    gelu: Layer.GELU
    silu: Layer.SiLU
    leaky_relu: Layer.LeakyReLU
    dropout: Layer.Dropout
    batch_norm: Layer.BatchNorm
    layer_norm: Layer.LayerNorm
    embedding: Layer.Embedding
    residual: Layer.Residual
    lstm: Layer.Recurrent
    gru: Layer.Recurrent
    rnn: Layer.Recurrent
    last_step: Layer.LastStep
    flatten: Layer.Flatten
    conv1d: Layer.Conv1d
    conv2d: Layer.Conv2d
    max_pool2d: Layer.MaxPool2d
    avg_pool2d: Layer.AvgPool2d
    adaptive_avg_pool2d: Layer.AdaptiveAvgPool2d
    batch_norm2d: Layer.BatchNorm
    dropout2d: Layer.Dropout
    multihead_attention: Layer.MultiheadAttention
    transformer_encoder_layer: Layer.TransformerEncoderLayer
    positional_embedding: Layer.PositionalEmbedding
    mean_pool: Layer.MeanPool
    trainable: bool
    def __init__(self, linear: _Optional[_Union[Layer.Linear, _Mapping]] = ..., relu: _Optional[_Union[Layer.ReLU, _Mapping]] = ..., tanh: _Optional[_Union[Layer.Tanh, _Mapping]] = ..., sigmoid: _Optional[_Union[Layer.Sigmoid, _Mapping]] = ..., gelu: _Optional[_Union[Layer.GELU, _Mapping]] = ..., silu: _Optional[_Union[Layer.SiLU, _Mapping]] = ..., leaky_relu: _Optional[_Union[Layer.LeakyReLU, _Mapping]] = ..., dropout: _Optional[_Union[Layer.Dropout, _Mapping]] = ..., batch_norm: _Optional[_Union[Layer.BatchNorm, _Mapping]] = ..., layer_norm: _Optional[_Union[Layer.LayerNorm, _Mapping]] = ..., embedding: _Optional[_Union[Layer.Embedding, _Mapping]] = ..., residual: _Optional[_Union[Layer.Residual, _Mapping]] = ..., lstm: _Optional[_Union[Layer.Recurrent, _Mapping]] = ..., gru: _Optional[_Union[Layer.Recurrent, _Mapping]] = ..., rnn: _Optional[_Union[Layer.Recurrent, _Mapping]] = ..., last_step: _Optional[_Union[Layer.LastStep, _Mapping]] = ..., flatten: _Optional[_Union[Layer.Flatten, _Mapping]] = ..., conv1d: _Optional[_Union[Layer.Conv1d, _Mapping]] = ..., conv2d: _Optional[_Union[Layer.Conv2d, _Mapping]] = ..., max_pool2d: _Optional[_Union[Layer.MaxPool2d, _Mapping]] = ..., avg_pool2d: _Optional[_Union[Layer.AvgPool2d, _Mapping]] = ..., adaptive_avg_pool2d: _Optional[_Union[Layer.AdaptiveAvgPool2d, _Mapping]] = ..., batch_norm2d: _Optional[_Union[Layer.BatchNorm, _Mapping]] = ..., dropout2d: _Optional[_Union[Layer.Dropout, _Mapping]] = ..., multihead_attention: _Optional[_Union[Layer.MultiheadAttention, _Mapping]] = ..., transformer_encoder_layer: _Optional[_Union[Layer.TransformerEncoderLayer, _Mapping]] = ..., positional_embedding: _Optional[_Union[Layer.PositionalEmbedding, _Mapping]] = ..., mean_pool: _Optional[_Union[Layer.MeanPool, _Mapping]] = ..., trainable: _Optional[bool] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lion", "adafactor", "kfac")
    class KFAC(_message.Message):
        __slots__ = ("lr", "momentum", "damping", "factor_decay", "factor_update_interval", "inverse_update_interval", "weight_decay", "kl_clip", "damping_method")
        LR_FIELD_NUMBER: _ClassVar[int]
        MOMENTUM_FIELD_NUMBER: _ClassVar[int]
        DAMPING_FIELD_NUMBER: _ClassVar[int]
        FACTOR_DECAY_FIELD_NUMBER: _ClassVar[int]
        FACTOR_UPDATE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
        INVERSE_UPDATE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
        WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
        KL_CLIP_FIELD_NUMBER: _ClassVar[int]
        DAMPING_METHOD_FIELD_NUMBER: _ClassVar[int]
        lr: float
        momentum: float
        damping: float
        factor_decay: float
        factor_update_interval: int
        inverse_update_interval: int
        weight_decay: float
        kl_clip: float
        damping_method: str
        def __init__(self, lr: _Optional[float] = ..., momentum: _Optional[float] = ..., damping: _Optional[float] = ..., factor_decay: _Optional[float] = ..., factor_update_interval: _Optional[int] = ..., inverse_update_interval: _Optional[int] = ..., weight_decay: _Optional[float] = ..., kl_clip: _Optional[float] = ..., damping_method: _Optional[str] = ...) -> None: ...
    class SGD(_message.Message):
        __slots__ = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
        LR_FIELD_NUMBER: _ClassVar[int]
        MOMENTUM_FIELD_NUMBER: _ClassVar[int]
        DAMPENING_FIELD_NUMBER: _ClassVar[int]
        WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
        NESTEROV_FIELD_NUMBER: _ClassVar[int]
        MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
        lr: float
        momentum: float
        dampening: float
        weight_decay: float
        nesterov: bool
        maximize: bool
        def __init__(self, lr: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., weight_decay: _Optional[float] = ..., nesterov: _Optional[bool] = ..., maximize: _Optional[bool] = ...) -> None: ...
    class Adam(_message.Message):
        __slots__ = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
        LR_FIELD_NUMBER: _ClassVar[int]
        BETAS_FIELD_NUMBER: _ClassVar[int]
        EPS_FIELD_NUMBER: _ClassVar[int]
        WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
        AMSGRAD_FIELD_NUMBER: _ClassVar[int]
        MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
        lr: float
        betas: _containers.RepeatedScalarFieldContainer[float]
        eps: float
        weight_decay: float
        amsgrad: bool
        maximize: bool
        def __init__(self, lr: _Optional[float] = ..., betas: _Optional[_Iterable[float]] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., amsgrad: _Optional[bool] = ..., maximize: _Optional[bool] = ...) -> None: ...
    class AdamW(_message.Message):
        __slots__ = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
        LR_FIELD_NUMBER: _ClassVar[int]
        BETAS_FIELD_NUMBER: _ClassVar[int]
        EPS_FIELD_NUMBER: _ClassVar[int]
        WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
        AMSGRAD_FIELD_NUMBER: _ClassVar[int]
        MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
        lr: float
        betas: _containers.RepeatedScalarFieldContainer[float]
        eps: float
        weight_decay: float
        amsgrad: bool
        maximize: bool
        def __init__(self, lr: _Optional[float] = ..., betas: _Optional[_Iterable[float]] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., amsgrad: _Optional[bool] = ..., maximize: _Optional[bool] = ...) -> None: ...
    class RMSprop(_message.Message):
        __slots__ = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
        LR_FIELD_NUMBER: _ClassVar[int]
        ALPHA_FIELD_NUMBER: _ClassVar[int]
        EPS_FIELD_NUMBER: _ClassVar[int]
        WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
        MOMENTUM_FIELD_NUMBER: _ClassVar[int]
        CENTERED_FIELD_NUMBER: _ClassVar[int]
        MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
        lr: float
        alpha: float
        eps: float
        weight_decay: float
        momentum: float
        centered: bool
        maximize: bool
        def __init__(self, lr: _Optional[float] = ..., alpha: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., momentum: _Optional[float] = ..., centered: _Optional[bool] = ..., maximize: _Optional[bool] = ...) -> None: ...
    class Adagrad(_message.Message):
        __slots__ = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize")
        LR_FIELD_NUMBER: _ClassVar[int]
        LR_DECAY_FIELD_NUMBER: _ClassVar[int]
        WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
        INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
        EPS_FIELD_NUMBER: _ClassVar[int]
        MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
        lr: float
        lr_decay: float
        weight_decay: float
        initial_accumulator_value: float
        eps: float
        maximize: bool
        def __init__(self, lr: _Optional[float] = ..., lr_decay: _Optional[float] = ..., weight_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ..., eps: _Optional[float] = ..., maximize: _Optional[bool] = ...) -> None: ...
    class Lion(_message.Message):
        __slots__ = ("lr", "betas", "weight_decay")
        LR_FIELD_NUMBER: _ClassVar[int]
        BETAS_FIELD_NUMBER: _ClassVar[int]
        WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
        lr: float
        betas: _containers.RepeatedScalarFieldContainer[float]
        weight_decay: float
        def __init__(self, lr: _Optional[float] = ..., betas: _Optional[_Iterable[float]] = ..., weight_decay: _Optional[float] = ...) -> None: ...
    class Adafactor(_message.Message):
        __slots__ = ("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay", "maximize")
        LR_FIELD_NUMBER: _ClassVar[int]
        BETA2_DECAY_FIELD_NUMBER: _ClassVar[int]
        EPS1_FIELD_NUMBER: _ClassVar[int]
        EPS2_FIELD_NUMBER: _ClassVar[int]
        D_FIELD_NUMBER: _ClassVar[int]
        WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
        MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
        lr: float
        beta2_decay: float
        eps1: float
        eps2: float
        d: float
        weight_decay: float
        maximize: bool
        def __init__(self, lr: _Optional[float] = ..., beta2_decay: _Optional[float] = ..., eps1: _Optional[float] = ..., eps2: _Optional[float] = ..., d: _Optional[float] = ..., weight_decay: _Optional[float] = ..., maximize: _Optional[bool] = ...) -> None: ...
    SGD_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    ADAMW_FIELD_NUMBER: _ClassVar[int]
    RMSPROP_FIELD_NUMBER: _ClassVar[int]
    ADAGRAD_FIELD_NUMBER: _ClassVar[int]
    LION_FIELD_NUMBER: _ClassVar[int]
    ADAFACTOR_FIELD_NUMBER: _ClassVar[int]
    KFAC_FIELD_NUMBER: _ClassVar[int]
    sgd: OptimizerSpec.SGD
    adam: OptimizerSpec.Adam
    adamw: OptimizerSpec.AdamW
    rmsprop: OptimizerSpec.RMSprop
    adagrad: OptimizerSpec.Adagrad
    lion: OptimizerSpec.Lion
    adafactor: OptimizerSpec.Adafactor
    kfac: OptimizerSpec.KFAC
    def __init__(self, sgd: _Optional[_Union[OptimizerSpec.SGD, _Mapping]] = ..., adam: _Optional[_Union[OptimizerSpec.Adam, _Mapping]] = ..., adamw: _Optional[_Union[OptimizerSpec.AdamW, _Mapping]] = ..., rmsprop: _Optional[_Union[OptimizerSpec.RMSprop, _Mapping]] = ..., adagrad: _Optional[_Union[OptimizerSpec.Adagrad, _Mapping]] = ..., lion: _Optional[_Union[OptimizerSpec.Lion, _Mapping]] = ..., adafactor: _Optional[_Union[OptimizerSpec.Adafactor, _Mapping]] = ..., kfac: _Optional[_Union[OptimizerSpec.KFAC, _Mapping]] = ...) -> None: ...

class ScheduleSpec(_message.Message):
    __slots__ = ("constant", "step_decay", "exponential", "linear_warmup", "cosine_with_warmup")
    class Constant(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class StepDecay(_message.Message):
        __slots__ = ("step_size", "gamma")
        STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
        GAMMA_FIELD_NUMBER: _ClassVar[int]
        step_size: int
        gamma: float
        def __init__(self, step_size: _Optional[int] = ..., gamma: _Optional[float] = ...) -> None: ...
    class Exponential(_message.Message):
        __slots__ = ("gamma",)
        GAMMA_FIELD_NUMBER: _ClassVar[int]
        gamma: float
        def __init__(self, gamma: _Optional[float] = ...) -> None: ...
    class LinearWarmup(_message.Message):
        __slots__ = ("warmup_steps", "start_factor")
        WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
        START_FACTOR_FIELD_NUMBER: _ClassVar[int]
        warmup_steps: int
        start_factor: float
        def __init__(self, warmup_steps: _Optional[int] = ..., start_factor: _Optional[float] = ...) -> None: ...
    class CosineWithWarmup(_message.Message):
        __slots__ = ("warmup_steps", "total_steps", "min_lr_ratio", "start_factor")
        WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
        TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
        MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
        START_FACTOR_FIELD_NUMBER: _ClassVar[int]
        warmup_steps: int
        total_steps: int
        min_lr_ratio: float
        start_factor: float
        def __init__(self, warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., start_factor: _Optional[float] = ...) -> None: ...
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    STEP_DECAY_FIELD_NUMBER: _ClassVar[int]
    EXPONENTIAL_FIELD_NUMBER: _ClassVar[int]
    LINEAR_WARMUP_FIELD_NUMBER: _ClassVar[int]
    COSINE_WITH_WARMUP_FIELD_NUMBER: _ClassVar[int]
    constant: ScheduleSpec.Constant
    step_decay: ScheduleSpec.StepDecay
    exponential: ScheduleSpec.Exponential
    linear_warmup: ScheduleSpec.LinearWarmup
    cosine_with_warmup: ScheduleSpec.CosineWithWarmup
    def __init__(self, constant: _Optional[_Union[ScheduleSpec.Constant, _Mapping]] = ..., step_decay: _Optional[_Union[ScheduleSpec.StepDecay, _Mapping]] = ..., exponential: _Optional[_Union[ScheduleSpec.Exponential, _Mapping]] = ..., linear_warmup: _Optional[_Union[ScheduleSpec.LinearWarmup, _Mapping]] = ..., cosine_with_warmup: _Optional[_Union[ScheduleSpec.CosineWithWarmup, _Mapping]] = ...) -> None: ...

class ClippingSpec(_message.Message):
    __slots__ = ("max_norm", "max_value")
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    max_norm: float
    max_value: float
    def __init__(self, max_norm: _Optional[float] = ..., max_value: _Optional[float] = ...) -> None: ...

class DataSpec(_message.Message):
    __slots__ = ("dataset", "batch_size", "epochs", "validation_fraction", "micro_batches", "standardize", "shuffle", "context_length", "label_column", "feature_columns")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    STANDARDIZE_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    FEATURE_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    batch_size: int
    epochs: int
    validation_fraction: float
    micro_batches: int
    standardize: bool
    shuffle: bool
    context_length: int
    label_column: str
    feature_columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dataset: _Optional[str] = ..., batch_size: _Optional[int] = ..., epochs: _Optional[int] = ..., validation_fraction: _Optional[float] = ..., micro_batches: _Optional[int] = ..., standardize: _Optional[bool] = ..., shuffle: _Optional[bool] = ..., context_length: _Optional[int] = ..., label_column: _Optional[str] = ..., feature_columns: _Optional[_Iterable[str]] = ...) -> None: ...

class ResourceSpec(_message.Message):
    __slots__ = ("workers", "parameter_servers", "cpus_per_worker", "placement_strategy", "step_deadline", "memory_bytes_per_worker", "memory_bytes_per_shard")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SERVERS_FIELD_NUMBER: _ClassVar[int]
    CPUS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STEP_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    workers: int
    parameter_servers: int
    cpus_per_worker: float
    placement_strategy: str
    step_deadline: StepDeadlineSpec
    memory_bytes_per_worker: int
    memory_bytes_per_shard: int
    def __init__(self, workers: _Optional[int] = ..., parameter_servers: _Optional[int] = ..., cpus_per_worker: _Optional[float] = ..., placement_strategy: _Optional[str] = ..., step_deadline: _Optional[_Union[StepDeadlineSpec, _Mapping]] = ..., memory_bytes_per_worker: _Optional[int] = ..., memory_bytes_per_shard: _Optional[int] = ...) -> None: ...

class StepDeadlineSpec(_message.Message):
    __slots__ = ("multiplier", "floor_seconds")
    MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    FLOOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    multiplier: float
    floor_seconds: float
    def __init__(self, multiplier: _Optional[float] = ..., floor_seconds: _Optional[float] = ...) -> None: ...

class CheckpointSpec(_message.Message):
    __slots__ = ("interval_steps",)
    INTERVAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    interval_steps: int
    def __init__(self, interval_steps: _Optional[int] = ...) -> None: ...
