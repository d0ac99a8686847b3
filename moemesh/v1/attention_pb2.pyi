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
    __slots__ = ("running", "waiting", "cache_free_tokens", "cache_total_tokens", "expert_loads", "window_seconds", "prompt_tokens", "prefix_hit_tokens", "cached_blocks", "evicted_blocks", "block_size", "prefix_hashes", "expert_hops", "hop_window_seconds", "micro_batches")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    CACHE_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOADS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HASHES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HOPS_FIELD_NUMBER: _ClassVar[int]
    HOP_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    cache_free_tokens: int
    cache_total_tokens: int
    expert_loads: _containers.RepeatedCompositeFieldContainer[LayerLoad]
    window_seconds: float
    prompt_tokens: int
    prefix_hit_tokens: int
    cached_blocks: int
    evicted_blocks: int
    block_size: int
    prefix_hashes: _containers.RepeatedScalarFieldContainer[int]
    expert_hops: _containers.RepeatedCompositeFieldContainer[ExpertHops]
    hop_window_seconds: float
    micro_batches: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., cache_free_tokens: _Optional[int] = ..., cache_total_tokens: _Optional[int] = ..., expert_loads: _Optional[_Iterable[_Union[LayerLoad, _Mapping]]] = ..., window_seconds: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., cached_blocks: _Optional[int] = ..., evicted_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., prefix_hashes: _Optional[_Iterable[int]] = ..., expert_hops: _Optional[_Iterable[_Union[ExpertHops, _Mapping]]] = ..., hop_window_seconds: _Optional[float] = ..., micro_batches: _Optional[int] = ...) -> None: ...

class ExpertHops(_message.Message):
    __slots__ = ("address", "samples", "hop_p50_us", "hop_p99_us", "compute_p50_us")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HOP_P50_US_FIELD_NUMBER: _ClassVar[int]
    HOP_P99_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_P50_US_FIELD_NUMBER: _ClassVar[int]
    address: str
    samples: int
    hop_p50_us: float
    hop_p99_us: float
    compute_p50_us: float
    def __init__(self, address: _Optional[str] = ..., samples: _Optional[int] = ..., hop_p50_us: _Optional[float] = ..., hop_p99_us: _Optional[float] = ..., compute_p50_us: _Optional[float] = ...) -> None: ...

class LayerLoad(_message.Message):
    __slots__ = ("layer", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...
