"""The numpy reference formats against gguf-py's `gguf.quants`, the oracle, bit for bit.

Random blocks (random f16 scales, plus NaN, inf, zero and subnormal ones) for every type,
the Q8_0 / Q4_0 reference quantizers, Q8_K against a line-by-line transcription of ggml's C,
and every tensor of the real models (1.5B under `-m slow`).
"""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from edgellm.loaders.gguf import GGUFFile
from edgellm.loaders.store import model_path
from edgellm.quant import formats
from edgellm.quant.formats import dequantize, format_for, quantize
from edgellm.quant.ggml_types import GGMLType as T

# byte offsets of each type's scale fields (f16, or the value itself for the plain types)
SCALE_OFFSETS = {
    T.F32: (0,), T.F16: (0,), T.BF16: (0,),
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
# NaN, NaN with payload, negative NaN, +inf, -inf, +0, -0, smallest subnormal, largest subnormal, max
F16_SPECIALS = np.array([0x7E00, 0x7D01, 0xFE01, 0x7C00, 0xFC00, 0, 0x8000, 1, 0x03FF, 0x7BFF], np.uint16)
BF16_SPECIALS = np.array([0x7FC0, 0x7F81, 0xFFC1, 0x7F80, 0xFF80, 0, 0x8000, 1, 0x007F, 0x7F7F], np.uint16)
F32_SPECIALS = np.array([0x7FC00000, 0x7F800001, 0xFFC00001, 0x7F800000, 0xFF800000, 0, 0x80000000,
                         1, 0x007FFFFF, 0x7F7FFFFF], np.uint32)


def oracle_dequantize(raw: np.ndarray, t: T) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t))).reshape(-1)


