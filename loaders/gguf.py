"""A strict, bounded, memory-mapped GGUF reader (versions 2 and 3, little-endian).

Layout of a GGUF file:
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor's offset is relative to the start of this section.
A string is a u64 byte length then UTF-8 bytes; an array is u32 element type, u64 count, elements.

Every count, length, type id, dimension and offset is checked against the file size and fixed
limits before it is used, so a malformed file ends in one `GGUFError` naming the field, its byte
offset and what was expected; nothing is allocated from an unchecked count.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GGUFError
from ..quant.ggml_types import GGMLType

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

MAX_TENSORS = 1 << 20  # far above any real model (a 405B model has ~1,100 tensors)
MAX_KV = 1 << 20
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ... (real files use depth 1)
MAX_NAME_BYTES = 1 << 16  # keys and tensor names
MAX_LIST = 1 << 22  # entries of a string (or nested) array; vocabularies have ~260k
MAX_ELEMENTS = 1 << 48  # elements in one tensor


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numeric value type -> little-endian numpy dtype
_NUMERIC = {
    ValueType.UINT8: np.dtype("<u1"),
    ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
    ValueType.BOOL: np.dtype("<u1"),
}

# plain (unquantized) tensor types -> numpy dtype of their elements
_PLAIN_DTYPES = {
    GGMLType.F32: np.dtype("<f4"),
    GGMLType.F16: np.dtype("<f2"),
    GGMLType.F64: np.dtype("<f8"),
    GGMLType.I8: np.dtype("<i1"),
    GGMLType.I16: np.dtype("<i2"),
    GGMLType.I32: np.dtype("<i4"),
    GGMLType.I64: np.dtype("<i8"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: `shape` is in GGUF order (shape[0] = elements per row)."""

    name: str
    shape: tuple[int, ...]  # (ne0, ne1, ...): ne0 contiguous elements per row
    type: GGMLType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.type.row_bytes(self.shape[0])


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; errors name the field and offset."""

    def __init__(self, buf: mmap.mmap, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"{what} at byte {self.pos:,} needs {n:,} bytes but the file ends at byte {self.size:,}"
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def count(self, what: str, limit: int, min_item_bytes: int) -> int:
        """A u64 count, bounded by `limit` and by what the rest of the file can hold."""
        at = self.pos
        n = self.u64(what)
        room = (self.size - self.pos) // max(min_item_bytes, 1) if min_item_bytes else limit
        if n > limit:
            raise GGUFError(f"{what} at byte {at:,} is {n:,}; expected at most {limit:,}")
        if n > room:
            raise GGUFError(
                f"{what} at byte {at:,} is {n:,}, but the {self.size - self.pos:,} bytes left "
                f"in the file hold at most {room:,}"
            )
        return n

    def string(self, what: str, limit: int | None = None) -> str:
        at = self.pos
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            raise GGUFError(f"{what} length at byte {at:,} is {n:,}; expected at most {limit:,}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} at byte {at:,} is not valid UTF-8 ({e.reason})") from None

    def array(self, what: str, dtype: np.dtype, n: int) -> np.ndarray:
        nbytes = n * dtype.itemsize
        self.need(nbytes, what)
        a = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
        self.pos += nbytes
        return a


def _value_type(cur: _Cursor, what: str) -> ValueType:
    at = cur.pos
    t = cur.u32(what)
    try:
        return ValueType(t)
    except ValueError:
        raise GGUFError(f"{what} at byte {at:,} is {t}; expected a value type 0..12") from None


_U64 = struct.Struct("<Q")


def _string_array(cur: _Cursor, n: int, key: str) -> list[str]:
    """n strings (the tokenizer's vocabulary: ~260k of them): the hot loop of opening a model."""
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, _U64.unpack_from
    out: list = [None] * n  # n is already bounded by the bytes left in the file
    for i in range(n):
        if pos + 8 > size:
            cur.pos = pos
            cur.need(8, f"length of string {i} in '{key}'")
        end = pos + 8 + unpack(buf, pos)[0]
        if end > size:
            cur.pos = pos + 8
            cur.need(end - pos - 8, f"string {i} in '{key}'")
        out[i] = buf[pos + 8 : end]
        pos = end
    cur.pos = pos
    try:
        return [b.decode("utf-8") for b in out]
    except UnicodeDecodeError:
        bad = next(i for i, b in enumerate(out) if not _is_utf8(b))
        raise GGUFError(f"string {bad} in '{key}' is not valid UTF-8") from None


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _read_value(cur: _Cursor, vtype: ValueType, key: str, depth: int = 0) -> Any:
    if vtype == ValueType.STRING:
        return cur.string(f"value of '{key}'")
    if vtype == ValueType.ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"value of '{key}' at byte {cur.pos:,} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        etype = _value_type(cur, f"array element type of '{key}'")
        if etype in _NUMERIC:
            item = _NUMERIC[etype].itemsize
        elif etype == ValueType.STRING:
            item = 8  # the smallest string is its 8-byte length
        else:
            item = 12  # the smallest array is its type and count
        limit = MAX_ELEMENTS if etype in _NUMERIC else MAX_LIST
        n = cur.count(f"array length of '{key}'", limit, item)
        if etype in _NUMERIC:
            at = cur.pos
            a = cur.array(f"array of '{key}'", _NUMERIC[etype], n)
            if etype == ValueType.BOOL:
                if a.size and a.max() > 1:
                    raise GGUFError(f"array of '{key}' at byte {at:,} holds a bool that is neither 0 nor 1")
                a = a.view(np.bool_)
            return a
        if etype == ValueType.STRING:
            return _string_array(cur, n, key)
        return [_read_value(cur, etype, key, depth + 1) for _ in range(n)]
    at = cur.pos
    a = cur.array(f"value of '{key}'", _NUMERIC[vtype], 1)
    if vtype == ValueType.BOOL:
        if a[0] > 1:
            raise GGUFError(f"value of '{key}' at byte {at:,} is {a[0]}; expected a bool (0 or 1)")
        return bool(a[0])
    if vtype in (ValueType.FLOAT32, ValueType.FLOAT64):
        return float(a[0])
    return int(a[0])


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped.

    `metadata`: key -> value (int, float, bool, str, 1-D numpy array for numeric arrays,
    list for arrays of strings or arrays). `tensors`: name -> TensorInfo, in file order.
    Tensor data is returned as zero-copy views of the mapping (`raw`, `rows`, `array`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None  # for `lookups`, opened on first use
        self._lookups: dict[str, RowTable] = {}
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise GGUFError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GGUFError(f"{self.path} is not a regular file")
            self.file_size = st.st_size
            if self.file_size < 24:
                raise GGUFError(f"{self.path} is {self.file_size} bytes; a GGUF file has at least a 24-byte header")
            try:
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise GGUFError(f"cannot map {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)
        self._buf = self._mmap
        try:
            self._parse()
        except GGUFError as e:
            self.close()
            raise GGUFError(f"{self.path.name}: {e}") from None
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(self._buf, self.file_size)
        magic = bytes(self._buf[:4])
        if magic != MAGIC:
            raise GGUFError(f"magic at byte 0 is {magic!r}; expected b'GGUF'")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version >= 1 << 16 else ""
            raise GGUFError(f"version at byte 4 is {self.version}{hint}; expected one of {SUPPORTED_VERSIONS}")
        # each tensor entry takes at least 8 (name) + 4 (n_dims) + 8 (one dim) + 4 + 8 bytes
        n_tensors = cur.count("tensor count", MAX_TENSORS, 32)
        n_kv = cur.count("metadata count", MAX_KV, 8 + 4 + 1)

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, ValueType] = {}
        for _ in range(n_kv):
            at = cur.pos
            key = cur.string("metadata key", MAX_NAME_BYTES)
            if key in self.metadata:
                raise GGUFError(f"metadata key '{key}' at byte {at:,} appears twice")
            vtype = _value_type(cur, f"value type of '{key}'")
            self.metadata[key] = _read_value(cur, vtype, key)
            self.metadata_types[key] = vtype

        self.alignment = self._alignment()
        infos = []
        names: set[str] = set()
        for _ in range(n_tensors):
            infos.append(self._tensor_entry(cur, names))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        if self.data_offset > self.file_size:
            raise GGUFError(
                f"tensor data section starts at byte {self.data_offset:,} but the file has {self.file_size:,} bytes"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, gtype, rel, nbytes, at in infos:
            if rel % self.alignment:
                raise GGUFError(
                    f"offset of tensor '{name}' at byte {at:,} is {rel:,}; expected a multiple of {self.alignment}"
                )
            start = self.data_offset + rel
            if start + nbytes > self.file_size:
                raise GGUFError(
                    f"tensor '{name}' data ends at byte {start + nbytes:,} but the file has {self.file_size:,} bytes"
                )
            self.tensors[name] = TensorInfo(name, shape, gtype, start, nbytes)
        ordered = sorted(self.tensors.values(), key=lambda t: t.offset)
        for a, b in zip(ordered, ordered[1:]):
            if b.offset < a.offset + a.nbytes:
                raise GGUFError(
                    f"tensor '{b.name}' data at byte {b.offset:,} overlaps tensor '{a.name}' "
                    f"(bytes {a.offset:,}..{a.offset + a.nbytes:,})"
                )

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        v = self.metadata["general.alignment"]
        t = self.metadata_types["general.alignment"]
        if t != ValueType.UINT32 or v == 0 or v & (v - 1) or v > 1 << 20:
            raise GGUFError(
                f"general.alignment is {v!r} ({t.name}); expected a uint32 power of two up to 1 MiB"
            )
        return v

    def _tensor_entry(self, cur: _Cursor, names: set[str]):
        at = cur.pos
        name = cur.string("tensor name", MAX_NAME_BYTES)
        if name in names:
            raise GGUFError(f"tensor name '{name}' at byte {at:,} appears twice")
        names.add(name)
        dims_at = cur.pos
        n_dims = cur.u32(f"dimension count of '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"dimension count of '{name}' at byte {dims_at:,} is {n_dims}; expected 1..{MAX_DIMS}")
        shape = []
        n = 1
        for i in range(n_dims):
            d_at = cur.pos
            d = cur.u64(f"dimension {i} of '{name}'")
            if d == 0 or d > MAX_ELEMENTS:
                raise GGUFError(
                    f"dimension {i} of '{name}' at byte {d_at:,} is {d:,}; expected 1..{MAX_ELEMENTS:,}"
                )
            n *= d
            if n > MAX_ELEMENTS:
                raise GGUFError(f"tensor '{name}' at byte {at:,} has more than {MAX_ELEMENTS:,} elements")
            shape.append(d)
        t_at = cur.pos
        t = cur.u32(f"type of '{name}'")
        try:
            gtype = GGMLType(t)
        except ValueError:
            raise GGUFError(f"type of '{name}' at byte {t_at:,} is {t}; not a known GGML type id") from None
        if shape[0] % gtype.block_size:
            raise GGUFError(
                f"tensor '{name}' has rows of {shape[0]} elements; {gtype.name} needs a multiple of {gtype.block_size}"
            )
        rel = cur.u64(f"offset of '{name}'")
        nbytes = n // gtype.block_size * gtype.type_size
        return name, tuple(shape), gtype, rel, nbytes, at

    # --- tensor data, as zero-copy views of the mapping ---

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path.name} has no tensor '{name}'") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: uint8 (nbytes,)."""
        t = self.info(name)
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def rows(self, name: str) -> np.ndarray:
        """The tensor as rows of blocks: uint8 (n_rows, row_bytes)."""
        t = self.info(name)
        return self.raw(name).reshape(t.n_rows, t.row_bytes)

    def array(self, name: str) -> np.ndarray:
        """A plain-typed tensor (F32, F16, ints) with numpy shape = reversed GGUF shape."""
        t = self.info(name)
        if t.type not in _PLAIN_DTYPES:
            raise GGUFError(f"tensor '{name}' is {t.type.name}; dequantize it instead of viewing it as an array")
        dt = _PLAIN_DTYPES[t.type]
        a = np.frombuffer(self._buf, dtype=dt, count=t.n_elements, offset=t.offset)
        return a.reshape(tuple(reversed(t.shape)))

    def drop_pages(self, name: str | None = None) -> None:
        """Let go of the resident pages of one tensor (or the whole mapping) once its weights were
        copied or packed elsewhere; views stay valid and fault pages back in when touched."""
        if self._mmap is None or not hasattr(self._mmap, "madvise"):
            return
        if name is None:
            self._mmap.madvise(mmap.MADV_DONTNEED)
            return
        t = self.info(name)
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages inside or around the tensor
        end = min(-(-(t.offset + t.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE, self.file_size)
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def lookups(self, name: str) -> "RowTable":
        """The matrix as a `RowTable` (rows read on lookup, nothing mapped), over a descriptor
        this file keeps until `close`; the page cache is left as it is."""
        if name not in self._lookups:
            t = self.info(name)
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            self._lookups[name] = RowTable(self._fd, t.offset, t.n_rows, t.row_bytes, drop_cache=False)
        return self._lookups[name]

    def close(self) -> None:
        """Release the mapping (views handed out keep it alive until they are dropped)."""
        fd, self._fd, tables, self._lookups = self._fd, None, self._lookups, {}
        for t in tables.values():  # a lookup after close fails (EBADF), never reads a reused descriptor
            t.fd = -1
        if fd is not None:
            os.close(fd)
        self._buf = None
        m, self._mmap = getattr(self, "_mmap", None), None
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # numpy views still reference the mapping; it closes when they go

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RowTable:
    """A matrix of the file as `rows[ids]` that reads only those rows (pread), for embedding
    lookups: the shape and indexing `embedding_rows` needs, without mapping the table (a mapped
    table gains ~64 KiB of resident pages per looked-up row through the kernel's fault-around).
    `drop_cache`: also drop the page cache each read used (a streaming store under a cgroup)."""

    def __init__(self, fd: int, offset: int, n_rows: int, row_bytes: int, drop_cache: bool = True):
        self.fd, self.offset, self.drop_cache = fd, offset, drop_cache
        self.shape = (n_rows, row_bytes)
        self.dtype = np.dtype(np.uint8)
        self.bytes_read = 0

    def __getitem__(self, ids):
        scalar = np.ndim(ids) == 0
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        rb = self.shape[1]
        out = np.empty((ids.size, rb), np.uint8)
        for j, r in enumerate(ids):
            if not 0 <= r < self.shape[0]:
                raise IndexError(f"row {r} outside 0..{self.shape[0] - 1}")
            off = self.offset + int(r) * rb
            n = os.preadv(self.fd, [out[j]], off)
            if n != rb:
                raise GGUFError(f"short read of a table row at byte {off:,}")
            self.bytes_read += n
            if self.drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, off, rb, os.POSIX_FADV_DONTNEED)
        return out[0] if scalar else out
