"""The kernel table: which ops and which quantized products a model runs, chosen once.

    k = select("numba", threads="auto")       # or "numpy" (the exact path); None: EDGELLM_BACKEND or numba
    f = k.make_linear(raw, GGMLType.Q4_K, K)  # raw uint8 (N, row_bytes) -> callable x (T, K) -> (T, N)
    g = k.make_group([f_q, f_k, f_v])         # callable x -> [y_q, y_k, y_v], one pass over x

| backend | products                                                          | other ops            |
|---------|-------------------------------------------------------------------|----------------------|
| numba   | qmatmul: 15-bit activations as int8 parts on the CPU's dot-       | ops (numba)          |
|         | product instruction (simd), any batch, straight from GGUF bytes   |                      |
| numpy   | the exact path: dequantized float32 tiles + BLAS (qmatmul_ref)    | ops_ref (numpy)      |

numba is the default; numpy is the accuracy oracle and the fallback where numba cannot run. The
numba products read the weights in place (resident weights are their file pages, streamed ones
their buffers); the numpy ones keep a float32 split of each weight (~1.3 bytes a weight).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..quant.ggml_types import GGMLType
from .threads import allowed_cpus, set_blas_threads
from .qmatmul_ref import SPLIT_BLOCK, check_raw, dequantize_rows, matmul_split, split

BACKENDS = ("numba", "numpy")


def _numba_ok() -> bool:
    try:
        from . import qmatmul  # noqa: F401
        return True
    except ImportError:  # pragma: no cover - phones without numba
        return False


def available_backends() -> list[str]:
    return [b for b in BACKENDS if b != "numba" or _numba_ok()]


def default_backend() -> str:
    """EDGELLM_BACKEND if set (ValueError if unknown or unavailable), else numba where it runs."""
    want = os.environ.get("EDGELLM_BACKEND", "").strip().lower()
    return check_backend(want) if want else available_backends()[0]


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name not in available_backends():
        raise ValueError(f"backend {name!r} is not available here (have {', '.join(available_backends())})")
    return name


@dataclass(frozen=True)
class Kernels:
    backend: str
    ops: object  # the ops module: rms_norm, rope, attention, gates, embedding_rows
    make_linear: Callable[[np.ndarray, GGMLType, int], Callable[[np.ndarray], np.ndarray]]
    make_group: Callable[[list], Callable[[np.ndarray], list]]
    describe: str
    rest: Callable[[], None] = lambda: None  # after a forward pass: worker threads sleep now


class _Fast:
    """A GGUF weight for qmatmul, callable on x (T, K)."""

    __slots__ = ("w", "product")

    def __init__(self, w, product):
        self.w, self.product = w, product

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.product(x)[0]


def _numba_kernels(threads) -> Kernels:
    from . import ops, qmatmul, threads as pool

    qmatmul.set_threads(threads)

    def make_linear(raw, t, k):
        w = qmatmul.Weight(check_raw(raw, t, k), GGMLType(t), k)
        return _Fast(w, qmatmul.Product([w]))

    def make_group(fns):
        if len(fns) > 1 and all(isinstance(f, _Fast) for f in fns):
            return qmatmul.Product([f.w for f in fns])
        return lambda x: [f(x) for f in fns]

    return Kernels("numba", ops, make_linear, make_group, f"numba: {qmatmul.describe()}; ops: numba", pool.rest)


def _exact(raw, t, k):
    """The exact path for one weight: float32 split tiles (or a dequantized matrix) and BLAS."""
    t = GGMLType(t)
    rows = check_raw(raw, t, k)
    if t in SPLIT_BLOCK:
        s = split(rows, t, k)
        return lambda x: matmul_split(s, np.ascontiguousarray(x, np.float32))
    w = np.ascontiguousarray(dequantize_rows(rows, t, k))
    return lambda x: np.ascontiguousarray(x, np.float32) @ w.T


def _numpy_kernels(threads) -> Kernels:
    from . import ops_ref

    set_blas_threads(allowed_cpus() if threads == "auto" else threads)
    return Kernels("numpy", ops_ref, _exact, lambda fns: (lambda x: [f(x) for f in fns]),
                   "numpy: the exact path (dequantized float32 tiles + BLAS); ops: numpy")


def select(backend: str | None = None, threads: int | str = "auto") -> Kernels:
    """The kernel table for a backend (None: default_backend()); ValueError names a bad one."""
    name = check_backend(backend) if backend else default_backend()
    return _numba_kernels(threads) if name == "numba" else _numpy_kernels(threads)
