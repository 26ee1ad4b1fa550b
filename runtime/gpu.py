"""The cuda backend composed for a model: kernels_gpu's device, ops and products; `--gpu-layers N`
(the first N blocks on the GPU, the rest and the head on the CPU kernels, llama.cpp's -ngl) and
`--gpu-memory-budget SIZE` (blocks that do not fit stream host -> device on a copy stream into
two slots, the next one copied while this one computes: offload/'s sliding window, on the GPU).

`cuda-mirror` runs all of it on the kernels' numpy mirrors (kernels_gpu/mirror.py): slow, for
checking the composition on a machine without a GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import EdgeLLMError
from ..kernels_gpu.launch import TYPES, DeviceError, Weight, open_device
from ..kernels_gpu.ops import DeviceOps
from ..offload.planner import fmt
from .kv_cache import make_caches
from .weights import Weights

BACKENDS = ("cuda", "cuda-mirror")
_LAYER = re.compile(r"^blk\.(\d+)\.")
_ALIGN = 256  # bytes: where each streamed matrix starts inside a slot


def workspace(cfg, n_batch: int) -> int:
    """Device bytes a pass needs besides weights and caches: one chunk of dequantized rows (prefill),
    ~6 live float32 activations of a batch at the FFN's width, a few rows of logits."""
    from ..kernels_gpu.launch import DEQUANT_BYTES

    return DEQUANT_BYTES + 6 * 4 * n_batch * max(cfg.n_ff, 4 * cfg.n_embd) + 8 * 4 * cfg.n_vocab


class GpuError(EdgeLLMError):
    pass


@dataclass(frozen=True)
class GpuKernels:
    backend: str
    ops: DeviceOps
    make_linear: Callable
    make_group: Callable
    describe: str
    dev: object
    rest: Callable[[], None] = lambda: None

    def host(self, a) -> np.ndarray:
        return self.dev.host(a)


class Linear:
    """A device matrix, callable on x (T, K) -> (T, N); `weight` is looked up per call (a streamed
    one lives in whichever slot its block was copied to)."""

    __slots__ = ("dev", "get")

    def __init__(self, dev, get: Callable[[], Weight]):
        self.dev, self.get = dev, get

    def __call__(self, x):
        return self.dev.products([self.get()], x)[0]


def open_kernels(name: str) -> GpuKernels:
    try:
        dev = open_device(name)
    except DeviceError as e:
        raise GpuError(f"--backend {name}: {e}") from None
    ops = DeviceOps(dev)

    def make_linear(raw, t, k):
        w = dev.weight(raw, t)
        return Linear(dev, lambda: w)

    def make_group(fns):
        return lambda x: dev.products([f.get() for f in fns], x)

    return GpuKernels(name, ops, make_linear, make_group, f"{name}: {dev.name}", dev)


def check(rcfg) -> None:
    """What the cuda backend does not combine with, as one line each."""
    for what, on in (("--memory-budget (it streams into RAM for the CPU kernels; use --gpu-memory-budget)",
                      rcfg.memory_budget is not None),
                     ("a cluster", bool(rcfg.cluster)), ("--sparsity", bool(rcfg.sparsity)),
                     (f"--cache-type {rcfg.cache_type} (the GPU cache is f16)", rcfg.cache_type != "f16")):
        if on:
            raise GpuError(f"--backend {rcfg.backend} does not run with {what}")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


