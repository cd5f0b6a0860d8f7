from typing_extensions import Buffer

def scatter(
    buf: Buffer, at: Buffer, rows: Buffer, width: int, lengths: Buffer | None = None, /
) -> None: ...
