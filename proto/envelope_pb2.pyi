from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("version", "device_id", "seq", "ts_ms", "kind", "content_type", "body", "incarnation")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    version: int
    device_id: str
    seq: int
    ts_ms: int
    kind: str
    content_type: str
    body: bytes
    incarnation: str
    def __init__(self, version: _Optional[int] = ..., device_id: _Optional[str] = ..., seq: _Optional[int] = ..., ts_ms: _Optional[int] = ..., kind: _Optional[str] = ..., content_type: _Optional[str] = ..., body: _Optional[bytes] = ..., incarnation: _Optional[str] = ...) -> None: ...
