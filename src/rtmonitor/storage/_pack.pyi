from typing_extensions import Buffer

def scatter(
    buf: Buffer, at: Buffer, rows: Buffer, width: int, lengths: Buffer | None = None, /
) -> None: ...
def resp(
    items: list[str | int | float | bytes] | tuple[str | int | float | bytes, ...],
    inline_max: int,
    /,
) -> list[bytes]: ...
def wrapped(head: str, ids: list[str], rows: Buffer, tail: str, /) -> list[str]: ...
