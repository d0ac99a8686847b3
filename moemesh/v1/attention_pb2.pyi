from moemesh.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("running", "waiting", "cache_free_tokens", "cache_total_tokens", "expert_loads", "window_seconds")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    CACHE_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOADS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    cache_free_tokens: int
    cache_total_tokens: int
    expert_loads: _containers.RepeatedCompositeFieldContainer[LayerLoad]
    window_seconds: float
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., cache_free_tokens: _Optional[int] = ..., cache_total_tokens: _Optional[int] = ..., expert_loads: _Optional[_Iterable[_Union[LayerLoad, _Mapping]]] = ..., window_seconds: _Optional[float] = ...) -> None: ...

class LayerLoad(_message.Message):
    __slots__ = ("layer", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...
