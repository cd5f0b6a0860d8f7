def read_rows(
    data: bytes,
    max_packets: int = -1,
) -> (
    tuple[
        str,
        int,
        list[str],
        bytearray,
        list[str],
        bytearray,
        bytearray,
        bytearray,
        list[str],
        bytearray,
        bytearray,
        bytearray,
    ]
    | tuple[int, int]
    | None
): ...
