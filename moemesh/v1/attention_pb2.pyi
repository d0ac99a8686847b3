from moemesh.v1 import inference_pb2 as _inference_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("running", "waiting", "cache_free_tokens", "cache_total_tokens")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    CACHE_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    cache_free_tokens: int
    cache_total_tokens: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., cache_free_tokens: _Optional[int] = ..., cache_total_tokens: _Optional[int] = ...) -> None: ...
