"""The K-quants: 256-element super-blocks split into sub-blocks of 16 or 32 with their own scales.

Same contract as `formats.py`: `dequantize_blocks(blocks)` maps uint8 (n_blocks, type_size) to
float32 (n_blocks, 256), doing the float32 operations in gguf-py's order so results are
bit-identical to it: sub-block scale first (`d * sc`), then `scale * q - d_min * m`.

In the 2-bit, 3-bit and 6-bit layouts a run of 32 bytes holds 4 (or 2) runs of 32 elements:
byte j carries element j in its lowest field, element j + 32 in the next, and so on
(`bits.unpack_bits` yields exactly that order).
"""
from __future__ import annotations

import numpy as np

from .bits import f16_field, f32_field, unpack_bits
from .ggml_types import GGMLType

QK_K = 256


def _scale_min_6bit(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K / Q5_K -> 8 scales and 8 mins of 6 bits, uint8 (n_blocks, 8) each.

    Bytes 0-3: scales 0-3 (low 6 bits), top 2 bits of scales 4-7.
    Bytes 4-7: mins 0-3 (low 6 bits), top 2 bits of mins 4-7.
    Bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = low 4 bits of mins 4-7.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]  # (n_blocks, 4) each
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


class Q2_K:
    """scales (16 B: per 16 elements, low nibble scale, high nibble min) | qs (64 B, 2-bit)
    | d (2 B, f16) | d_min (2 B, f16).  x = d*scale * q - d_min*min."""

    ggml_type = GGMLType.Q2_K

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        scales = blocks[:, 0:16]  # (n, 16)
        qs = blocks[:, 16:80].reshape(n, 2, 32)  # two halves of 128 elements
        d, dmin = f16_field(blocks, 80), f16_field(blocks, 82)  # (n, 1)
        dl = (d * (scales & 0x0F).astype(np.float32))[:, :, None]  # (n, 16, 1)
        ml = (dmin * (scales >> 4).astype(np.float32))[:, :, None]  # (n, 16, 1)
        q = unpack_bits(qs, 2).reshape(n, 16, 16).astype(np.float32)  # (n, sub-block, 16)
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K:
    """hmask (32 B: the third bit of each q) | qs (64 B, low 2 bits) | scales (12 B: 16 signed
    6-bit scales, stored +32) | d (2 B, f16).  x = d*scale * (q - 4 if the hmask bit is clear)."""

    ggml_type = GGMLType.Q3_K

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        hmask = blocks[:, 0:32]  # (n, 32): bit i of byte j is the high bit of element 32*i + j
        qs = blocks[:, 32:96].reshape(n, 2, 32)
        # scale bytes 0-7: low 4 bits of scales 0-7 (low nibbles) and 8-15 (high nibbles);
        # bytes 8-11: top 2 bits, bits [2k, 2k + 2) of byte 8 + j belonging to scale 4k + j
        packed = blocks[:, 96:108]  # (n, 12)
        d = f16_field(blocks, 108)  # (n, 1)
        low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1)  # (n, 16)
        high = unpack_bits(packed[:, 8:12], 2).reshape(n, 16)  # (n, 16)
        sc = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)  # (n, 16)
        dl = (d * sc)[:, :, None]  # (n, 16, 1)
        q = unpack_bits(qs, 2).reshape(n, QK_K).astype(np.int8)
        hbit = unpack_bits(hmask, 1).reshape(n, QK_K).astype(np.int8)
        q = (q - ((1 - hbit) << 2)).reshape(n, 16, 16).astype(np.float32)  # (n, sub-block, 16)
        return (dl * q).reshape(n, QK_K)


