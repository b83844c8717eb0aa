"""TensorFlow's checkpoint format (the "tensor bundle", V2) read without TensorFlow.

    from model import bundle
    b = bundle.open_bundle("models/gpt2ja-small/model-1000")
    b.shapes["model/wte"]                 # (20573, 768)
    wte = b.array("model/wte")            # float32, memory-mapped from the data file (read-only)

A checkpoint prefix ``P`` is ``P.index`` -- a sorted string table (LevelDB's
block format: prefix-compressed keys, restart points, a 48-byte footer with the
magic number) mapping each tensor's name to a ``BundleEntryProto`` (dtype,
shape, shard, offset, size, CRC32C), the empty name to a ``BundleHeaderProto``
(number of shards, byte order) -- and the shards ``P.data-0000K-of-0000N``
holding the tensors' bytes one after another.  This module parses exactly
that: blocks written uncompressed (TensorFlow writes bundles so), whole
float32 tensors in little-endian order.  Anything else -- a compressed block,
another dtype, a sliced (partitioned) variable, a malformed entry -- is a
``BundleError`` and the caller reads the checkpoint with TensorFlow instead.

What it does not do is check each tensor's CRC32C (there is no fast CRC32C in
the standard library): a checkpoint is trusted here only once TensorFlow has
read all of it (see ``model.arrays``).  Sizes and bounds are always checked.
"""
from __future__ import annotations

import mmap
import os
import struct
import sys
from typing import Dict, List, Tuple

import numpy as np

#: The last 8 bytes of every table (LevelDB's magic number, little-endian).
TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
#: Block trailer: a compression byte and a masked CRC32C.
TRAILER_SIZE = 5
#: TensorFlow's DataType numbers this reader accepts.
DT_FLOAT = 1


class BundleError(ValueError):
    """The file is not a checkpoint this reader can take (the message says why)."""


def _varint(buf, pos: int) -> Tuple[int, int]:
    """(value, position after it) of the base-128 varint at ``pos``."""
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise BundleError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BundleError("varint too long")