class Placement:
    """Which side runs each block, its weights and its caches; installed on a model from outside.

    blocks 0..n_gpu-1 on the GPU (streamed ones among them copied in per pass), the rest on the
    CPU; embedding lookups follow block 0, the output head follows the last block."""

    def __init__(self, f, cfg, rcfg, gpu: GpuKernels, cpu=None, n_gpu: int | None = None, budget: int | None = None):
        self.f, self.cfg, self.gpu, self.cpu = f, cfg, gpu, cpu
        self.n_layer = cfg.n_layer
        self.n_gpu = self.n_layer if n_gpu is None else max(0, min(n_gpu, self.n_layer))
        if self.n_gpu < self.n_layer and cpu is None:
            raise GpuError("--gpu-layers below the layer count needs the CPU kernels")
        self.head_on_gpu = self.n_gpu == self.n_layer
        self.layer_ops = [gpu.ops if i < self.n_gpu else cpu.ops for i in range(self.n_layer)]
        self.stream = None
        if budget is not None:
            self.stream = SlotStream(self, budget, rcfg)
        self._gpu_store = Weights(f, gpu.make_linear)
        self._cpu_store = Weights(f, cpu.make_linear) if cpu is not None else None
        self._linear: dict[str, Callable] = {}
        self._group: dict[tuple, Callable] = {}
        self._vector: dict[str, object] = {}

    # --- the weight store interface (runtime/weights.py) ---

    def on_gpu(self, name: str) -> bool:
        i = layer_of(name)
        if i is None:
            return self.head_on_gpu if name != "token_embd.weight" or self._tied() else self.n_gpu > 0
        return i < self.n_gpu

    def _tied(self) -> bool:
        return "output.weight" not in self.f.tensors

    def has(self, name: str) -> bool:
        return name in self.f.tensors

    def linear(self, name: str):
        """A matrix on its side: resident ones from that side's weight store (runtime/weights.py),
        streamed ones read from whichever slot holds their block."""
        fn = self._linear.get(name)
        if fn is None:
            if self.stream is not None and self.stream.streamed(name):
                fn = Linear(self.gpu.dev, self.stream.getter(name))
            else:
                fn = (self._gpu_store if self.on_gpu(name) else self._cpu_store).linear(name)
            self._linear[name] = fn
        return fn

    def group(self, names: tuple[str, ...]):
        fn = self._group.get(names)
        if fn is None:
            fns = [self.linear(n) for n in names]
            side = self.gpu if self.on_gpu(names[0]) else self.cpu
            fn = self._group[names] = side.make_group(fns)
        return fn

    def vector(self, name: str):
        v = self._vector.get(name)
        if v is None:
            from ..quant.formats import dequantize

            t = self.f.info(name)
            v = np.ascontiguousarray(dequantize(self.f.raw(name), t.type), np.float32)
            self._vector[name] = v = self.gpu.dev.asarray(v) if self.on_gpu(name) else v
        return v

    def table(self, name: str):
        from .weights import untied_table

        return untied_table(self.f, name), self.f.info(name).type

    def load_all(self) -> None:
        for name, t in self.f.tensors.items():
            if len(t.shape) == 2 and (name != "token_embd.weight" or self._tied()):
                self.linear(name)
                if self.on_gpu(name) and not (self.stream is not None and self.stream.streamed(name)):
                    self.f.drop_pages(name)  # on the device now (streamed ones: once copied to pinned memory)
            elif len(t.shape) == 1:
                self.vector(name)
        if self.stream is not None:
            self.stream.load()

    def close(self) -> None:
        self._linear.clear()
        self._group.clear()

    @property
    def telemetry(self) -> dict | None:
        """Copy time and bytes when blocks stream (Engine reports them per pass), else None."""
        return self.stream.telemetry() if self.stream is not None else None

    # --- on a model ---

    def install(self, model) -> None:
        """Route the model's blocks, head and embedding lookups to their sides (x moves between
        them as needed) and give it per-layer caches."""
        model.caches = self.make_caches(model.rcfg, model.n_ctx)
        block, head, embed = model.block, model.head, model.embed
        gpu_ops = self.gpu.ops
        cpu_ops = self.cpu.ops if self.cpu is not None else gpu_ops

        def on(ops, x):
            model.ops = ops
            return self._to(ops is gpu_ops, x)

        def routed_block(i, x, positions):
            x = on(self.layer_ops[i], x)
            if self.stream is not None and i < self.n_gpu:
                self.stream.enter(i)
            return block(i, x, positions)

        def routed_head(x):
            return head(on(gpu_ops if self.head_on_gpu else cpu_ops, x))

        def routed_embed(ids):
            model.ops = gpu_ops if self.n_gpu > 0 else cpu_ops
            return embed(ids)

        model.block, model.head, model.embed = routed_block, routed_head, routed_embed

    def make_caches(self, rcfg, n_ctx: int) -> list:
        return make_caches(self.cfg, rcfg, n_ctx, self.layer_ops)

    def _to(self, gpu: bool, x):
        dev = self.gpu.dev
        if gpu:
            return dev.asarray(x)
        return dev.host(x)

    def describe(self) -> str:
        s = f"{self.n_gpu}/{self.n_layer} blocks on the GPU"
        if self.cpu is not None:
            s += f", the rest{'' if self.head_on_gpu else ' and the head'} on {self.cpu.backend}"
        if self.stream is not None:
            s += f", {self.stream.describe()}"
        return s