class Q4_K:
    """d (2 B, f16) | d_min (2 B, f16) | scales (12 B: 8 scales + 8 mins, 6-bit) | qs (128 B, 4-bit).
    Sub-blocks of 32; qs byte run c holds sub-block 2c in low nibbles, 2c + 1 in high nibbles.
    x = d*scale * q - d_min*min."""

    ggml_type = GGMLType.Q4_K

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)  # (n, 1)
        sc, mn = _scale_min_6bit(blocks[:, 4:16])  # (n, 8)
        q = unpack_bits(blocks[:, 16:144].reshape(n, 4, 32), 4)  # (n, 4, 2, 32)
        q = q.reshape(n, 8, 32).astype(np.float32)  # (n, sub-block, 32)
        dl = (d * sc.astype(np.float32))[:, :, None]  # (n, 8, 1)
        ml = (dmin * mn.astype(np.float32))[:, :, None]  # (n, 8, 1)
        return (dl * q - ml).reshape(n, QK_K)


class Q5_K:
    """d (2 B, f16) | d_min (2 B, f16) | scales (12 B, as Q4_K) | qh (32 B: bit i of byte j is the
    fifth bit of element 32*i + j) | qs (128 B, low 4 bits as Q4_K).  x = d*scale * q - d_min*min."""

    ggml_type = GGMLType.Q5_K

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)  # (n, 1)
        sc, mn = _scale_min_6bit(blocks[:, 4:16])  # (n, 8)
        high = unpack_bits(blocks[:, 16:48], 1).reshape(n, 8, 32)  # (n, sub-block, 32)
        low = unpack_bits(blocks[:, 48:176].reshape(n, 4, 32), 4).reshape(n, 8, 32)
        q = (low | (high << 4)).astype(np.float32)  # (n, 8, 32)
        dl = (d * sc.astype(np.float32))[:, :, None]  # (n, 8, 1)
        ml = (dmin * mn.astype(np.float32))[:, :, None]  # (n, 8, 1)
        return (dl * q - ml).reshape(n, QK_K)


class Q6_K:
    """ql (128 B, low 4 bits) | qh (64 B, high 2 bits) | scales (16 B, int8, per 16 elements)
    | d (2 B, f16).  Each half of 128 elements uses 64 ql bytes (element j and j + 64 share
    byte j) and 32 qh bytes (elements j, j+32, j+64, j+96 share byte j).  x = d*scale * (q - 32)."""

    ggml_type = GGMLType.Q6_K

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        low = unpack_bits(blocks[:, 0:128].reshape(n, 2, 64), 4).reshape(n, QK_K)
        high = unpack_bits(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, QK_K)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
        d = f16_field(blocks, 208)  # (n, 1)
        q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
        dl = (d * sc)[:, :, None]  # (n, 16, 1)
        return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


class Q8_K:
    """d (4 B, f32) | qs (256 B, int8) | bsums (32 B: int16 sum of each 16 qs).  x = d * q.

    Not a weight format: ggml quantizes activations to it for dot products with K-quant
    weights (the bsums fold in the weights' mins).  The quantizer follows
    `quantize_row_q8_K_ref`: scale -127 / (the value of largest magnitude), round half to even.
    """

    ggml_type = GGMLType.Q8_K

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        d = f32_field(blocks, 0)  # (n, 1)
        return d * blocks[:, 4:260].view(np.int8).astype(np.float32)

    @staticmethod
    def quantize_blocks(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]  # x: float32 (n, 256)
        imax = np.abs(x).argmax(axis=1)[:, None]  # first index of the largest |x|
        vmax = np.take_along_axis(x, imax, axis=1)  # (n, 1), signed
        zero = vmax == 0
        with np.errstate(divide="ignore"):
            iscale = np.float32(-127.0) / np.where(zero, np.float32(1), vmax)  # (n, 1)
        q = np.minimum(np.rint(iscale * x), 127).astype(np.int8)  # (n, 256)
        q[zero[:, 0]] = 0
        d = np.where(zero, np.float32(0), np.float32(1) / iscale)  # (n, 1)
        bsums = q.reshape(n, 16, 16).sum(axis=2, dtype=np.int16)  # (n, 16)
        return np.concatenate([d.view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=1)
