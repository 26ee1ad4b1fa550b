"""The sparse FFN product (sparse.py) as a callable, run by qmatmul's threads.

    f = SparseFFN(gate, up, down_t(raw_down, GGMLType.Q6_K, F), "silu")
    y, n_active = f(x, thr)        # x (T, K) f32 -> y (T, E) f32; (token, neuron) pairs computed
"""
from __future__ import annotations

import numpy as np

from . import sparse, threads
from .qmatmul import BLOCK, FAST, Weight, _A_MODE, _A_SD, kernel, quantize_x
from .sparse import CHUNK, SD_LEN, DownT

F32 = np.float32


class SparseFFN:
    """gate, up: GGUF weights (F, K) of the fast types; down: the neuron-major DownT (E, F)."""

    def __init__(self, gate: Weight, up: Weight, down: DownT, act: str):
        if act not in sparse.ACTS:
            raise ValueError(f"sparse FFN: activation {act!r} is not one of {', '.join(sparse.ACTS)}")
        for w in (gate, up):
            if not w.fast or w.k % 32:
                raise ValueError(f"sparse FFN: gate/up of type {w.ggml_type.name} and K {w.k} have no row kernel")
        if gate.n != up.n or gate.k != up.k or down.f != gate.n or gate.n % CHUNK:
            raise ValueError(f"sparse FFN: gate {gate.n}x{gate.k}, up {up.n}x{up.k} and down {down.e}x{down.f} do not match")
        self.gate, self.up, self.down, self.act = gate, up, down, sparse.ACTS[act]
        self.k, self.f, self.e = gate.k, gate.n, down.e
        self._raw = [np.ascontiguousarray(w.raw).reshape(-1) for w in (gate, up)]  # kept: sd holds addresses
        self.n_chunks = self.f // CHUNK
        self.bytes = gate.raw.size + up.raw.size + down.nbytes

        sd = self._sd = np.zeros(SD_LEN, np.int64)  # the descriptor's fixed part; x, buffers per call
        for base, w, raw in ((sparse.S_GRAW, gate, self._raw[0]), (sparse.S_URAW, up, self._raw[1])):
            sd[base:base + 5] = (raw.ctypes.data, raw.size, FAST[w.ggml_type], w.raw.shape[1], w.k // BLOCK[w.ggml_type])
        sd[sparse.S_DCODE] = down.code
        for slot, a in zip((sparse.S_QN, sparse.S_QH, sparse.S_SC, sparse.S_MN, sparse.S_D, sparse.S_DMIN), down.arrays()):
            sd[slot] = a.ctypes.data
        sd[sparse.S_E], sd[sparse.S_F], sd[sparse.S_ACT] = self.e, self.f, self.act
        self._bufs: dict[int, tuple] = {}  # T -> _buffers

    def _buffers(self, t_n: int):
        """Per batch size: gate, up, h (3, T F), part (C, T, E), count (C,) and their addresses."""
        b = self._bufs.get(t_n)
        if b is None:
            if len(self._bufs) > 4:
                self._bufs.clear()
            arrays = (np.empty((3, t_n * self.f), F32), np.empty((self.n_chunks, t_n, self.e), F32),
                      np.zeros(self.n_chunks, np.int64))
            addr = [arrays[0][i].ctypes.data for i in range(3)] + [a.ctypes.data for a in arrays[1:]]
            b = self._bufs[t_n] = (*arrays, addr)
        return b

    def __call__(self, x: np.ndarray, thr: float, isa: int | None = None):
        """x (T, K) -> (y (T, E), the number of (token, neuron) pairs active)."""
        x = np.ascontiguousarray(x, dtype=F32)
        if x.ndim != 2 or x.shape[1] != self.k:
            raise ValueError(f"sparse FFN: x has shape {x.shape}, expected (T, {self.k})")
        t_n = x.shape[0]
        xq, xd, xs, x4n = quantize_x(x, isa=isa)
        _, part, count, addr = self._buffers(t_n)
        sd = self._sd  # (calls are sequential: the engine runs one pass at a time)
        sd[sparse.S_XQ:sparse.S_X4 + 1] = (xq.ctypes.data, t_n, xq.shape[1] // 2, xd.ctypes.data, xs.ctypes.data,
                                           x4n.ctypes.data)
        sd[sparse.S_THR] = int(np.float32(thr).view(np.int32))
        sd[sparse.S_GBUF:sparse.S_COUNT + 1] = addr
        task = kernel(isa)

        def write(board):
            board[_A_MODE], board[_A_SD] = 1, sd.ctypes.data

        def alone():
            board = threads.own_board()
            write(board)
            threads.begin(board, 1, self.n_chunks)
            task(board, 1)

        threads.run_kernel(task, write, self.n_chunks, self.bytes * t_n, alone)
        y = np.empty((t_n, self.e), F32)
        sparse.reduce_parts(part, y)
        return y, int(count.sum())
