"""GGML tensor element types as GGUF files number them, with their block geometry.

A quantized tensor row of `n` elements is stored as `n // block_size` blocks of
`type_size` bytes each; plain types have a block size of 1.
"""
from __future__ import annotations

from enum import IntEnum


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41

    @property
    def block_size(self) -> int:
        """Elements per block."""
        return _GEOMETRY[self][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return _GEOMETRY[self][1]

    def row_bytes(self, n: int) -> int:
        """Bytes taken by `n` consecutive elements (`n` must be a multiple of the block size)."""
        return n // self.block_size * self.type_size


# type -> (elements per block, bytes per block), as the GGUF format defines them
_GEOMETRY: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36),
    GGMLType.Q1_0: (128, 18),
}


# KV cache element types by their command-line names (llama.cpp's -ctk / -ctv spelling)
KV_CACHE_TYPES: dict[str, GGMLType] = {"f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}


def kv_cache_type(name: str) -> GGMLType:
    """The GGML type of a KV cache type name; ValueError naming the choices otherwise."""
    t = KV_CACHE_TYPES.get(str(name).strip().lower())
    if t is None:
        raise ValueError(f"cache type {name!r} is not one of {', '.join(KV_CACHE_TYPES)}")
    return t


def kv_bytes(name: str, n_values: int) -> int:
    """Bytes of `n_values` cache elements of type `name` (a multiple of its block size)."""
    t = kv_cache_type(name)
    return n_values // t.block_size * t.type_size
