"""Small helpers that pull fields out of quantized blocks, shared by the format classes.

Every helper takes blocks as uint8 rows, `(n_blocks, type_size)` or a byte range of them, and
works on all blocks at once.
"""
from __future__ import annotations

import numpy as np


def f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 at bytes [start, start + 2) of each block, as float32 (n_blocks, 1)."""
    raw = np.ascontiguousarray(blocks[:, start:start + 2])  # (n_blocks, 2)
    return raw.view(np.float16).astype(np.float32)


def f32_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f32 at bytes [start, start + 4) of each block: float32 (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, start:start + 4]).view(np.float32)


def unpack_bits(packed: np.ndarray, width: int) -> np.ndarray:
    """Split each byte into 8 // width fields of `width` bits, lowest bits first.

    packed: uint8 (..., k) -> uint8 (..., 8 // width, k); [..., i, j] = bits [i*width, (i+1)*width)
    of packed[..., j]. Fields of one byte land `k` apart, which is how ggml lays them out.
    """
    shifts = np.arange(0, 8, width, dtype=np.uint8)[:, None]  # (8 // width, 1)
    return (packed[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def round_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: round to nearest, halves away from zero (float32 in, float32 out).

    `v - trunc(v)` is exact in floating point, so comparing it with 0.5 never misrounds values
    just below a half, as `trunc(v + 0.5)` would.
    """
    t = np.trunc(v)
    return t + np.copysign((np.abs(v - t) >= 0.5).astype(v.dtype), v)
