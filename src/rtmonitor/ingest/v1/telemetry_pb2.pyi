from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Packet(_message.Message):
    __slots__ = ("device_id", "timestamp_ms", "kind", "payload", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    timestamp_ms: int
    kind: str
    payload: bytes
    values: _containers.ScalarMap[str, float]
    def __init__(self, device_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., kind: _Optional[str] = ..., payload: _Optional[bytes] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("accepted", "rejected", "rejected_by_reason", "truncated")
    class RejectedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    rejected_by_reason: _containers.ScalarMap[str, int]
    truncated: bool
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., rejected_by_reason: _Optional[_Mapping[str, int]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("producer_id", "batch_id", "packets", "columns")
    PRODUCER_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    producer_id: str
    batch_id: int
    packets: _containers.RepeatedCompositeFieldContainer[Packet]
    columns: Columns
    def __init__(self, producer_id: _Optional[str] = ..., batch_id: _Optional[int] = ..., packets: _Optional[_Iterable[_Union[Packet, _Mapping]]] = ..., columns: _Optional[_Union[Columns, _Mapping]] = ...) -> None: ...

class Columns(_message.Message):
    __slots__ = ("count", "device_ids", "kinds", "device_index", "kind_index", "payload_size", "timestamp_ms", "values")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_INDEX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    count: int
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    device_index: bytes
    kind_index: bytes
    payload_size: bytes
    timestamp_ms: bytes
    values: _containers.RepeatedCompositeFieldContainer[ValueColumn]
    def __init__(self, count: _Optional[int] = ..., device_ids: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[str]] = ..., device_index: _Optional[bytes] = ..., kind_index: _Optional[bytes] = ..., payload_size: _Optional[bytes] = ..., timestamp_ms: _Optional[bytes] = ..., values: _Optional[_Iterable[_Union[ValueColumn, _Mapping]]] = ...) -> None: ...

class ValueColumn(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: bytes
    def __init__(self, name: _Optional[str] = ..., values: _Optional[bytes] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("producer_id", "batch_id", "accepted", "rejected", "rejected_by_reason", "duplicate")
    class RejectedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PRODUCER_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    producer_id: str
    batch_id: int
    accepted: int
    rejected: int
    rejected_by_reason: _containers.ScalarMap[str, int]
    duplicate: bool
    def __init__(self, producer_id: _Optional[str] = ..., batch_id: _Optional[int] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., rejected_by_reason: _Optional[_Mapping[str, int]] = ..., duplicate: _Optional[bool] = ...) -> None: ...
