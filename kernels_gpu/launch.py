"""Devices that run kernels.cu: `CudaDevice` (CuPy, compiled by NVRTC) and `MirrorDevice` (the
same calls on mirror.py's numpy mirrors, for machines without a GPU: tests run whole models on it).

    dev = open_device("cuda")               # DeviceError with one line when there is no GPU
    w = dev.weight(raw, GGMLType.Q4_K)      # raw (N, row_bytes) uint8 -> a Weight on the device
    xq = dev.quantize_x(x)                  # x (T, K) f32 device array
    y = dev.gemv(w, xq)                     # (T, N), T <= MAX_T; dev.matmul(w, x) for any T

Both devices take and return their own arrays (`dev.xp` is cupy or numpy); `dev.asarray` and
`dev.host` move data across. CuPy is optional (`pip install -e '.[gpu]'`): nothing imports it
until a CudaDevice opens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from ..quant.ggml_types import GGMLType
from . import mirror
from .mirror import ATT_CHUNK, ATT_GROUP, MAX_T, QK, TYPES

SOURCE = Path(__file__).with_name("kernels.cu")
NVRTC_OPTIONS = ("-fmad=false",)  # no multiply-add contraction: the mirrors' float order
DEQUANT_BYTES = 32 << 20  # float32 rows dequantized at a time for a prefill product
_NAME = {GGMLType.Q4_K: "q4_k", GGMLType.Q6_K: "q6_k", GGMLType.Q8_0: "q8_0", GGMLType.Q5_0: "q5_0"}


class DeviceError(EdgeLLMError):
    """No usable GPU, or what the GPU path does not do: one line naming the cause."""


@dataclass
class Weight:
    """A matrix on a device: raw GGUF rows (fast types) or float32 (every other type, dequantized
    by quant/ on the host)."""

    data: object  # (N, row_bytes) uint8, or (N, K) float32
    ggml_type: GGMLType
    n: int
    k: int

    @property
    def fast(self) -> bool:
        return self.ggml_type in TYPES

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def theta_scale(theta_base: float, n_rot: int) -> np.float32:
    """ggml's theta_scale = powf(base, -2.0f / n_dims), rounded as the CPU ops round it."""
    return np.float32(np.float64(theta_base) ** np.float64(np.float32(-2.0) / np.float32(n_rot)))


