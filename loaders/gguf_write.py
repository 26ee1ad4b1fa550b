"""A GGUF writer (version 3): metadata as the reader returns it, tensors produced one at a time.

    write_gguf(path, metadata, types, [OutTensor(name, shape, GGMLType.Q4_K, make_bytes), ...])

The header needs every tensor's offset, which follows from its shape and type, so a tensor's
bytes are asked for (`make_bytes()`) only when its turn comes: a model is rewritten with one
tensor in memory at a time. The file is written under a temporary name beside `path` and renamed
over it at the end; on any error the temporary file is removed and `path` is left untouched.
"""
from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import GGUFError
from ..quant.ggml_types import GGMLType
from .gguf import DEFAULT_ALIGNMENT, MAGIC, ValueType

_SCALAR = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
           ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
           ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d"}
_ARRAY_TYPES = {np.dtype("<u1"): ValueType.UINT8, np.dtype("<i1"): ValueType.INT8, np.dtype("<u2"): ValueType.UINT16,
                np.dtype("<i2"): ValueType.INT16, np.dtype("<u4"): ValueType.UINT32, np.dtype("<i4"): ValueType.INT32,
                np.dtype("<f4"): ValueType.FLOAT32, np.dtype("bool"): ValueType.BOOL, np.dtype("<u8"): ValueType.UINT64,
                np.dtype("<i8"): ValueType.INT64, np.dtype("<f8"): ValueType.FLOAT64}


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] elements per row
    type: GGMLType
    make_bytes: Callable[[], np.ndarray]  # -> the tensor's bytes (any shape, nbytes as the type says)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n * self.type.row_bytes(self.shape[0])


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _value(v: Any, vtype: ValueType) -> bytes:
    if vtype == ValueType.STRING:
        return _string(v)
    if vtype == ValueType.ARRAY:
        if isinstance(v, np.ndarray):
            et = _ARRAY_TYPES[v.dtype.newbyteorder("<") if v.dtype.byteorder == ">" else v.dtype]
            return struct.pack("<IQ", et, v.size) + np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes()
        items = list(v)
        if all(isinstance(x, (str, bytes, bytearray, memoryview)) for x in items):
            return struct.pack("<IQ", ValueType.STRING, len(items)) + b"".join(_string(x) for x in items)
        raise GGUFError("only numeric and string arrays can be written")
    return struct.pack(_SCALAR[vtype], v)


def header_bytes(metadata: dict[str, Any], types: dict[str, ValueType], tensors: list[OutTensor],
                 alignment: int = DEFAULT_ALIGNMENT) -> bytes:
    """Everything before the tensor data, padded to the alignment."""
    out = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, v in metadata.items():
        vt = ValueType(types[key])
        out += [_string(key), struct.pack("<I", vt), _value(v, vt)]
    off = 0
    for t in tensors:
        out += [_string(t.name), struct.pack("<I", len(t.shape)), struct.pack(f"<{len(t.shape)}Q", *t.shape),
                struct.pack("<IQ", t.type, off)]
        off += -(-t.nbytes // alignment) * alignment
    head = b"".join(out)
    return head + b"\0" * (-len(head) % alignment)


def write_gguf(path: str | os.PathLike, metadata: dict[str, Any], types: dict[str, ValueType],
               tensors: Iterable[OutTensor], progress: Callable[[int, int], None] | None = None) -> int:
    """Write the file; returns its size. `metadata['general.alignment']`, if present, sets the alignment."""
    path = Path(path)
    tensors = list(tensors)
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    head = header_bytes(metadata, types, tensors, alignment)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(head)
            for i, t in enumerate(tensors):
                data = np.ascontiguousarray(t.make_bytes()).view(np.uint8).reshape(-1)
                if data.size != t.nbytes:
                    raise GGUFError(f"tensor '{t.name}' has {data.size:,} bytes; {t.type.name} {t.shape} needs {t.nbytes:,}")
                fh.write(memoryview(data))
                fh.write(b"\0" * (-data.size % alignment))
                if progress is not None:
                    progress(i + 1, len(tensors))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path.stat().st_size
