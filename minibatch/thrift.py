"""Thrift's compact protocol, generically: enough to read a Parquet footer, an OffsetIndex and a
page header, change a few fields, and write the footer back (minibatch/pageslice.py).

A struct is a dict of field id -> (compact type, value); a list is (element type, values); a map
is (key type, value type, pairs). Unknown fields round-trip unchanged."""

from __future__ import annotations

import struct
from typing import Any

BOOL, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
BOOL_FALSE = 2  # a bool field's value is its type: 1 true, 2 false
INTS = (I16, I32, I64)

Struct = dict[int, tuple[int, Any]]


class ThriftError(ValueError):
    """Bytes that are not the compact encoding of a struct (truncated or corrupt)."""


class Reader:
    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ThriftError("truncated")
        value = self.data[self.pos]
        self.pos += 1
        return int(value)

    def varint(self) -> int:
        data, pos = self.data, self.pos
        shift = result = 0
        try:
            while True:
                b = data[pos]
                pos += 1
                result |= (b & 0x7F) << shift
                if b < 0x80:
                    self.pos = pos
                    return result
                shift += 7
                if shift > 70:
                    raise ThriftError("varint too long")
        except IndexError:
            raise ThriftError("truncated") from None

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise ThriftError("truncated")
        value = bytes(self.data[self.pos : end])
        self.pos = end
        return value

    def value(self, kind: int) -> Any:
        if kind in INTS:
            return self.zigzag()
        if kind == BINARY:
            return self.take(self.varint())
        if kind == STRUCT:
            return self.struct()
        if kind in (LIST, SET):
            return self.sequence()
        if kind == BYTE:
            return self.byte()
        if kind == BOOL:  # inside a list: one byte, 1 is true
            return self.byte() == 1
        if kind == DOUBLE:
            return struct.unpack("<d", self.take(8))[0]
        if kind == MAP:
            return self.mapping()
        raise ThriftError(f"unknown compact type {kind}")

    def struct(self) -> Struct:
        fields: Struct = {}
        last = 0
        while (head := self.byte()) != 0:
            kind, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            if kind in (BOOL, BOOL_FALSE):
                fields[fid] = (BOOL, kind == BOOL)
            else:
                fields[fid] = (kind, self.value(kind))
            last = fid
        return fields

    def sequence(self) -> tuple[int, list[Any]]:
        head = self.byte()
        size, kind = head >> 4, head & 0x0F
        if size == 15:
            size = self.varint()
        if kind == BOOL_FALSE:
            kind = BOOL
        return kind, [self.value(kind) for _ in range(size)]

    def mapping(self) -> tuple[int, int, list[tuple[Any, Any]]]:
        size = self.varint()
        if not size:
            return 0, 0, []
        kinds = self.byte()
        key, val = kinds >> 4, kinds & 0x0F
        return key, val, [(self.value(key), self.value(val)) for _ in range(size)]


def read_struct(data: bytes | memoryview, pos: int = 0) -> tuple[Struct, int]:
    """The struct encoded at `pos`, and the position just after it."""
    reader = Reader(data, pos)
    return reader.struct(), reader.pos


def _varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(out: bytearray, n: int) -> None:
    _varint(out, (n << 1) ^ (n >> 63))


def _write_value(out: bytearray, kind: int, value: Any) -> None:
    if kind in INTS:
        _zigzag(out, value)
    elif kind == BINARY:
        _varint(out, len(value))
        out += value
    elif kind == STRUCT:
        write_struct(out, value)
    elif kind in (LIST, SET):
        _write_sequence(out, *value)
    elif kind in (BYTE, BOOL):
        out.append(1 if value is True else (BOOL_FALSE if value is False else value & 0xFF))
    elif kind == DOUBLE:
        out += struct.pack("<d", value)
    elif kind == MAP:
        _write_mapping(out, *value)
    else:
        raise ThriftError(f"unknown compact type {kind}")


def write_struct(out: bytearray, fields: Struct) -> bytearray:
    last = 0
    for fid in sorted(fields):
        kind, value = fields[fid]
        head = (BOOL if value else BOOL_FALSE) if kind == BOOL else kind
        if 0 < fid - last <= 15:
            out.append(((fid - last) << 4) | head)
        else:
            out.append(head)
            _zigzag(out, fid)
        if kind != BOOL:
            _write_value(out, kind, value)
        last = fid
    out.append(0)
    return out


def _write_sequence(out: bytearray, kind: int, values: list[Any]) -> None:
    if len(values) < 15:
        out.append((len(values) << 4) | kind)
    else:
        out.append(0xF0 | kind)
        _varint(out, len(values))
    for value in values:
        _write_value(out, kind, value)


def _write_mapping(out: bytearray, key: int, val: int, pairs: list[tuple[Any, Any]]) -> None:
    _varint(out, len(pairs))
    if pairs:
        out.append((key << 4) | val)
    for k, v in pairs:
        _write_value(out, key, k)
        _write_value(out, val, v)
