"""The quantized products (kernels_cpu.qmatmul) against their numpy references.

The reference for a decode product is its recipe in numpy float64: x rounded per 32-block to the
15-bit integers qmatmul.quantize_x makes (checked here against a numpy transcription), the
dequantized GGUF weights (quant/, bit-exact to gguf-py), Q4_K's mins against the float sums of x
(Q2_K's against those of the rounded x). What is left is float32 accumulation: 2e-6 * |x| . |w|.
Against the exact product the rounding of x adds at most half a step per element. Every CPU
path this machine offers is held to that bound, and the paths with accumulators of the same width
(simd.acc_lanes: 16 float lanes on AVX-512, 8 elsewhere) must give the same bits; results must not
depend on threads, batch size or row chunks. Prompts of more than TILE_T tokens go through packed
tiles: the same integers, another float order, so the same bounds, and batch-invariant among
themselves.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgellm.kernels_cpu import linear, qmatmul as qm, qmatmul_tiles as tiles, simd, threads
from edgellm.kernels_cpu.qmatmul_ref import SPLIT_MINS, dequantize_rows, int8_error_bound, random_raw, split
from edgellm.loaders.gguf import GGUFFile
from edgellm.quant.ggml_types import GGMLType as T
from edgellm.quant.quantize import quantize_rows

from conftest import model_file

QTYPES = [T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0, T.Q3_K, T.Q2_K, T.Q4_0]
PATHS = simd.supported()


def _quantized_x(x):
    """numpy transcription of quantize_x: (v int64 (T, K), d (T, K/32))."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=2)
    d = (amax / np.float32(127 * 128)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = np.rint(xb * inv[:, :, None]).astype(np.int64)
    return v.reshape(x.shape), d


def _reference(raw, t, k, x):
    v, d = _quantized_x(x)
    xh = (v.reshape(x.shape[0], -1, 32) * d[:, :, None].astype(np.float64)).reshape(x.shape)
    if t not in SPLIT_MINS:
        return xh @ dequantize_rows(raw, t, k).astype(np.float64).T
    s = split(raw, t, k)
    q = s.q.astype(np.float64).reshape(raw.shape[0], -1, s.bs)  # Q4_K: scale * q - mins
    scaled = (q * s.scale[:, :, None]).reshape(raw.shape[0], k)
    xsum = x.reshape(x.shape[0], -1, s.bs).sum(axis=2, dtype=np.float64)
    return xh @ scaled.T - xsum @ s.mins.astype(np.float64).T


@pytest.mark.parametrize("isa", [simd.GENERIC, simd.AVX2], ids=["two-int8", "wide"])
def test_quantize_x_is_its_recipe(isa):
    """Both layouts (they are plain vector IR, made on any CPU): two int8 parts, or int16 in
    simd.WIDE_ORDER per 32-block for the wide (AVX2) path."""
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32) * 5
    x[1, 40:64] = 0  # an all-zero block
    xq, xd, xs, x4n = qm.quantize_x(x, isa=isa)
    v, d = _quantized_x(x)
    kp = xq.shape[1] // 2
    if simd.wide(isa):
        stored = xq.view(np.int16).reshape(3, kp // 32, 32).astype(np.int64)
        got = np.empty_like(stored)
        got[:, :, simd.WIDE_ORDER] = stored
        assert sorted(simd.WIDE_ORDER) == list(range(32)) and not got.reshape(3, kp)[:, 96:].any()
        assert np.array_equal(got.reshape(3, kp)[:, :96], v) and not x4n[:, 24:].any()
    else:
        hi = xq.reshape(3, kp // 64, 2, 64)[:, :, 0].reshape(3, kp).astype(np.int64)
        lo = xq.reshape(3, kp // 64, 2, 64)[:, :, 1].reshape(3, kp).astype(np.int64)
        assert not hi[:, 96:].any() and not lo[:, 96:].any() and not x4n[:, 24:].any()  # the padding stays zero
        hi, lo = hi[:, :96], lo[:, :96]
        assert np.array_equal(128 * hi + lo, v) and np.abs(hi).max() <= 127 and np.abs(lo).max() <= 64
    assert np.array_equal(xd[:, :3], d)
    assert np.array_equal(x4n[:, :24], -v.reshape(3, 24, 4).sum(axis=2))
    assert np.allclose(xs[:, :3], x.reshape(3, 3, 32).sum(axis=2), rtol=1e-6)


def _check_every_path(raw, t, k, x):
    """The product is within float32 rounding of the recipe on every CPU path, and the same bits
    on the paths whose accumulators have the same width."""
    ref = _reference(raw, t, k, x)
    tol = 2e-6 * (np.abs(x) @ np.abs(dequantize_rows(raw, t, k)).T) + 1e-30
    w = qm.Weight(raw, t, k)
    ys = {isa: qm.matmul(w, x, isa) for isa in PATHS}
    first: dict[int, int] = {}
    for isa, y in ys.items():
        assert float((np.abs(y - ref) / tol).max()) <= 1.0, simd.NAMES[isa]
        same = first.setdefault(simd.acc_lanes(isa), isa)
        assert np.array_equal(y, ys[same]), f"{simd.NAMES[isa]} differs from {simd.NAMES[same]}"


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [512, 1536])
def test_products_match_the_recipe_on_every_path(t, k):
    rng = np.random.default_rng(int(t) + k)
    raw = random_raw(t, 75, k, rng)
    x = rng.standard_normal((13, k)).astype(np.float32)  # every group shape: 8 or 4 tokens x 2 rows, 1
    _check_every_path(raw, t, k, x)


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_products_are_within_the_15_bit_bound_of_the_exact_product(t):
    """|y - x . w| <= sum over 32-blocks of amax(x) / (2 * 127 * 128) * |w| (Q4_K: |scale * q|, its
    mins meet exact sums) plus float32 accumulation."""
    rng = np.random.default_rng(int(t) + 17)
    k = 1536
    raw = random_raw(t, 40, k, rng)
    x = rng.standard_normal((5, k)).astype(np.float32)
    x[1] *= np.exp(rng.standard_normal(k) * 2).astype(np.float32)  # outlier-heavy blocks
    w = dequantize_rows(raw, t, k).astype(np.float64)
    rounded = w
    if t in SPLIT_MINS:
        s = split(raw, t, k)
        rounded = (s.q.reshape(40, -1, s.bs) * s.scale[:, :, None].astype(np.float64)).reshape(40, k)
    bound = int8_error_bound(rounded, x, 32, 127 * 128) + 2e-6 * (np.abs(x) @ np.abs(w).T) + 1e-30
    err = np.abs(qm.matmul(qm.Weight(raw, t, k), x) - x.astype(np.float64) @ w.T)
    assert float((err / bound).max()) <= 1.0


@pytest.mark.parametrize("t", [T.Q5_0, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_an_odd_number_of_32_blocks(t):
    rng = np.random.default_rng(5)
    raw = random_raw(t, 40, 96, rng)  # 3 blocks: one pair and a lone block
    x = rng.standard_normal((2, 96)).astype(np.float32)
    tol = 2e-6 * (np.abs(x) @ np.abs(dequantize_rows(raw, t, 96)).T) + 1e-30
    assert float((np.abs(qm.matmul(qm.Weight(raw, t, 96), x) - _reference(raw, t, 96, x)) / tol).max()) <= 1.0


def test_zero_blocks_and_outliers():
    rng = np.random.default_rng(3)
    for t in QTYPES:
        raw = random_raw(t, 20, 512, rng)
        x = rng.standard_normal((2, 512)).astype(np.float32)
        x[0, :64] = 0
        x[1, 7] = 3e4
        y = qm.matmul(qm.Weight(raw, t, 512), x)
        assert np.isfinite(y).all()
        tol = 2e-6 * (np.abs(x) @ np.abs(dequantize_rows(raw, t, 512)).T) + 1e-30
        assert float((np.abs(y - _reference(raw, t, 512, x)) / tol).max()) <= 1.0, t.name


def test_results_do_not_depend_on_batch_threads_or_grouping():
    """What speculative verification needs: a token's row is the same bits whatever shares its call."""
    rng = np.random.default_rng(9)
    ws = [qm.Weight(random_raw(t, 3000, 1536, rng), t, 1536) for t in QTYPES]
    x = rng.standard_normal((qm.SMALL_T, 1536)).astype(np.float32)
    old = threads.max_count()
    try:
        threads.configure(1)
        alone = [qm.matmul(w, x[2:3]) for w in ws]
        threads.configure(2)
        grouped = qm.Product(ws)(x)
        for a, g in zip(alone, grouped):
            assert np.array_equal(a[0], g[2])
    finally:
        threads.configure(old)


@pytest.mark.parametrize("n_tok", [1, qm.SMALL_T + 1])
def test_row_chunks_give_the_same_bits_as_the_whole_matrix(n_tok):
    """What makes a streamed output head (computed chunk by chunk) equal a resident one."""
    rng = np.random.default_rng(7)
    k = 640
    tile = qm.tile_rows(k)
    raw = random_raw(T.Q8_0, 7 * tile + 100, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    whole = qm.matmul(qm.Weight(raw, T.Q8_0, k), x)
    cuts = [0, tile, 5 * tile, raw.shape[0]]
    parts = [qm.matmul(qm.Weight(raw[a:b], T.Q8_0, k), x) for a, b in zip(cuts, cuts[1:])]
    assert np.array_equal(np.concatenate(parts, axis=1), whole)


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_a_short_prompt_gives_each_token_the_bits_of_its_own_decode(t):
    """Products of up to TILE_T tokens (groups of 8 or 4 tokens against 1 or 2 rows, then fewer,
    per row pass) follow the decode recipe, and a token's row equals the one it gets decoded
    alone: decode, speculative verification and batched parallel decode agree bit for bit."""
    rng = np.random.default_rng(11)
    raw = random_raw(t, 301, 512, rng)
    x = rng.standard_normal((tiles.TILE_T, 512)).astype(np.float32)
    w = qm.Weight(raw, t, 512)
    y = qm.matmul(w, x)
    tol = 2e-6 * (np.abs(x) @ np.abs(dequantize_rows(raw, t, 512)).T) + 1e-30
    assert float((np.abs(y - _reference(raw, t, 512, x)) / tol).max()) <= 1.0
    for i in (0, 7, 8, 11, 12, x.shape[0] - 1):
        assert np.array_equal(qm.matmul(w, x[i:i + 1])[0], y[i])


def test_verification_and_parallel_batches_stay_on_the_decode_recipe():
    """Speculative verification (draft + 1 tokens) and a parallel decode pass (one row per slot)
    must never reach the tiles, whose float order differs from decode's."""
    from edgellm.runtime import config, speculative
    assert speculative.MAX_DRAFT + 1 <= tiles.TILE_T
    with pytest.raises(config.ConfigError):
        config.RuntimeConfig(parallel=tiles.TILE_T + 1)
    config.RuntimeConfig(parallel=tiles.TILE_T)


TILED = [T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0]


@pytest.mark.parametrize("t,k", [(t, k) for t in TILED for k in (512, 1536)] + [(T.Q5_0, 96), (T.Q8_0, 96)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_prompt_tiles_match_the_recipe_on_every_path(t, k):
    """A prompt of more than TILE_T tokens goes through the packed tiles (qmatmul_tiles): the same
    integers as decode, one float chain per row; 75 rows are two tiles and a part of one, 37 tokens
    are groups of 8 and lone ones; K = 96 ends on a lone 32-block."""
    rng = np.random.default_rng(int(t) + k + 1)
    raw = random_raw(t, 75, k, rng)
    x = rng.standard_normal((tiles.TILE_T + 21, k)).astype(np.float32)
    x[3] *= np.exp(rng.standard_normal(k) * 2).astype(np.float32)  # an outlier-heavy token
    _check_every_path(raw, t, k, x)


@pytest.mark.parametrize("t", TILED, ids=lambda t: t.name)
def test_a_prompt_token_gets_the_same_bits_whatever_shares_its_tiles(t):
    """A tiled token's row depends on its own x alone: not on the tokens around it, where its
    group of 8 starts, the thread count or the other weights of the product."""
    rng = np.random.default_rng(int(t) + 3)
    raw = random_raw(t, 200, 1536, rng)
    x = rng.standard_normal((40, 1536)).astype(np.float32)
    w = qm.Weight(raw, t, 1536)
    old = threads.max_count()
    try:
        threads.configure(2)
        whole = qm.matmul(w, x)
        threads.configure(1)
        part = qm.Product([qm.Weight(random_raw(T.Q4_K, 64, 1536, rng), T.Q4_K, 1536), w])(x[5:5 + tiles.TILE_T + 3])[1]
    finally:
        threads.configure(old)
    assert np.array_equal(part, whole[5:5 + tiles.TILE_T + 3])


@pytest.mark.parametrize("t", [T.F32, T.F16, T.Q4_1, T.Q5_K], ids=lambda t: t.name)
def test_other_types_go_through_the_reference(t):
    rng = np.random.default_rng(4)
    raw = random_raw(t, 30, 256, rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize_rows(raw, t, 256).astype(np.float64).T
    assert np.allclose(qm.matmul(qm.Weight(raw, t, 256), x), ref, rtol=1e-5, atol=1e-4)


def test_real_weights_of_each_fast_type():
    with GGUFFile(model_file("qwen2.5-coder-0.5b")) as f:
        for name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.weight"):
            t = f.info(name)
            raw = np.array(f.rows(name))
            x = np.random.default_rng(1).standard_normal((2, t.shape[0])).astype(np.float32)
            tol = 2e-6 * (np.abs(x) @ np.abs(dequantize_rows(raw, t.type, t.shape[0])).T) + 1e-30
            y = qm.matmul(qm.Weight(raw, t.type, t.shape[0]), x)
            assert float((np.abs(y - _reference(raw, t.type, t.shape[0], x)) / tol).max()) <= 1.0, name


@pytest.mark.parametrize("t", [T.Q4_0, T.Q3_K, T.Q2_K], ids=lambda t: t.name)
def test_real_weights_requantized(t):
    """Real values in the fast types the shipped models lack (`edgellm compress` writes them)."""
    with GGUFFile(model_file("qwen2.5-coder-0.5b")) as f:
        info = f.info("blk.0.ffn_down.weight")
        w = dequantize_rows(np.array(f.rows("blk.0.ffn_down.weight")), info.type, info.shape[0])
    k = w.shape[1]
    raw = quantize_rows(w, t)
    x = np.random.default_rng(2).standard_normal((3, k)).astype(np.float32)
    tol = 2e-6 * (np.abs(x) @ np.abs(dequantize_rows(raw, t, k)).T) + 1e-30
    y = qm.matmul(qm.Weight(raw, t, k), x)
    assert float((np.abs(y - _reference(raw, t, k, x)) / tol).max()) <= 1.0


def test_bad_inputs_are_errors():
    raw = random_raw(T.Q8_0, 4, 64, np.random.default_rng(0))
    p = qm.Product([qm.Weight(raw, T.Q8_0, 64)])
    with pytest.raises(ValueError, match="expected"):
        p(np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="one K"):
        qm.Product([qm.Weight(raw, T.Q8_0, 64), qm.Weight(random_raw(T.Q8_0, 4, 96, np.random.default_rng(0)), T.Q8_0, 96)])
    with pytest.raises(ValueError, match="not one of"):
        linear.select("onnxruntime")
    with pytest.raises(ValueError):
        threads.configure(0)


def test_forcing_a_path(monkeypatch):
    monkeypatch.setenv("EDGELLM_ISA", "generic")
    assert simd.chosen() == simd.GENERIC
    monkeypatch.setenv("EDGELLM_ISA", "sse9")
    with pytest.raises(ValueError, match="not one of"):
        simd.chosen()


def test_auto_threads_stay_within_the_allowed_cpus():
    threads.configure("auto")
    assert 1 <= threads.max_count() <= threads.allowed_cpus()


def _thread_cpu_seconds(native_id: int) -> float:
    import os
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_idle_workers_sleep_and_burn_no_cpu():
    """Between calls the pool's workers sleep: a worker that kept polling would take a core from
    every other process (and from llama.cpp in `edgellm bench`)."""
    import time
    rng = np.random.default_rng(3)
    w = qm.Weight(random_raw(T.Q4_K, 4096, 1536, rng), T.Q4_K, 1536)
    x = rng.standard_normal((1, 1536)).astype(np.float32)
    old = threads.max_count()
    try:
        threads.configure(2)
        for _ in range(20):
            qm.matmul(w, x)
        pool = threads._state["pool"]
        assert pool is not None
        time.sleep(0.05)
        ids = [t.native_id for t in pool.threads]
        before = [_thread_cpu_seconds(i) for i in ids]
        time.sleep(1.0)
        after = [_thread_cpu_seconds(i) for i in ids]
        assert max(a - b for a, b in zip(after, before)) < 0.1
        assert np.array_equal(qm.matmul(w, x), qm.matmul(w, x))  # and they wake up for the next call
    finally:
        threads.configure(old)