class SlotStream:
    """--gpu-memory-budget: the GPU blocks that do not fit stay in host memory and are copied into
    one of two device slots per pass, the next streamed block's copy issued as this one starts.

    The budget holds the KV caches of the GPU blocks, the workspace, the head and embedding-side
    matrices, two slots of the largest streamed block, and the resident blocks (first ones first)."""

    def __init__(self, placement: Placement, budget: int, rcfg):
        self.p = placement
        f, cfg = placement.f, placement.cfg
        self.dev = placement.gpu.dev
        sizes = [sum(_aligned(f.info(n).nbytes) for n in f.tensors if layer_of(n) == i and len(f.info(n).shape) == 2)
                 for i in range(cfg.n_layer)]  # a block's matrices as a slot holds them
        kv_row = 2 * cfg.n_head_kv * (cfg.head_dim + cfg.head_dim_v)  # f16 K and V bytes per position
        n_gpu = placement.n_gpu
        caches = 0
        for i in range(n_gpu):
            swa = cfg.sliding_window and cfg.swa_layers and cfg.swa_layers[i]
            rows = min(cfg.sliding_window + rcfg.n_batch - 1, rcfg.n_ctx) if swa else min(rcfg.n_ctx, cfg.n_ctx_train)
            caches += rows * kv_row
        other = sum(f.info(n).nbytes for n in f.tensors
                    if layer_of(n) is None and len(f.info(n).shape) == 2 and placement.on_gpu(n)
                    and (n != "token_embd.weight" or placement._tied()))
        fixed = caches + workspace(cfg, rcfg.n_batch) + other
        self.resident: set[int] = set()
        left = budget - fixed - 2 * max(sizes[:n_gpu], default=0)
        if left < 0:
            raise GpuError(f"--gpu-memory-budget {fmt(budget)} is too small: the caches, workspace and head take "
                           f"{fmt(fixed)} and two slots of a block {fmt(2 * max(sizes[:n_gpu], default=0))}")
        for i in range(n_gpu):  # the first blocks resident while they fit
            if sizes[i] > left:
                break
            self.resident.add(i)
            left -= sizes[i]
        self.order = [i for i in range(n_gpu) if i not in self.resident]  # streamed blocks, in pass order
        if not self.order:
            self.resident = set(range(n_gpu))
        self.sizes, self.budget, self.fixed = sizes, budget, fixed
        if self.dev.xp is not np:  # the pool refuses what the plan did not count
            self.dev.xp.get_default_memory_pool().set_limit(size=budget)
        self.layout: dict[str, tuple[int, int]] = {}  # matrix -> (offset, nbytes) in a slot
        self.host: dict[int, np.ndarray] = {}  # streamed block -> its matrices' bytes, pinned where CUDA
        self.slots: list = []
        self.slot_of: dict[int, int] = {}  # streamed block -> the slot holding it now
        self.copied = 0
        self.wait_s = 0.0

    def streamed(self, name: str) -> bool:
        i = layer_of(name)
        return i is not None and i in self.order

    def getter(self, name: str):
        i = layer_of(name)
        t = self.p.f.info(name)

        def get():
            off, n = self.layout[name]
            slot = self.slots[self.slot_of[i]]
            raw = slot[off : off + n].reshape(t.shape[1], -1)
            return Weight(raw, t.type, t.shape[1], t.shape[0])

        return get

    def load(self) -> None:
        """Host copies of the streamed blocks (the file's pages are dropped) and the two slots."""
        if not self.order:
            return
        f = self.p.f
        size = 0
        for i in self.order:
            names = [n for n in f.tensors if layer_of(n) == i and len(f.info(n).shape) == 2]
            for n in names:
                if f.info(n).type not in TYPES:
                    raise GpuError(f"{n} is {f.info(n).type.name}, which no GPU kernel reads as streamed "
                                   f"bytes; give --gpu-memory-budget room for block {i}")
            off = 0
            for n in names:
                self.layout[n] = (off, f.info(n).nbytes)
                off += _aligned(f.info(n).nbytes)
            buf = self._pinned(off)
            for n in names:
                o, nb = self.layout[n]
                buf[o : o + nb] = np.ascontiguousarray(f.rows(n)).reshape(-1)
                f.drop_pages(n)
            self.host[i] = buf
            size = max(size, off)
        self.slots = [self.dev.xp.zeros(size, np.uint8) for _ in range(2)]
        self._streams()

    def _pinned(self, n: int) -> np.ndarray:
        xp = self.dev.xp
        if xp is np:
            return np.zeros(n, np.uint8)
        mem = xp.cuda.alloc_pinned_memory(n)
        return np.frombuffer(mem, np.uint8, n)

    def _streams(self) -> None:
        xp = self.dev.xp
        self.copy_stream = xp.cuda.Stream(non_blocking=True) if xp is not np else None
        self.ready = [None, None]  # per slot: the event its last copy records
        self.freed = [None, None]  # per slot: the event after the compute that last read it

    def _copy(self, i: int, s: int) -> None:
        """Issue block i's copy into slot s after the compute reading s is done."""
        xp = self.dev.xp
        n = self.host[i].shape[0]
        if xp is np:
            self.slots[s][:n] = self.host[i]
        else:
            if self.freed[s] is not None:
                self.copy_stream.wait_event(self.freed[s])
            self.slots[s][:n].set(self.host[i], stream=self.copy_stream)
            ev = xp.cuda.Event()
            ev.record(self.copy_stream)
            self.ready[s] = ev
        self.slot_of = {k: v for k, v in self.slot_of.items() if v != s}
        self.slot_of[i] = s
        self.copied += n

    def enter(self, i: int) -> None:
        """Block i starts: it must be in a slot (its copy waited for on the compute stream), and
        the next streamed block's copy is issued into the other slot."""
        if i in self.resident:
            return
        import time

        t0 = time.perf_counter()
        k = self.order.index(i)
        if i not in self.slot_of:
            self._copy(i, k % 2)
        s = self.slot_of[i]
        xp = self.dev.xp
        if xp is not np:
            xp.cuda.get_current_stream().wait_event(self.ready[s])
            prev = 1 - s  # the other slot: its block's kernels were queued before this one's
            ev = xp.cuda.Event()
            ev.record(xp.cuda.get_current_stream())
            self.freed[prev] = ev
        nxt = self.order[(k + 1) % len(self.order)]
        if nxt != i and nxt not in self.slot_of:
            self._copy(nxt, 1 - s)
        self.wait_s += time.perf_counter() - t0

    def telemetry(self) -> dict:
        """bytes_read: bytes copied to the device; io_wait_s: host seconds spent issuing the copies
        (copying, on the mirror). On a GPU the compute stream waits for a copy on an event, a wait
        the host does not see without synchronizing."""
        return {"io_wait_s": self.wait_s, "bytes_read": self.copied}

    def describe(self) -> str:
        return (f"{len(self.resident)} resident and {len(self.order)} streamed through 2 slots of "
                f"{fmt(max((self.sizes[i] for i in self.order), default=0))} within {fmt(self.budget)}")

    def device_bytes(self) -> int:
        """What this plan puts on the device, by its own count (caches, workspace, head, blocks, slots)."""
        return self.fixed + sum(self.sizes[i] for i in self.resident) + sum(int(s.nbytes) for s in self.slots)
