def read_rows(
    data: bytes,
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
    | None
): ...
