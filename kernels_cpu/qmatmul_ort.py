"""onnxruntime backend: quantized products as com.microsoft MatMulNBits with int8 activations.

Mapping of the split fields (`qmatmul_ref`, w = scale * q - mins), exact for every type:

| type | MatMulNBits               | stored B        | zero point       | mins                         |
|------|---------------------------|-----------------|------------------|------------------------------|
| Q4_K | bits 4, block 32          | q (0..15)       | 0 (uint8 input)  | + (x summed per block) @ -mins.T |
| Q5_0 | bits 8, block 32          | q + 128         | 128 (default)    | -                            |
| Q8_0 | bits 8, block 32          | q + 128         | 128 (default)    | -                            |
| Q6_K | bits 8, block 16          | q + 128         | 128 (default)    | -                            |

onnxruntime computes (B - zero_point) * scale. It also accepts float zero points, which would fold
Q4_K's mins in, but (1.31) only on a dequantize-the-whole-matrix path that is ~100x slower, so the
mins go through a small float MatMul on the block sums of x instead; a sub-block whose scale is 0
is then just q * 0 - min, with no special case. accuracy_level 4 quantizes x to int8 per block
(error bounded as `qmatmul_ref.int8_error_bound`).

Memory: onnxruntime prepacks B, scales and zero points into its own buffer at session creation
and never reads the originals again, so they live in anonymous maps that are returned to the OS
(madvise DONTNEED) once the session exists; a probe product then checks the session still matches
the reference, and keeps the originals if not. Large matrices are built in row chunks so the
transient copy stays small. Resident, measured on the real models: Q4_K 8.2 bits a weight (GGUF
4.5), Q5_0 11.1 (5.5), Q8_0 11.0 (8.5), Q6_K 14.0 (6.56): the price of 8-bit storage for 5- and
6-bit types and of ~12 bytes of float metadata per block.
"""
from __future__ import annotations

import mmap

import numpy as np

from . import onnx_proto as P
from ..quant.ggml_types import GGMLType
from .qmatmul_ref import SPLIT_BLOCK, Split, dequantize_split, int8_error_bound, split

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - onnxruntime is a declared dependency, phones may lack it
    ort = None

CHUNK_BYTES = 48 << 20  # onnxruntime-format bytes per session (bounds the transient copy)
ACCURACY_LEVEL = 4  # int8 activations
# Matrices up to this many weights run on one thread: waking a second costs more than it saves
# (median us, 1 vs 2 threads: 256x640 7 vs 12, 1024x640 15 vs 24, 896x896 21 vs 30, 2048x640 50
# vs 50; 4864x896 229 vs 170).
ONE_THREAD_WEIGHTS = 1 << 21


def available() -> bool:
    return ort is not None


class _Anon:
    """A numpy array in its own anonymous memory map, so its pages can be handed back."""

    def __init__(self, shape, dtype):
        n = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.map = mmap.mmap(-1, n)
        self.array = np.frombuffer(self.map, dtype, count=int(np.prod(shape))).reshape(shape)

    def release(self) -> None:
        self.map.madvise(mmap.MADV_DONTNEED)


