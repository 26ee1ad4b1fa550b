"""Numpy reference (de)quantizers for GGML tensor types: the ground truth every kernel is tested on.

Each type is one small class with `ggml_type` and `dequantize_blocks(blocks)`: uint8
(n_blocks, type_size) -> float32 (n_blocks, block_size), vectorised over blocks. A few also
have `quantize_blocks(x)`: float32 (n_blocks, block_size) -> uint8 (n_blocks, type_size).

Results are bit-identical to gguf-py's `gguf.quants` (tests/test_quant_formats.py checks it),
NaN and inf scales included. Every product in a dequantizer is exact in float32 (an f16 scale
has 11 significant bits, sub-scales and quants at most 7 + 5 more), so the one rounding is the
final `+ m` or `- d_min * min`: a kernel may group the products freely, or fuse them into that
add, and still match, but must not rewrite it (`d * (q + m / d)` is not the same).
The quantizers are another matter: `x * (1 / d)` and `x / d` round differently.

Block layouts are written `field (bytes)`, little-endian; `d` is the block's scale. The 32-element
types store element j in the low nibble of qs byte j and element j + 16 in its high nibble.
The K-quants live in `formats_k.py`.
"""
from __future__ import annotations

import numpy as np

from .bits import f16_field, round_away, unpack_bits
from .formats_k import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K
from .ggml_types import GGMLType


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d, with 0 where d == 0 (as ggml's `id = d ? 1.0f/d : 0.0f`)."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 (n, 16) -> uint8 (n, 32): low nibbles are elements 0-15, high nibbles 16-31."""
    return unpack_bits(qs, 4).reshape(qs.shape[0], 32)


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """The u32 at bytes [start, start + 4), bit j = fifth bit of element j -> uint8 (n, 32)."""
    return np.unpackbits(blocks[:, start:start + 4], axis=1, bitorder="little")


class F32:
    """value (4 B, f32). Returns a view of the input bytes when they are contiguous."""

    ggml_type = GGMLType.F32

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float32)  # (n, 1)


class F16:
    """value (2 B, IEEE half)."""

    ggml_type = GGMLType.F16

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        return f16_field(blocks, 0)  # (n, 1)


class BF16:
    """value (2 B, bfloat16: the top half of an f32's bits)."""

    ggml_type = GGMLType.BF16

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        top = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32)  # (n, 1)
        return (top << 16).view(np.float32)


class Q4_0:
    """d (2 B, f16) | qs (16 B, 4-bit).  x = d * (q - 8)."""

    ggml_type = GGMLType.Q4_0

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        d = f16_field(blocks, 0)  # (n, 1)
        q = _nibbles(blocks[:, 2:18]).astype(np.int8) - np.int8(8)  # (n, 32)
        return d * q.astype(np.float32)

    @staticmethod
    def quantize_blocks(x: np.ndarray) -> np.ndarray:
        """As `quantize_row_q4_0_ref`: d = (the value of largest magnitude) / -8."""
        imax = np.abs(x).argmax(axis=1)[:, None]  # first index of the largest |x|
        d = np.take_along_axis(x, imax, axis=1) / np.float32(-8)  # (n, 1)
        q = np.trunc(x * _inverse(d) + np.float32(8.5)).astype(np.uint8)  # (n, 32), 0..16
        q = np.minimum(q, np.uint8(15))
        qs = q[:, :16] | (q[:, 16:] << 4)  # (n, 16)
        return np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=1)


class Q4_1:
    """d (2 B, f16) | m (2 B, f16) | qs (16 B, 4-bit).  x = d * q + m."""

    ggml_type = GGMLType.Q4_1

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        d, m = f16_field(blocks, 0), f16_field(blocks, 2)  # (n, 1)
        q = _nibbles(blocks[:, 4:20]).astype(np.float32)  # (n, 32)
        return d * q + m


class Q5_0:
    """d (2 B, f16) | qh (4 B, fifth bits) | qs (16 B, low 4 bits).  x = d * (q - 16)."""

    ggml_type = GGMLType.Q5_0

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        d = f16_field(blocks, 0)  # (n, 1)
        q = _nibbles(blocks[:, 6:22]) | (_fifth_bits(blocks, 2) << 4)  # (n, 32)
        return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


class Q5_1:
    """d (2 B, f16) | m (2 B, f16) | qh (4 B, fifth bits) | qs (16 B, low 4 bits).  x = d * q + m."""

    ggml_type = GGMLType.Q5_1

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        d, m = f16_field(blocks, 0), f16_field(blocks, 2)  # (n, 1)
        q = _nibbles(blocks[:, 8:24]) | (_fifth_bits(blocks, 4) << 4)  # (n, 32)
        return d * q.astype(np.float32) + m


class Q8_0:
    """d (2 B, f16) | qs (32 B, int8).  x = d * q."""

    ggml_type = GGMLType.Q8_0

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        d = f16_field(blocks, 0)  # (n, 1)
        return d * blocks[:, 2:34].view(np.int8).astype(np.float32)

    @staticmethod
    def quantize_blocks(x: np.ndarray) -> np.ndarray:
        """As `quantize_row_q8_0_ref`: d = max |x| / 127, q = roundf(x / d)."""
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)  # (n, 1)
        q = round_away(x * _inverse(d)).astype(np.int8)  # (n, 32)
        return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


FORMATS: dict[GGMLType, type] = {
    f.ggml_type: f
    for f in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)
}


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLType(ggml_type).name
    except ValueError:
        return str(ggml_type)


def format_for(ggml_type: GGMLType | int) -> type:
    """The format class of a GGML type; ValueError if there is none."""
    fmt = FORMATS.get(ggml_type)
    if fmt is None:
        raise ValueError(f"no dequantizer for GGML type {_type_name(ggml_type)}")
    return fmt


def dequantize(raw: np.ndarray, ggml_type: GGMLType | int) -> np.ndarray:
    """A tensor's bytes, uint8 of any shape, -> its values, float32 (n_elements,)."""
    fmt = format_for(ggml_type)
    t = fmt.ggml_type
    if raw.dtype != np.uint8:
        raise ValueError(f"dequantize takes the tensor's raw bytes as uint8, not {raw.dtype}")
    if raw.size % t.type_size:
        raise ValueError(f"{raw.size} bytes are not a whole number of {t.name} blocks of {t.type_size} bytes")
    blocks = raw.reshape(-1, t.type_size)  # (n_blocks, type_size)
    return fmt.dequantize_blocks(blocks).reshape(-1)


def quantize(x: np.ndarray, ggml_type: GGMLType | int) -> np.ndarray:
    """float32 (n,), n a multiple of the block size -> uint8 (n_blocks, type_size), as ggml's
    reference quantizer writes it. Only types with a `quantize_blocks` can be quantized."""
    fmt = format_for(ggml_type)
    t = fmt.ggml_type
    if not hasattr(fmt, "quantize_blocks"):
        raise ValueError(f"no reference quantizer for GGML type {t.name}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1 or x.size % t.block_size:
        raise ValueError(f"quantize takes a 1-D array whose length is a multiple of {t.block_size} "
                         f"({t.name}'s block size), not shape {x.shape}")
    return fmt.quantize_blocks(x.reshape(-1, t.block_size))
