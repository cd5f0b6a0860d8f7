from typing import NamedTuple

# Struct sequences in C (like os.stat_result): typed as named tuples.
class Rows(NamedTuple):
    producer_id: str
    batch_id: int
    device_ids: list[str]
    dev_idx: bytearray
    kinds: list[str]
    kind_idx: bytearray
    size: bytearray
    ts: bytearray
    names: list[str]
    v_pos: bytearray
    v_name: bytearray
    v_val: bytearray

class TooLarge(NamedTuple):
    batch_id: int
    packets: int

class OtlpPoints(NamedTuple):
    device_ids: list[str]
    dev_idx: bytearray
    names: list[str]
    name_idx: bytearray
    size: bytearray
    ts: bytearray
    val: bytearray
    has_val: bytearray
    attrs: list[bytes]
    attr_idx: bytearray

def read_otlp(data: bytes, device_keys: tuple[bytes, ...]) -> OtlpPoints | None: ...
def read_rows(data: bytes, max_packets: int = -1) -> Rows | TooLarge | None: ...
