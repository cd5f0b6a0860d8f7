from typing_extensions import Buffer

# table_bits < 22 (tests only): a smaller first table, so that it grows
def number_ids(ids: Buffer, table_bits: int = 22) -> tuple[bytearray, bytearray]: ...
