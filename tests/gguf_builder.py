"""A tiny GGUF writer for tests: builds valid files field by field, so tests can corrupt any field."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

# value type ids (GGUF)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
        BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def value(vtype: int, v) -> bytes:
    if vtype == STR:
        return s(v)
    if vtype == ARR:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(value(etype, x) for x in items)
    return struct.pack(_FMT[vtype], v)


@dataclass
class Builder:
    version: int = 3
    alignment: int = 32
    kv: list = field(default_factory=list)  # (key, vtype, value)
    tensors: list = field(default_factory=list)  # (name, shape, ggml type, data bytes)

    def add_kv(self, key: str, vtype: int, v) -> "Builder":
        self.kv.append((key, vtype, v))
        return self

    def add_tensor(self, name: str, arr: np.ndarray) -> "Builder":
        """An F32 (or F16) tensor; numpy shape is reversed into GGUF order."""
        gtype = {np.dtype("float32"): 0, np.dtype("float16"): 1}[arr.dtype]
        self.tensors.append((name, tuple(reversed(arr.shape)), gtype, arr.tobytes()))
        return self

    def header(self) -> tuple[bytes, list[int]]:
        """Bytes up to the data section, and each tensor's relative offset."""
        out = b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kv))
        for k, t, v in self.kv:
            out += s(k) + struct.pack("<I", t) + value(t, v)
        offsets, rel = [], 0
        for name, shape, gtype, data in self.tensors:
            offsets.append(rel)
            out += s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
            out += struct.pack("<IQ", gtype, rel)
            rel += -(-len(data) // self.alignment) * self.alignment
        return out, offsets

    def build(self) -> bytes:
        out, offsets = self.header()
        out += b"\0" * (-len(out) % self.alignment)
        base = len(out)
        for (_, _, _, data), rel in zip(self.tensors, offsets):
            out += b"\0" * (base + rel - len(out)) + data
        return out


def sample() -> Builder:
    """A small valid file with every metadata value type and two tensors."""
    b = Builder()
    b.add_kv("general.architecture", STR, "llama")
    b.add_kv("general.alignment", U32, 32)
    for i, t in enumerate((U8, I8, U16, I16, U32, I32, U64, I64)):
        b.add_kv(f"test.int{i}", t, 7 + i)
    b.add_kv("test.f32", F32, 1.5)
    b.add_kv("test.f64", F64, -2.25)
    b.add_kv("test.bool", BOOL, True)
    b.add_kv("test.strs", ARR, (STR, ["a", "bc", "\u00e9"]))
    b.add_kv("test.ints", ARR, (I32, [1, -2, 3]))
    b.add_kv("test.nested", ARR, (ARR, [(U8, [1, 2]), (U8, [3])]))
    b.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    b.add_tensor("b.weight", np.ones(8, dtype=np.float16))
    return b
