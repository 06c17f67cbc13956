"""The frames the rows process and its parent exchange: a 4-byte little-endian
length, then the body. The standard library only: the rows process imports it."""

from __future__ import annotations

import struct

LENGTH = struct.Struct("<I")


def frames(buffer: bytearray) -> list[bytes]:
    """The complete frames at the start of ``buffer``, taken out of it."""
    found = []
    start = 0
    while len(buffer) - start >= LENGTH.size:
        (length,) = LENGTH.unpack_from(buffer, start)
        end = start + LENGTH.size + length
        if end > len(buffer):
            break
        found.append(bytes(buffer[start + LENGTH.size : end]))
        start = end
    del buffer[:start]
    return found
