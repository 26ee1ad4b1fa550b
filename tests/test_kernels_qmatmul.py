"""Quantized products (kernels_cpu.linear) on every backend against the float64 reference.

The reference is `dequantize then x @ W.T` in float64, with the weights from the numpy reference
dequantizer (edgellm.quant.formats, itself bit-exact to gguf-py). Tolerance per output
(`linear.tolerance`): a backend that rounds activations to integers per scale block may be off by
at most sum_b amax_b(x) / (2 qmax) * |w_b|_1, the worst case of that rounding (onnxruntime: int8,
qmax 127; numba for T <= 8: int16, qmax 32767); every backend gets 1e-5 * |x|.|w| more for float32
accumulation. In practice onnxruntime lands at 5-25% of its bound, the others at <20% of theirs.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgellm.kernels_cpu import linear, qmatmul_ort
from edgellm.kernels_cpu.qmatmul_ref import dequantize_rows, dequantize_split, int8_error_bound, random_raw, split
from edgellm.loaders.store import is_cached, model_path
from edgellm.quant.formats import dequantize
from edgellm.quant.ggml_types import GGMLType as T

QTYPES = [T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0]
BACKENDS = linear.available_backends()
N, K = 75, 512  # N not a multiple of the numba tile, K two K-quant super-blocks


def _check(w: linear.PackedWeight, wref: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    ref = x.astype(np.float64) @ wref.astype(np.float64).T
    tol = linear.tolerance(w, x, wref)
    worst = float((np.abs(y - ref) / tol).max())
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert worst <= 1.0, f"{w.backend} {w.ggml_type.name}: error reaches {worst:.2f}x the tolerance"


@pytest.mark.parametrize("t", QTYPES + [T.F32, T.F16], ids=lambda t: t.name)
def test_split_is_the_gguf_values(t):
    raw = random_raw(t, N, K, np.random.default_rng(1))
    ref = dequantize(raw, t).reshape(N, K)
    assert np.array_equal(dequantize_rows(raw, t, K).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_ort_weights_are_exact(t):
    """The MatMulNBits initializers, dequantized as onnxruntime defines it, are the GGUF values."""
    raw = random_raw(t, N, K, np.random.default_rng(2))
    s = split(raw, t, K)
    a = qmatmul_ort.ort_arrays(s)
    nb = K // s.bs
    if s.mins is not None:  # 4-bit, element 2j in the low nibble, zero points given (all 0)
        q = np.stack([a["B"] & 15, a["B"] >> 4], axis=-1).reshape(N, nb, s.bs).astype(np.float32)
        zp = np.stack([a["Z"] & 15, a["Z"] >> 4], axis=-1).reshape(N, -1)[:, :nb, None].astype(np.float32)
        w = (q - zp) * a["S"].reshape(N, nb, 1) + a["M"].T[:, :, None]
    else:  # 8-bit, default zero point 128
        w = (a["B"].astype(np.float32) - 128) * a["S"].reshape(N, nb, 1)
    assert np.array_equal(w.reshape(N, K), dequantize(raw, t).reshape(N, K))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", QTYPES + [T.F32, T.F16], ids=lambda t: t.name)
def test_matmul_random(backend, t):
    rng = np.random.default_rng(3)
    raw = random_raw(t, N, K, rng)
    wref = dequantize(raw, t).reshape(N, K)
    w = linear.pack(raw, t, K, backend)
    for tokens in (1, 7, 64):
        x = rng.standard_normal((tokens, K)).astype(np.float32)
        _check(w, wref, x, linear.matmul(w, x))
    rows = np.array([N - 1, 0, 17, 17, 40], np.int64)
    x = rng.standard_normal(K).astype(np.float32)
    y = linear.matvec_rows(w, x, rows)
    _check(w, wref[rows], x[None, :], y[None, :])


@pytest.mark.parametrize("t", [T.Q4_0, T.Q5_K], ids=lambda t: t.name)
def test_other_types_fall_back_to_float(t):
    """Types without a fused path are dequantized once into a float32 matrix (BLAS products)."""
    rng = np.random.default_rng(11)
    raw = random_raw(t, N, K, rng)
    wref = dequantize(raw, t).reshape(N, K)
    w = linear.pack(raw, t, K)
    assert w.backend == "float"
    x = rng.standard_normal((7, K)).astype(np.float32)
    _check(w, wref, x, linear.matmul(w, x))
    rows = np.array([3, 1], np.int64)
    _check(w, wref[rows], x[:1], linear.matvec_rows(w, x[0], rows)[None, :])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_scales_and_outliers(backend):
    """Q4_K sub-blocks whose scale is 0 (only the min is left); activations with an outlier."""
    rng = np.random.default_rng(4)
    raw = random_raw(T.Q4_K, N, K, rng).reshape(-1, T.Q4_K.type_size).copy()
    raw[::3, 4:8] &= 0xC0  # first four 6-bit scales of every third super-block -> 0
    raw = raw.reshape(N, -1)
    wref = dequantize(raw, T.Q4_K).reshape(N, K)
    w = linear.pack(raw, T.Q4_K, K, backend)
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[1, 5] = 1e3
    _check(w, wref, x, linear.matmul(w, x))


GEMMA = "gemma3-270m"
REAL = {T.Q5_0: "blk.0.ffn_up.weight", T.Q8_0: "token_embd.weight",
        T.Q4_K: "blk.0.attn_output.weight", T.Q6_K: "blk.0.ffn_down.weight"}


@pytest.fixture(scope="module")
def gemma():
    if not is_cached(GEMMA):
        pytest.skip(f"{GEMMA} is not in the model cache")
    from edgellm.loaders.gguf import GGUFFile
    with GGUFFile(model_path(GEMMA)) as f:
        yield f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_matmul_real_gemma(gemma, backend, t):
    info = gemma.tensors[REAL[t]]
    assert info.type == t
    raw = gemma.rows(REAL[t])[:1024]  # (the 262144-row embedding: its first 1024 rows)
    k = info.shape[0]
    wref = dequantize(raw, t).reshape(-1, k)
    w = linear.pack(raw, t, k, backend)
    rng = np.random.default_rng(5)
    for tokens in (1, 7, 64):
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        _check(w, wref, x, linear.matmul(w, x))
    rows = rng.choice(raw.shape[0], 100, replace=False).astype(np.int64)
    x = rng.standard_normal(k).astype(np.float32)
    _check(w, wref[rows], x[None, :], linear.matvec_rows(w, x, rows)[None, :])


def test_numba_int16_activations_are_near_exact():
    """numba rounds x to int16: ~256x closer to the float product than the int8 bound allows."""
    if "numba" not in BACKENDS:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(6)
    raw = random_raw(T.Q4_K, N, K, rng)
    x = rng.standard_normal((1, K)).astype(np.float32)
    wref = dequantize(raw, T.Q4_K).reshape(N, K).astype(np.float64)
    err = np.abs(linear.matmul(linear.pack(raw, T.Q4_K, K, "numba"), x) - x @ wref.T)
    assert np.all(err <= 1e-5 * (np.abs(x) @ np.abs(wref).T) + int8_error_bound(wref, x, 32, 32767))
    assert err.max() < int8_error_bound(wref, x).min() / 16


@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime is not installed")
def test_threads_rebuild_ort_sessions():
    rng = np.random.default_rng(7)
    raw = random_raw(T.Q5_0, N, K, rng)
    old = linear.get_threads()
    try:
        linear.set_threads(2)
        w = linear.pack(raw, T.Q5_0, K, "onnxruntime")
        assert w.data.threads == 2
        linear.set_threads(1)
        x = rng.standard_normal((2, K)).astype(np.float32)
        _check(w, dequantize(raw, T.Q5_0).reshape(N, K), x, linear.matmul(w, x))
        assert w.data.threads == 1
        assert all(c.released for c in w.data.chunks)  # the originals were handed back
    finally:
        linear.set_threads(old)


def test_ort_row_chunks(monkeypatch):
    """A matrix larger than one session's chunk is built from several and reassembled in order."""
    monkeypatch.setattr(qmatmul_ort, "CHUNK_BYTES", 1)  # -> 256-row chunks
    rng = np.random.default_rng(8)
    raw = random_raw(T.Q4_K, 600, 256, rng)
    w = linear.pack(raw, T.Q4_K, 256, "onnxruntime")
    assert [(c.n0, c.n1) for c in w.data.chunks] == [(0, 256), (256, 512), (512, 600)]
    x = rng.standard_normal((3, 256)).astype(np.float32)
    _check(w, dequantize(raw, T.Q4_K).reshape(600, 256), x, linear.matmul(w, x))


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("EDGELLM_BACKEND", "numpy")
    assert linear.default_backend() == "numpy"
    assert linear.describe_backend().startswith("numpy")
    monkeypatch.setenv("EDGELLM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="EDGELLM_BACKEND"):
        linear.default_backend()
    monkeypatch.delenv("EDGELLM_BACKEND")
    assert linear.default_backend() == "numba"  # the fidelity default (see linear.default_backend)


def test_bad_inputs():
    raw = random_raw(T.Q8_0, 4, 64, np.random.default_rng(9))
    with pytest.raises(ValueError, match="block size"):
        linear.pack(raw, T.Q8_0, 48)
    w = linear.pack(raw, T.Q8_0, 64, "numpy")
    with pytest.raises(ValueError, match="expected"):
        linear.matmul(w, np.zeros((1, 32), np.float32))
    with pytest.raises(IndexError):
        linear.matvec_rows(w, np.zeros(64, np.float32), np.array([4]))


def test_dequantize_split_roundtrip():
    raw = random_raw(T.Q6_K, 8, 256, np.random.default_rng(10))
    s = split(raw, T.Q6_K, 256)
    assert s.q.dtype == np.int8 and s.scale.shape == (8, 16) and s.mins is None
    assert np.array_equal(dequantize_split(s), dequantize(raw, T.Q6_K).reshape(8, 256))
