from moemesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DispatchRequest(_message.Message):
    __slots__ = ("id", "layer", "hidden", "topk_idx", "topk_weights", "placement_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDX_FIELD_NUMBER: _ClassVar[int]
    TOPK_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: int
    layer: int
    hidden: _tensor_pb2.Tensor
    topk_idx: _tensor_pb2.Tensor
    topk_weights: _tensor_pb2.Tensor
    placement_version: int
    def __init__(self, id: _Optional[int] = ..., layer: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., topk_idx: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., topk_weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., placement_version: _Optional[int] = ...) -> None: ...

class DispatchResponse(_message.Message):
    __slots__ = ("id", "output", "receive_ns", "compute_ns", "send_ns")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    SEND_NS_FIELD_NUMBER: _ClassVar[int]
    id: int
    output: _tensor_pb2.Tensor
    receive_ns: int
    compute_ns: int
    send_ns: int
    def __init__(self, id: _Optional[int] = ..., output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., receive_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., send_ns: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_type", "hidden_size", "n_routed_experts", "experts", "dtype", "tokens_computed", "placement_version", "checkpoint", "max_message_bytes")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_ROUTED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    hidden_size: int
    n_routed_experts: int
    experts: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    dtype: str
    tokens_computed: int
    placement_version: int
    checkpoint: str
    max_message_bytes: int
    def __init__(self, model_type: _Optional[str] = ..., hidden_size: _Optional[int] = ..., n_routed_experts: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., dtype: _Optional[str] = ..., tokens_computed: _Optional[int] = ..., placement_version: _Optional[int] = ..., checkpoint: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