class _Device:
    xp = np
    name = "?"

    def asarray(self, a, dtype=np.float32):
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def host(self, a) -> np.ndarray:
        return np.asarray(a)

    def weight(self, raw: np.ndarray, ggml_type: GGMLType) -> Weight:
        """raw (N, row_bytes) uint8 of `ggml_type` -> a Weight on this device."""
        from ..quant.formats import dequantize

        t = GGMLType(ggml_type)
        n = raw.shape[0]
        if t in TYPES:
            k = raw.shape[1] // mirror.BLOCK_BYTES[t] * mirror.ITEMS_PER_BLOCK[t] * QK
            return Weight(self._upload_raw(raw), t, n, k)
        w = dequantize(np.ascontiguousarray(raw).reshape(-1), t).reshape(n, -1)
        return Weight(self.asarray(w), t, n, w.shape[1])

    def _upload_raw(self, raw):
        return self.xp.asarray(np.ascontiguousarray(raw))

    def products(self, ws: list[Weight], x) -> list:
        """x (T, K) f32 on the device -> [(T, w.n)]: GEMV on the quantized rows for T <= MAX_T
        (x quantized once for all of ws), else dequantized rows and a float32 GEMM."""
        x = self.asarray(x)
        if x.shape[0] <= MAX_T and all(w.fast for w in ws):
            xq = self.quantize_x(x)
            return [self.gemv(w, xq) for w in ws]
        return [self.matmul(w, x) for w in ws]

    def matmul(self, w: Weight, x):
        """x (T, K) @ W^T in float32, the rows dequantized DEQUANT_BYTES at a time."""
        if not w.fast:
            return x @ w.data.T
        y = self.xp.empty((x.shape[0], w.n), np.float32)
        step = max(1, DEQUANT_BYTES // (4 * w.k))
        for r in range(0, w.n, step):
            y[:, r : r + step] = x @ self.dequant(w, r, min(w.n, r + step)).T
        return y


class MirrorDevice(_Device):
    """kernels.cu's calls on mirror.py: numpy arrays, the kernels' arithmetic."""

    name = "mirror (numpy)"

    def quantize_x(self, x):
        return mirror.quantize_x(x)

    def gemv(self, w: Weight, xq):
        return mirror.gemv(w.data, w.ggml_type, *xq)

    def dequant(self, w: Weight, r0: int, r1: int):
        return mirror.dequant(w.data[r0:r1], w.ggml_type)

    def rms_norm(self, x, weight, eps):
        return mirror.rms_norm(x, weight, eps)

    def rope(self, x, positions, theta_base, neox, n_rot, freq_scale, pos_dev=None):
        return mirror.rope(x, positions, theta_scale(theta_base, n_rot), freq_scale, n_rot, neox)

    def silu_gate(self, gate, up):
        return mirror.silu_gate(gate, up)

    def gelu_tanh_gate(self, gate, up):
        return mirror.gelu_tanh_gate(gate, up)

    def attention(self, q, kc, vc, positions, window, scale, pos_dev=None):
        return mirror.attention(q, kc, vc, positions, window, scale)

    def memory(self) -> dict:
        return {}


class CudaDevice(_Device):
    """kernels.cu compiled by NVRTC through CuPy, on the current CUDA device."""

    def __init__(self, device_id: int = 0):
        try:
            import cupy
        except ImportError as e:
            raise DeviceError(f"the cuda backend needs CuPy: pip install -e '.[gpu]' ({e})") from None
        self.xp = cupy
        try:
            n = cupy.cuda.runtime.getDeviceCount()
            if n == 0:
                raise DeviceError("no CUDA device found")
            self.dev = cupy.cuda.Device(device_id)
            self.dev.use()
            props = cupy.cuda.runtime.getDeviceProperties(device_id)
            self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            self.module = cupy.RawModule(code=SOURCE.read_text(), options=NVRTC_OPTIONS)
            self.module.compile()
        except DeviceError:
            raise
        except Exception as e:  # cupy's CUDARuntimeError, CompileException, a missing driver...
            raise DeviceError(f"no usable CUDA device: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        self._fn = {}

    def _k(self, name):
        f = self._fn.get(name)
        if f is None:
            f = self._fn[name] = self.module.get_function(name)
        return f

    def host(self, a) -> np.ndarray:
        return self.xp.asnumpy(a) if isinstance(a, self.xp.ndarray) else np.asarray(a)

    def quantize_x(self, x):
        cp = self.xp
        T, K = x.shape
        nb = T * K // QK
        xh, xl = cp.empty((T, K), cp.int8), cp.empty((T, K), cp.int8)
        xd, xs = cp.empty((T, K // QK), cp.float32), cp.empty((T, K // QK), cp.int32)
        self._k("quantize_x")(((nb + 7) // 8,), (256,), (x, np.int32(nb), xh, xl, xd, xs))
        return xh, xl, xd, xs

    def gemv(self, w: Weight, xq):
        xh, xl, xd, xs = xq
        T, K = xh.shape
        y = self.xp.empty((T, w.n), self.xp.float32)
        fn = self._k("gemv_" + _NAME[w.ggml_type])
        fn(((w.n + 3) // 4,), (128,), (w.data, np.int32(w.n), np.int32(w.data.shape[1]), np.int32(K // QK),
                                       np.int32(T), xh, xl, xd, xs, y))
        return y

    def dequant(self, w: Weight, r0: int, r1: int):
        n, items = r1 - r0, w.k // QK
        out = self.xp.empty((n, w.k), self.xp.float32)
        total = n * items
        self._k("dequant_" + _NAME[w.ggml_type])(((total + 255) // 256,), (256,),
                                                  (w.data[r0:r1], np.int32(n), np.int32(w.data.shape[1]),
                                                   np.int32(items), out))
        return out

    def rms_norm(self, x, weight, eps):
        x = self.asarray(x)
        D = x.shape[-1]
        y = self.xp.empty_like(x)
        self._k("rms_norm")((x.size // D,), (mirror.NORM_THREADS,), (x, weight, np.int32(D), np.float32(eps), y))
        return y

    def rope(self, x, positions, theta_base, neox, n_rot, freq_scale, pos_dev=None):
        """pos_dev: positions as an int32 device array already (DeviceOps caches them per pass)."""
        x = self.asarray(x)
        T, H, D = x.shape
        y = self.xp.empty_like(x)
        total = T * H * (D // 2)
        pos = self.asarray(positions, np.int32) if pos_dev is None else pos_dev
        self._k("rope")(((total + 255) // 256,), (256,),
                        (x, pos, np.int32(T), np.int32(H), np.int32(D), np.int32(n_rot),
                         theta_scale(theta_base, n_rot), np.float32(freq_scale), np.int32(bool(neox)), y))
        return y

    def _gate(self, name, gate, up):
        out = self.xp.empty_like(gate)
        n = gate.size
        self._k(name)(((n + 255) // 256,), (256,), (gate, up, np.int64(n), out))
        return out

    def silu_gate(self, gate, up):
        return self._gate("silu_gate", self.asarray(gate), self.asarray(up))

    def gelu_tanh_gate(self, gate, up):
        return self._gate("gelu_tanh_gate", self.asarray(gate), self.asarray(up))

    def attention(self, q, kc, vc, positions, window, scale, pos_dev=None):
        cp = self.xp
        q = self.asarray(q)
        T, H, D = q.shape
        n_rows, n_kv, Dv = vc.shape
        pos = np.asarray(positions, np.int64)
        ns = int(pos.max()) // ATT_CHUNK + 1
        acc = cp.empty((T, H, ns, Dv), cp.float32)
        ml = cp.empty((T, H, ns, 2), cp.float32)
        pd = self.asarray(pos, np.int32) if pos_dev is None else pos_dev
        g = max(d for d in range(1, ATT_GROUP + 1) if (H // n_kv) % d == 0)  # query heads per block
        self._k("attention_split")((ns, H // g, T), (128,),
                                   (q, kc, vc, pd, np.int32(H), np.int32(n_kv), np.int32(D), np.int32(Dv),
                                    np.int32(n_rows), np.int32(window), np.float32(scale), np.int32(g), acc, ml))
        out = cp.empty((T, H, Dv), cp.float32)
        self._k("attention_combine")((H, T), (min(Dv, 256),), (acc, ml, np.int32(ns), np.int32(Dv), out))
        return out

    def memory(self) -> dict:
        free, total = self.xp.cuda.runtime.memGetInfo()
        pool = self.xp.get_default_memory_pool()
        return {"device_total_bytes": int(total), "device_free_bytes": int(free),
                "pool_used_bytes": int(pool.used_bytes()), "pool_total_bytes": int(pool.total_bytes())}


def open_device(name: str = "cuda") -> _Device:
    """"cuda": the GPU (DeviceError when there is none); "cuda-mirror": the numpy mirrors."""
    if name == "cuda-mirror":
        return MirrorDevice()
    return CudaDevice()