def assert_same_bits(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.dtype == np.float32 and ref.dtype == np.float32, what
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    diff = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    if diff.size:
        i = diff[0]
        a, b = ours.view(np.uint32)[i], ref.view(np.uint32)[i]
        pytest.fail(f"{what}: {diff.size} of {ours.size} values differ; first at {i}: "
                    f"{ours[i]!r} ({a:#010x}) != {ref[i]!r} ({b:#010x})")


def random_blocks(t: T, n_blocks: int, seed: int) -> np.ndarray:
    """uint8 (n_blocks, type_size) of random bytes; the first blocks get special scale values."""
    blocks = np.random.default_rng(seed).integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    specials = {T.F32: F32_SPECIALS, T.BF16: BF16_SPECIALS}.get(t, F16_SPECIALS)
    width = specials.itemsize
    for k, off in enumerate(SCALE_OFFSETS[t]):  # roll so that e.g. d = NaN meets d_min = inf
        blocks[:specials.size, off:off + width] = np.roll(specials, k).view(np.uint8).reshape(-1, width)
    return blocks


@pytest.mark.parametrize("t", list(SCALE_OFFSETS), ids=lambda t: t.name)
def test_random_blocks_match_gguf(t):
    blocks = random_blocks(t, 700, seed=int(t))
    with np.errstate(all="ignore"):  # inf * 0 and friends in the special blocks
        ref = oracle_dequantize(blocks, t)
        per_block = format_for(t).dequantize_blocks(blocks)
        flat = dequantize(blocks, t)
    assert per_block.shape == (700, t.block_size)
    assert_same_bits(per_block.reshape(-1), ref, f"{t.name} dequantize_blocks")
    assert_same_bits(flat, ref, f"{t.name} dequantize")
    assert np.isnan(ref).any() and np.isinf(ref).any()  # the specials reached the output


def boundary_blocks(t: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (n_blocks, block_size) whose x / d lie within 2 ulps of a rounding boundary (k + 0.5),
    so that computing x / d instead of x * (1 / d), or rounding differently, changes some q."""
    bs, top = t.block_size, {T.Q8_0: 127, T.Q4_0: 8}[t]
    scale = np.exp(rng.uniform(-12, 12, (n_blocks, 1))).astype(np.float32)
    first = (top * scale).astype(np.float32)  # the largest |x|, so d = first / top (negated for Q4_0)
    d = first / np.float32(top)
    x = (rng.integers(-top, top - 2, (n_blocks, bs)).astype(np.float32) + np.float32(0.5)) * d
    x = (x.view(np.int32) + rng.integers(-2, 3, x.shape, dtype=np.int32)).view(np.float32)
    x[:, :1] = first
    return x


def quantizer_inputs(t: T) -> np.ndarray:
    """float32 (n * block_size,): ordinary, tiny, huge, zero, tie-making and boundary blocks."""
    block_size = t.block_size
    rng = np.random.default_rng(7)
    parts = [rng.standard_normal(block_size * 64) * s for s in (1.0, 1e-3, 1e3)]
    parts.append(rng.standard_normal(block_size * 32) * np.exp(rng.uniform(-30, 30, block_size * 32)))
    parts.append(rng.standard_normal(block_size * 4) * 1e-6)  # f16 scale underflows to subnormal / 0
    parts.append(rng.standard_normal(block_size * 4) * 1e7)  # f16 scale overflows to inf
    parts.append(np.zeros(block_size))  # d = 0, so 1/d must not be taken
    ties = np.resize(np.arange(-31.5, 32.0, 1.0), block_size)  # with 127 below: d = 1, x/d = k + 0.5
    ties[0] = 127.0
    ties[1:5] = np.nextafter(np.float32([0.5, -0.5, 1.5, 2.5]), np.float32(0))  # just below a half
    parts.append(ties)
    sym = rng.standard_normal(block_size)  # two values of largest |x|, opposite signs: first one wins
    sym[3], sym[9] = -5.0, 5.0
    parts += [sym, -sym, boundary_blocks(t, 256, rng).reshape(-1)]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_quantize_matches_gguf(t):
    x = quantizer_inputs(t)
    with np.errstate(all="ignore"):  # the overflowing block gives d = inf in f16, as in ggml
        ours = quantize(x, t)
        ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType(int(t))).reshape(-1, t.type_size)
        assert ours.dtype == np.uint8 and ours.shape == (x.size // t.block_size, t.type_size)
        np.testing.assert_array_equal(ours, ref)
        assert_same_bits(dequantize(ours, t), oracle_dequantize(ref, t), f"{t.name} round trip")


@pytest.mark.parametrize("t, max_err", [(T.Q8_0, 0.5), (T.Q4_0, 1.0)], ids=["Q8_0", "Q4_0"])
def test_quantize_round_trip_error_is_within_half_a_step(t, max_err):
    x = np.random.default_rng(3).standard_normal(t.block_size * 256).astype(np.float32)
    q = quantize(x, t)
    d = q[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    err = np.abs(dequantize(q, t).reshape(-1, t.block_size) - x.reshape(-1, t.block_size))
    # d was rounded to f16 after quantizing: up to 127 * 2^-11 * |d| more error
    assert (err <= (max_err + 0.07) * np.abs(d)).all()


def q8_k_reference(x: np.ndarray) -> bytes:
    """One block of ggml's `quantize_row_q8_K_ref`, transcribed statement by statement."""
    amax, vmax = np.float32(0), np.float32(0)
    for v in x:
        if abs(v) > amax:
            amax, vmax = abs(v), v
    if amax == 0:
        return bytes(292)
    iscale = np.float32(-127.0) / vmax

    def nearest_int(f):  # ggml's float-to-int via the 1.5 * 2^23 magic number
        i = np.array([np.float32(f) + np.float32(12582912.0)], np.float32).view(np.int32)[0]
        return int(i & 0x007FFFFF) - 0x00400000

    qs = [min(127, nearest_int(iscale * v)) for v in x]
    bsums = [sum(qs[16 * j:16 * j + 16]) for j in range(16)]
    return struct.pack("<f256b16h", np.float32(1) / iscale, *qs, *bsums)


def test_q8_k_quantize_matches_ggml_reference():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((6, 256)) * np.array([[1], [1e-4], [1e4], [0], [1], [3]])).astype(np.float32)
    x[4, 17], x[4, 200] = 9.0, -9.0  # tie for the largest |x|
    x[5] = np.resize(np.arange(-127, 128, 2, dtype=np.float32) / 2, 256)  # exact halves: round to even
    x[5, 0] = -127.0
    ours = quantize(x.reshape(-1), T.Q8_K)
    assert ours.shape == (6, 292)
    for i in range(6):
        assert ours[i].tobytes() == q8_k_reference(x[i]), f"block {i}"
    back = dequantize(ours, T.Q8_K).reshape(6, 256)
    d = ours[:, :4].copy().view(np.float32)
    assert (np.abs(back - x) <= 0.5 * np.abs(d) * 1.0001).all()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no dequantizer for GGML type IQ2_XXS"):
        format_for(T.IQ2_XXS)
    with pytest.raises(ValueError, match="no dequantizer for GGML type 99"):
        format_for(99)
    with pytest.raises(ValueError, match="not a whole number of Q4_0 blocks"):
        dequantize(np.zeros(19, np.uint8), T.Q4_0)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(np.zeros(8, np.float32), T.F32)
    with pytest.raises(ValueError, match="no reference quantizer for GGML type Q6_K"):
        quantize(np.zeros(256, np.float32), T.Q6_K)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.zeros(48, np.float32), T.Q8_0)
    assert set(formats.FORMATS) == set(SCALE_OFFSETS) | {T.Q8_K}


CHUNK_ELEMENTS = 1 << 20  # dequantize big tensors a slice of rows at a time: small buffers, warm caches


@pytest.mark.parametrize("model", [
    "gemma3-270m",
    "qwen2.5-coder-0.5b",
    pytest.param("qwen2.5-coder-1.5b", marks=pytest.mark.slow),
])
def test_every_tensor_of_real_models_matches_gguf(model):
    path = model_path(model)
    if not path.is_file():
        pytest.skip(f"{path} is missing (run `edgellm pull {model}`)")
    oracle = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert [t.name for t in oracle.tensors] == list(f.tensors)
        for ref_tensor in oracle.tensors:
            info = f.tensors[ref_tensor.name]
            assert int(info.type) == int(ref_tensor.tensor_type), info.name
            ours_rows = f.rows(info.name)  # (n_rows, row_bytes), our reader
            ref_rows = ref_tensor.data.reshape(info.n_rows, -1)  # gguf's reader
            step = max(1, CHUNK_ELEMENTS // info.shape[0])
            for r in range(0, info.n_rows, step):
                ours = dequantize(ours_rows[r:r + step], info.type)
                ref = gguf.quants.dequantize(ref_rows[r:r + step], ref_tensor.tensor_type).reshape(-1)
                assert_same_bits(ours, ref, f"{model} {info.name} ({info.type.name}) rows {r}+")
