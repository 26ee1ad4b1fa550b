"""Quantized linear layers: pack a GGUF weight once, then multiply by it.

    w = pack(raw, GGMLType.Q5_0, k)       # raw uint8 (N, row_bytes): N rows of K elements
    y = matmul(w, x)                      # x (T, K) float32 -> (T, N) float32, any T
    y = matvec_rows(w, x, rows)           # x (K,), rows int64 (R,) -> (R,): only those outputs

Backends (one per packed weight, chosen at pack time; `EDGELLM_BACKEND` overrides the default):

| backend     | Q4_K / Q5_0 / Q6_K / Q8_0                                   | F32, F16, other types |
|-------------|-------------------------------------------------------------|-----------------------|
| onnxruntime | MatMulNBits, int8 activations per block (qmatmul_ort.py)    | float32 matrix, BLAS  |
| numba       | int16 activations for T <= 8, else float tiles + BLAS       | float32 matrix, BLAS  |
| numpy       | float tiles (dequantized rows) + BLAS, exact float32        | float32 matrix, BLAS  |

The default is numba (int16 decode activations: llama.cpp's reference tokens, tests/test_models.py),
then onnxruntime (fastest at every T measured, bench/kernels.py, but int8 activations), then
numpy. Results agree with the float64 reference within `tolerance(w, x)`.

Accuracy: int8 activations cost about what they cost llama.cpp, which rounds them the same way.
Over the 64 teacher-forced steps of shared/reference, the top-5 logits (centred) differ from exact
float32 products by median 0.13 / max 0.59 with onnxruntime vs 0.16 / 0.81 for llama.cpp itself
(gemma3-270m), 0.07 / 0.25 vs 0.07 / 0.23 (qwen 0.5B). Two such results can pick different tokens
where the top-2 gap is below ~0.3; numba (int16 activations) and numpy (float) add no error of note.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..quant.ggml_types import GGMLType
from .qmatmul_ref import (SPLIT_BLOCK, Split, check_raw, dequantize_rows, dequantize_split, int8_error_bound,
                          matmul_split, split)

try:
    from . import qmatmul_numba
except ImportError:  # pragma: no cover - phones without numba
    qmatmul_numba = None

F32 = np.float32
BACKENDS = ("onnxruntime", "numba", "numpy")

_state = {"threads": os.cpu_count() or 1}


@dataclass
class PackedWeight:
    """A weight matrix (N, K) ready for products; `data` is the backend's own representation."""

    ggml_type: GGMLType
    n: int  # output rows
    k: int  # input columns
    backend: str  # "onnxruntime" | "numba" | "numpy" | "float" (dequantized float32 matrix)
    data: Any  # qmatmul_ort.OrtMatmul | qmatmul_numba.Packed | Split (numpy) | float32 (N, K)
    raw: np.ndarray | None  # uint8 (N, row_bytes), kept (a view, no copy) by onnxruntime for matvec_rows

    @property
    def nbytes(self) -> int:
        """Bytes held for this weight beyond `raw` (which is meant to be a view of a mapped file)."""
        if isinstance(self.data, np.ndarray):
            return 0 if self.data.base is not None and self.raw is not None else self.data.nbytes
        if isinstance(self.data, Split):
            return sum(a.nbytes for a in self.data if isinstance(a, np.ndarray))
        if self.backend == "numba":
            return self.data.nbytes
        return self.data.resident_bytes()


# ---- configuration ------------------------------------------------------------------------------

def _ort():
    """qmatmul_ort, imported on first use: onnxruntime costs ~40 MB of resident memory and a
    fraction of a second, which the default backend (numba) does not need."""
    from . import qmatmul_ort
    return qmatmul_ort


def _ort_available() -> bool:
    """Whether onnxruntime is installed, without importing it."""
    return importlib.util.find_spec("onnxruntime") is not None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if b != "onnxruntime" or _ort_available()
            if b != "numba" or qmatmul_numba is not None]


def default_backend() -> str:
    """EDGELLM_BACKEND if set (ValueError if unknown or unavailable), else the fastest available."""
    want = os.environ.get("EDGELLM_BACKEND", "").strip().lower()
    have = available_backends()
    if want:
        if want not in BACKENDS:
            raise ValueError(f"EDGELLM_BACKEND={want!r} is not one of {', '.join(BACKENDS)}")
        if want not in have:
            raise ValueError(f"EDGELLM_BACKEND={want!r} is not available here (have {', '.join(have)})")
        return want
    # numba first: its int16 decode activations and exact-float prefill keep greedy outputs on
    # llama.cpp's reference tokens (tests/test_models.py); onnxruntime's int8 activations are
    # faster but move logits by as much as llama.cpp's own int8 path does (up to ~0.6 on gemma)
    return next(b for b in ("numba", "onnxruntime", "numpy") if b in have)


