"""What the checkpoint tests of both backends share: a crafted pickle and file damage."""

from __future__ import annotations

from pathlib import Path


class Payload:
    """Unpickling this creates the file ``marker``: a stand-in for code a crafted
    checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def damage(path: Path, how: str) -> None:
    """Flip one bit in the middle of the file (``"flip_byte"``) or cut it in half
    (``"truncate"``)."""
    data = bytearray(path.read_bytes())
    if how == "flip_byte":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
