from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SessionRequest(_message.Message):
    __slots__ = ("backend", "hidden_size", "timeout_s", "ping_interval_s", "placement_version")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PING_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    backend: str
    hidden_size: int
    timeout_s: float
    ping_interval_s: float
    placement_version: int
    def __init__(self, backend: _Optional[str] = ..., hidden_size: _Optional[int] = ..., timeout_s: _Optional[float] = ..., ping_interval_s: _Optional[float] = ..., placement_version: _Optional[int] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("store", "prefix", "rank", "world_size", "backend", "inline_bytes")
    STORE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INLINE_BYTES_FIELD_NUMBER: _ClassVar[int]
    store: str
    prefix: str
    rank: int
    world_size: int
    backend: str
    inline_bytes: int
    def __init__(self, store: _Optional[str] = ..., prefix: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., backend: _Optional[str] = ..., inline_bytes: _Optional[int] = ...) -> None: ...