def _fields(buf) -> List[Tuple[int, int, object]]:
    """The (field number, wire type, value) of one serialized protocol buffer message: ints for
    varints and fixed-width fields, bytes for length-delimited ones."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise BundleError("truncated field")
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise BundleError("truncated field")
            value, pos = bytes(buf[pos:pos + n]), pos + n
        elif wire == 5:
            if pos + 4 > end:
                raise BundleError("truncated field")
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise BundleError(f"unsupported wire type {wire}")
        out.append((field, wire, value))
    return out


def _block(table, offset: int, size: int) -> List[Tuple[bytes, bytes]]:
    """The (key, value) entries of the block at ``offset`` (``size`` bytes before its trailer)."""
    if offset < 0 or size < 4 or offset + size + TRAILER_SIZE > len(table):
        raise BundleError("a block lies outside the index file")
    if table[offset + size] != 0:
        raise BundleError("compressed index block")
    block = table[offset:offset + size]
    restarts = struct.unpack_from("<I", block, size - 4)[0]
    end = size - 4 - 4 * restarts
    if end < 0:
        raise BundleError("bad block trailer")
    entries = []
    key = b""
    pos = 0
    while pos < end:
        shared, pos = _varint(block, pos)
        fresh, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + fresh + length > end:
            raise BundleError("bad block entry")
        key = key[:shared] + bytes(block[pos:pos + fresh])
        pos += fresh
        entries.append((key, bytes(block[pos:pos + length])))
        pos += length
    return entries


def _handle(value: bytes) -> Tuple[int, int]:
    offset, pos = _varint(value, 0)
    size, _ = _varint(value, pos)
    return offset, size


def read_index(path: str | os.PathLike) -> Dict[bytes, bytes]:
    """Every (key, value) of the string table ``path``, in key order."""
    with open(path, "rb") as f:
        table = f.read()
    if len(table) < FOOTER_SIZE or struct.unpack_from("<Q", table, len(table) - 8)[0] != TABLE_MAGIC:
        raise BundleError("not a checkpoint index (no table footer)")
    footer = table[-FOOTER_SIZE:]
    _, pos = _varint(footer, 0)  # the meta-index block (unused by bundles)
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    out = {}
    for _, handle in _block(table, index_offset, index_size):
        for key, value in _block(table, *_handle(handle)):
            out[key] = value
    return out


class Entry:
    """Where one tensor lives: ``dtype`` (TensorFlow's number), ``shape``, ``shard``, ``offset``, ``size``."""

    __slots__ = ("dtype", "shape", "shard", "offset", "size")

    def __init__(self, value: bytes, name: str):
        self.dtype, self.shape, self.shard, self.offset, self.size = 0, (), 0, 0, 0
        for field, wire, v in _fields(value):
            if field == 1 and wire == 0:
                self.dtype = v
            elif field == 2 and wire == 2:
                self.shape = _shape(v, name)
            elif field == 3 and wire == 0:
                self.shard = v
            elif field == 4 and wire == 0:
                self.offset = v
            elif field == 5 and wire == 0:
                self.size = v
            elif field == 7:
                raise BundleError(f"variable {name} is sliced (partitioned)")


def _shape(value: bytes, name: str) -> Tuple[int, ...]:
    dims = []
    for field, wire, v in _fields(value):
        if field == 2 and wire == 2:
            size = 0
            for f, w, x in _fields(v):
                if f == 1 and w == 0:
                    size = x if x < 1 << 63 else x - (1 << 64)
            if size < 0:
                raise BundleError(f"variable {name} has an unknown dimension")
            dims.append(size)
        elif field == 3 and v:
            raise BundleError(f"variable {name} has an unknown rank")
    return tuple(dims)


class Bundle:
    """An open checkpoint: ``prefix``, ``shapes`` (name -> shape) and ``array(name)``."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        if sys.byteorder != "little":
            raise BundleError("this reader takes little-endian machines only")
        entries = read_index(self.prefix + ".index")
        header = entries.pop(b"", None)
        if header is None:
            raise BundleError("no bundle header")
        shards, big_endian = 1, 0
        for field, wire, v in _fields(header):
            if field == 1 and wire == 0:
                shards = v
            elif field == 2 and wire == 0:
                big_endian = v
        if big_endian:
            raise BundleError("a big-endian checkpoint")
        if not 1 <= shards <= 1 << 16:
            raise BundleError(f"{shards} data shards")
        self.entries: Dict[str, Entry] = {}
        for key, value in entries.items():
            try:
                name = key.decode()
            except UnicodeDecodeError:
                raise BundleError("a variable name that is not UTF-8") from None
            self.entries[name] = Entry(value, name)
        self.shapes = {name: e.shape for name, e in self.entries.items()}
        self._files = [f"{self.prefix}.data-{k:05d}-of-{shards:05d}" for k in range(shards)]
        self._maps: Dict[int, mmap.mmap] = {}

    def _map(self, shard: int) -> mmap.mmap:
        m = self._maps.get(shard)
        if m is None:
            if not 0 <= shard < len(self._files):
                raise BundleError(f"shard {shard} of {len(self._files)}")
            with open(self._files[shard], "rb") as f:
                size = os.fstat(f.fileno()).st_size
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._maps[shard] = m
        return m

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only float32 array over the mapped data file (no copy)."""
        e = self.entries[name]
        if e.dtype != DT_FLOAT:
            raise BundleError(f"variable {name} has dtype {e.dtype}, not float32")
        count = int(np.prod(e.shape, dtype=np.int64))
        if e.size != 4 * count:
            raise BundleError(f"variable {name}: {e.size} bytes for shape {e.shape}")
        data = self._map(e.shard)
        if e.offset + e.size > len(data):
            raise BundleError(f"variable {name} lies beyond the end of {self._files[e.shard]} (truncated?)")
        return np.frombuffer(data, dtype="<f4", count=count, offset=e.offset).reshape(e.shape)


def open_bundle(prefix: str | os.PathLike) -> Bundle:
    """The checkpoint ``prefix`` (``DIR/model-N``); BundleError (or OSError) when it cannot be read here."""
    return Bundle(prefix)


__all__ = ["Bundle", "BundleError", "open_bundle", "read_index"]