def _pack4(q: np.ndarray) -> np.ndarray:
    """uint8 (..., 2m) values 0..15 -> uint8 (..., m): element 2j in the low nibble of byte j."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def ort_arrays(s: Split) -> dict[str, np.ndarray]:
    """Split fields of N rows -> MatMulNBits initializers (see the table above):
    B uint8 (N, nb, bs*bits/8), S float32 (N*nb,), and for Q4_K Z uint8 (N, ceil(nb/2)) of zeros
    and M float32 (nb, N) = -mins.T."""
    n, k = s.q.shape
    nb = k // s.bs
    q = s.q.reshape(n, nb, s.bs).view(np.uint8)
    out = {}
    if s.mins is not None:
        out["B"] = _pack4(q)
        out["Z"] = np.zeros((n, (nb + 1) // 2), np.uint8)
    else:
        out["B"] = q + np.uint8(128)  # wraps: int8 q + 128 -> 0..255
    out["S"] = np.ascontiguousarray(s.scale.reshape(-1))
    if s.mins is not None:
        out["M"] = np.ascontiguousarray(-s.mins.T)
    return out


def _session(onnx_bytes: bytes, names: list[str], arrays: list[np.ndarray], threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Idle pool threads that spin steal the core from the next op (and from other processes on a
    # shared 2-core machine): measured 2x slower per call than sleeping ones under load.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_cpu_mem_arena = False  # prepacked buffers come back to the OS when a session dies
    so.log_severity_level = 3
    if names:
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])


class _Chunk:
    """Rows [n0, n1) of a matrix as one onnxruntime session; `s` holds just those rows."""

    def __init__(self, s: Split, n0: int, n1: int, threads: int):
        self.n0, self.n1 = n0, n1
        self._build(s, threads, release=True)
        if not self._probe(s):  # this build reads the originals at run time after all: keep them
            self._build(s, threads, release=False)

    def _build(self, s: Split, threads: int, release: bool) -> None:
        nr, k = s.q.shape
        bs, nb = s.bs, k // s.bs
        bits = 4 if s.mins is not None else 8
        maps = {}
        for name, a in ort_arrays(s).items():
            maps[name] = _Anon(a.shape, a.dtype)
            maps[name].array[:] = a
        names = list(maps)
        arrays = [maps[m].array for m in names]
        inits = [P.external_tensor(m, maps[m].array) for m in names]
        attrs = [P.attr_int("K", k), P.attr_int("N", nr), P.attr_int("bits", bits),
                 P.attr_int("block_size", bs), P.attr_int("accuracy_level", ACCURACY_LEVEL)]
        mm_inputs = ["A", "B", "S"] + (["Z"] if "Z" in maps else [])
        if s.mins is None:
            nodes = [P.node("MatMulNBits", mm_inputs, ["Y"], attrs, "com.microsoft")]
        else:
            inits += [P.tensor("shape", np.array([0, nb, bs], np.int64)), P.tensor("axes", np.array([2], np.int64))]
            nodes = [P.node("MatMulNBits", mm_inputs, ["Y0"], attrs, "com.microsoft"),
                     P.node("Reshape", ["A", "shape"], ["A3"]),  # (T, nb, bs)
                     P.node("ReduceSum", ["A3", "axes"], ["XS"], [P.attr_int("keepdims", 0)]),  # (T, nb)
                     P.node("MatMul", ["XS", "M"], ["C"]),  # (T, nr)
                     P.node("Add", ["Y0", "C"], ["Y"])]
        onnx_bytes = P.model(nodes, inits, [P.value_info("A", np.float32, ["T", k])],
                             [P.value_info("Y", np.float32, ["T", nr])])
        self.sess = _session(onnx_bytes, names, arrays, threads)
        self._keep = arrays  # the OrtValues point into these: they must outlive the session
        self.released = release
        # onnxruntime's prepacked copy: the quants plus 12 bytes a block (measured: Q4_K 8.2 bits a
        # weight with the mins, Q5_0 / Q8_0 11.1, Q6_K 14.0); the mins (a plain MatMul reads them) stay
        self.resident_bytes = maps["B"].array.nbytes + 3 * maps["S"].array.nbytes
        kept = ["M"] if release and "M" in maps else ([] if release else names)
        self.resident_bytes += sum(maps[m].array.nbytes for m in kept)
        if release:
            for name in ("B", "S", "Z"):
                if name in maps:
                    maps[name].release()

    def _probe(self, s: Split) -> bool:
        """Does the session compute this chunk's product (8 rows, one random x) within the bound?"""
        k = s.q.shape[1]
        x = np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)
        y = self.sess.run(None, {"A": x})[0]
        rows = np.unique(np.linspace(0, s.q.shape[0] - 1, 8).astype(np.int64))
        w = dequantize_split(s, rows)  # (8, K)
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        bound = 2 * int8_error_bound(w, x, s.bs) + 1e-5 * np.abs(ref) + 1e-30
        return bool(np.all(np.abs(y[:, rows] - ref) <= bound))


class OrtMatmul:
    """A weight matrix (N, K) as onnxruntime sessions over row chunks; call with x (T, K).
    `rows` is uint8 (N, row_bytes) of a type in SPLIT_BLOCK; it is decoded a chunk at a time."""

    def __init__(self, rows: np.ndarray, ggml_type: GGMLType, k: int, threads: int):
        n = rows.shape[0]
        bs = SPLIT_BLOCK[ggml_type]
        bytes_per_row = k * (0.5 if ggml_type == GGMLType.Q4_K else 1) + 4 * k // bs
        per = max(256, int(CHUNK_BYTES // bytes_per_row) // 256 * 256)
        self.n, self.k, self.threads = n, k, threads  # threads: the count asked for (set_threads)
        use = 1 if n * k <= ONE_THREAD_WEIGHTS else threads
        self.chunks = []
        for n0 in range(0, n, per):
            n1 = min(n, n0 + per)
            self.chunks.append(_Chunk(split(rows[n0:n1], ggml_type, k), n0, n1, use))

    def __call__(self, x: np.ndarray) -> np.ndarray:  # x (T, K) f32 -> (T, N) f32
        if len(self.chunks) == 1:
            return self.chunks[0].sess.run(None, {"A": x})[0]
        out = np.empty((x.shape[0], self.n), np.float32)
        for c in self.chunks:
            out[:, c.n0:c.n1] = c.sess.run(None, {"A": x})[0]
        return out

    def resident_bytes(self) -> int:
        return sum(c.resident_bytes for c in self.chunks)
