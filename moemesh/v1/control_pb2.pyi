from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListProcessesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Process(_message.Message):
    __slots__ = ("name", "role", "pid", "port", "state", "exit_code")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    pid: int
    port: int
    state: str
    exit_code: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., pid: _Optional[int] = ..., port: _Optional[int] = ..., state: _Optional[str] = ..., exit_code: _Optional[int] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[Process]
    def __init__(self, processes: _Optional[_Iterable[_Union[Process, _Mapping]]] = ...) -> None: ...

class AddExpertNodesRequest(_message.Message):
    __slots__ = ("count", "wait_ready")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    WAIT_READY_FIELD_NUMBER: _ClassVar[int]
    count: int
    wait_ready: bool
    def __init__(self, count: _Optional[int] = ..., wait_ready: _Optional[bool] = ...) -> None: ...

class RemoveExpertNodeRequest(_message.Message):
    __slots__ = ("name", "wait_exit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WAIT_EXIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    wait_exit: bool
    def __init__(self, name: _Optional[str] = ..., wait_exit: _Optional[bool] = ...) -> None: ...