def set_threads(n: int) -> None:
    """Threads for every backend: numba's pool, BLAS, and onnxruntime sessions (weights packed with
    another count are rebuilt from their raw bytes on their next product)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, not {n}")
    _state["threads"] = int(n)
    if qmatmul_numba is not None:
        qmatmul_numba.set_threads(n)
    _set_blas_threads(n)


def get_threads() -> int:
    return _state["threads"]


def _set_blas_threads(n: int) -> None:
    """numpy's bundled OpenBLAS, found among the loaded libraries; silently nothing elsewhere.
    Called only when the count changes (setting OpenBLAS's count (re)starts its worker threads)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and line.rstrip().endswith(".so")}
    except OSError:
        libs = set()
    for path in libs:
        lib = ctypes.CDLL(path)
        for suffix in ("64_", ""):
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None) or getattr(lib, f"openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None) or getattr(lib, f"openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                if get() != n:
                    set_(ctypes.c_int(n))
                break


def describe_backend(backend: str | None = None) -> str:
    """One line naming the backend (`backend`, or the default) and what runs where."""
    b = backend or default_backend()
    what = {"onnxruntime": f"onnxruntime {getattr(_ort().ort, '__version__', '?')} MatMulNBits "
                           "(int8 activations) for Q4_K/Q5_0/Q6_K/Q8_0",
            "numba": f"numba int16-activation kernels for T<={qmatmul_numba.SMALL_T}, dequantized tiles + BLAS above",
            "numpy": "numpy dequantized tiles + BLAS"}[b]
    return f"{b}: {what}; F32/F16 and other types via numpy BLAS; {get_threads()} threads"


# ---- packing ------------------------------------------------------------------------------------

def pack(raw: np.ndarray, ggml_type: GGMLType | int, k: int, backend: str | None = None) -> PackedWeight:
    """GGUF rows uint8 (N, row_bytes) -> PackedWeight. Done once at load time.

    onnxruntime keeps a reference to `raw` (for matvec_rows and for rebuilding when the thread count
    changes) but no copy of it: pass a view of the memory-mapped file."""
    w = _pack(raw, ggml_type, k, backend)
    _trim_heap()
    return w


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS. Packing frees tens of MB of temporaries; glibc
    raises its mmap threshold after such frees, so the next ones land on the heap and stay resident
    (measured: a 35M-weight Q4_K matrix held 116 MB instead of 51 MB without this)."""
    trim = _LIBC_TRIM[0]
    if trim is None:
        try:
            trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            trim = False
        _LIBC_TRIM[0] = trim
    if trim:
        trim(0)


_LIBC_TRIM: list = [None]


def _pack(raw: np.ndarray, ggml_type: GGMLType | int, k: int, backend: str | None) -> PackedWeight:
    t = GGMLType(ggml_type)
    rows = check_raw(raw, t, k)
    n = rows.shape[0]
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if t not in SPLIT_BLOCK:
        return PackedWeight(t, n, k, "float", np.ascontiguousarray(dequantize_rows(rows, t, k)), rows)
    if backend == "onnxruntime":
        return PackedWeight(t, n, k, backend, _ort().OrtMatmul(rows, t, k, get_threads()), rows)
    if backend == "numba":
        return PackedWeight(t, n, k, backend, qmatmul_numba.pack(rows, t, k), None)
    return PackedWeight(t, n, k, backend, split(rows, t, k), None)


# ---- products -----------------------------------------------------------------------------------

def matmul(w: PackedWeight, x: np.ndarray) -> np.ndarray:
    """x float32 (T, K) -> x @ W.T float32 (T, N)."""
    x = np.ascontiguousarray(x, dtype=F32)
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"matmul: x has shape {x.shape}, expected (T, {w.k})")
    if w.backend == "float":
        return x @ w.data.T
    if w.backend == "onnxruntime":
        if w.data.threads != get_threads():
            w.data = _ort().OrtMatmul(w.raw, w.ggml_type, w.k, get_threads())
        return w.data(x)
    if w.backend == "numba":
        return qmatmul_numba.matmul(w.data, x)
    return matmul_split(w.data, x)


def matvec_rows(w: PackedWeight, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x float32 (K,), rows int64 (R,) -> (W @ x)[rows] float32 (R,)."""
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if x.shape[0] != w.k:
        raise ValueError(f"matvec_rows: x has {x.shape[0]} elements, expected {w.k}")
    if rows.size and (rows.min() < 0 or rows.max() >= w.n):
        raise IndexError(f"matvec_rows: rows must lie in [0, {w.n})")
    if w.backend == "float":
        return w.data[rows] @ x
    if w.backend == "onnxruntime":
        return dequantize_rows(w.raw[rows], w.ggml_type, w.k) @ x
    if w.backend == "numba":
        return qmatmul_numba.matvec_rows(w.data, x, rows)
    return dequantize_split(w.data, rows) @ x


def tolerance(w: PackedWeight, x: np.ndarray, w_ref: np.ndarray) -> np.ndarray:
    """Allowed |matmul(w, x) - reference| per output, float64 (T, N).

    onnxruntime rounds x to int8 per scale block, numba (T <= SMALL_T) to int16: the error is then
    bounded by `int8_error_bound` (sum_b amax_b(x) / (2 qmax) * |w_b|_1). Every backend also
    accumulates in float32: 1e-5 * |x| . |w| covers that for K up to ~10^5."""
    wf = np.asarray(w_ref, np.float64)  # (N, K): the dequantized weights
    x = np.asarray(x, np.float64)
    t = 1e-5 * (np.abs(x) @ np.abs(wf).T) + 1e-30
    if w.ggml_type in SPLIT_BLOCK:
        if w.backend == "onnxruntime":
            t += int8_error_bound(wf, x, SPLIT_BLOCK[w.ggml_type], 127)
        elif w.backend == "numba" and x.shape[0] <= qmatmul_numba.SMALL_T:
            t += int8_error_bound(wf, x, SPLIT_BLOCK[w.ggml_type], qmatmul_numba.XQ_MAX)
    return t
