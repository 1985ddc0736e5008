"""The record framing of TensorBoard event files, read in one place.

An event file is a sequence of TFRecords: an 8-byte little-endian length, the masked
CRC-32C of those 8 bytes, the payload (a serialized ``Event``) and the masked CRC-32C of
the payload (see ``tensorboard/summary/writer/record_writer.py``). :func:`read_records`
walks them for both the reader (:mod:`tbfeat.reader`) and a run restart's rewrite
(:func:`tbfeat.writer.trim_event_file`), with the fast CRC of :mod:`tbfeat._crc`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from ._crc import checksum

HEAD = struct.Struct("<QI")
"""A record's length and the masked CRC of the length."""
TAIL = struct.Struct("<I")
"""The masked CRC of the payload."""
MAX_RECORD_BYTES = 1 << 30
"""The largest record read (1 GiB): a longer length field is taken for damage and never
allocated. TensorBoard's own writers stay far below (a step of tbfeat grids is a few MB)."""


class DamagedRecord(Exception):
    """A record that can never be read: a bad CRC or an impossible length."""

    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset = offset


class RawRecord(NamedTuple):
    offset: int
    """Where the record begins in the file."""
    length: int
    """The payload's length."""
    payload: bytes
    crc: int
    """The payload's masked CRC, as stored."""

    @property
    def size(self) -> int:
        """The whole record's size in the file."""
        return HEAD.size + self.length + TAIL.size


def read_records(f: Any, start: int, size: int) -> Iterator[RawRecord]:
    """The whole records of the binary file ``f`` from byte ``start`` up to ``size``.

    Stops quietly at a record that is not whole yet (one being written, or a file cut
    short); raises :class:`DamagedRecord` at a bad CRC or a length over
    :data:`MAX_RECORD_BYTES`, after yielding the records before it.
    """
    crc32c = checksum()
    offset = f.seek(start)
    while offset + HEAD.size <= size:
        head = f.read(HEAD.size)
        if len(head) < HEAD.size:
            return
        length, head_crc = HEAD.unpack(head)
        if crc32c(head[:8]) != head_crc:
            raise DamagedRecord(offset, "bad CRC of the length")
        if length > MAX_RECORD_BYTES:
            raise DamagedRecord(offset, f"a length of {length} bytes, over {MAX_RECORD_BYTES}")
        if offset + HEAD.size + length + TAIL.size > size:
            return
        payload, tail = f.read(length), f.read(TAIL.size)
        if len(payload) < length or len(tail) < TAIL.size:
            return
        (crc,) = TAIL.unpack(tail)
        if crc32c(payload) != crc:
            raise DamagedRecord(offset, "bad CRC of the record")
        record = RawRecord(offset, length, payload, crc)
        yield record
        offset += record.size
