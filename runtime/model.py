"""The model base class and the architecture registry (keyed by GGUF `general.architecture`).

An architecture file subclasses `Model`, reads its `ModelConfig` in `config()`, and implements
`block(i, x, positions)` for layer i. Weights come from a weight store by their GGUF tensor names
(`blk.{i}.attn_q.weight`); the store decides whether they are resident or streamed.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import EdgeLLMError
from ..loaders.gguf import GGUFFile
from .config import ModelConfig, RuntimeConfig
from .kv_cache import make_caches

ARCHITECTURES: dict[str, type["Model"]] = {}


class UnsupportedArchitecture(EdgeLLMError):
    pass


def register(*names: str):
    def deco(cls):
        for n in names:
            ARCHITECTURES[n] = cls
        return cls
    return deco


def model_class(arch: str | None) -> type["Model"]:
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{arch}'; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[arch]


class Model:
    """A transformer decoder over a weight store; `forward` runs a batch of consecutive tokens."""

    embd_scale = 1.0  # embeddings are multiplied by this (gemma: sqrt(n_embd))
    sparse = None  # set from outside (runtime/sparsity.py): sparse(i, h) -> the FFN output, or None: dense
    _rows = None  # during forward_rows: each row's list of caches

    def __init__(self, cfg: ModelConfig, rcfg: RuntimeConfig, weights, ops):
        self.cfg, self.rcfg, self.w, self.ops = cfg, rcfg, weights, ops
        self.n_ctx = min(rcfg.n_ctx, cfg.n_ctx_train)
        self.caches = make_caches(cfg, rcfg, self.n_ctx, ops)
        self.output_name = "output.weight" if weights.has("output.weight") else "token_embd.weight"
        self.norm_eps = cfg.rms_eps

    @classmethod
    def config(cls, f: GGUFFile) -> ModelConfig:
        return ModelConfig.read(f)

    # --- pieces shared by the architectures ---

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return self.ops.rms_norm(x, self.w.vector(name), self.norm_eps)

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """x (T, K) @ W.T -> (T, N), plus the bias `*.bias` when the file has one."""
        return self._extras(x, self.w.linear(name)(x), name)

    def _extras(self, x: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
        """y += a (b x), a matrix's low-rank correction (`*.lr_a` (N, r), `*.lr_b` (r, K), written
        by `edgellm compress`), and the bias `*.bias`, where the file has them."""
        base = name[: -len("weight")]
        if self.w.has(base + "lr_b"):
            y += self.w.linear(base + "lr_a")(self.w.linear(base + "lr_b")(x))
        if self.w.has(base + "bias"):
            y += self.w.vector(base + "bias")
        return y

    def linears(self, x: np.ndarray, *names: str) -> list[np.ndarray]:
        """Several matrices sharing their input x (T, K) -> [(T, N_i)], biases and low-rank
        corrections added; one pass over x when the weight store and kernels can (`group`)."""
        group = getattr(self.w, "group", None)
        ys = group(names)(x) if group is not None else [self.w.linear(n)(x) for n in names]
        return [self._extras(x, y, name) for y, name in zip(ys, names)]

    def ffn(self, i: int, h: np.ndarray, gate) -> np.ndarray:
        """Layer i's gated FFN of h (T, n_embd): down(gate(W_gate h, W_up h)), gate being ops'
        silu_gate or gelu_tanh_gate; activation-sparse when `sparse` takes it."""
        if self.sparse is not None:
            y = self.sparse(i, h)
            if y is not None:
                return y
        b = f"blk.{i}."
        return self.linear(gate(*self.linears(h, b + "ffn_gate.weight", b + "ffn_up.weight")), b + "ffn_down.weight")

    def reduce(self, x: np.ndarray) -> np.ndarray:
        """Sum partial results across tensor-parallel nodes (after attn_output and ffn_down); a
        no-op on one node. A cluster replaces it from outside (runtime never knows the network)."""
        return x

    def embed(self, ids: np.ndarray) -> np.ndarray:
        rows, gtype = self.w.table("token_embd.weight")
        x = self.ops.embedding_rows(rows, gtype, ids)  # (T, n_embd)
        if self.embd_scale != 1.0:
            x *= np.float32(self.embd_scale)
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final norm and output projection: (T, n_embd) -> logits (T, n_vocab)."""
        return self.linear(self.norm(x, "output_norm.weight"), self.output_name)

    def attention(self, i: int, q, k, v, positions, scale: float) -> np.ndarray:
        """Store k/v of layer i at `positions`, attend with q: (T, n_head, head_dim) -> (T, n_head * head_dim_v).
        In `forward_rows` each row is a token of its own sequence, with that sequence's caches."""
        rows = self._rows if self._rows is not None else [self.caches] if q.shape[0] == 1 else None
        if rows is not None:  # decode steps: one token of each sequence
            outs = [caches[i].step(q[r], k[r], v[r], int(positions[r]), scale) for r, caches in enumerate(rows)]
            xp = getattr(self.ops, "xp", np)  # a device's ops keep arrays on the device
            return xp.stack(outs).reshape(q.shape[0], -1)  # (T, n_head * head_dim_v)
        cache = self.caches[i]
        cache.store(k, v, positions)
        out = cache.attend(q, positions, scale)
        return out.reshape(q.shape[0], -1)

    def block(self, i: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, ids: np.ndarray, start: int, all_logits: bool = False) -> np.ndarray:
        """Tokens `ids` (T,) at positions start..start+T-1 -> logits (T or 1, n_vocab)."""
        ids = np.asarray(ids, dtype=np.int64)
        T = ids.shape[0]
        if start + T > self.n_ctx:
            raise EdgeLLMError(f"context full: {start + T} tokens exceed the context of {self.n_ctx}")
        return self._run(ids, np.arange(start, start + T, dtype=np.int64), all_logits)

    def forward_rows(self, ids: np.ndarray, positions: np.ndarray, caches: list) -> np.ndarray:
        """One token of each of several sequences: ids (B,) at positions (B,), row r with caches[r]
        (a list like `self.caches`) -> logits (B, n_vocab). Each row's logits are the bits a lone
        decode step of its sequence gives (the products are batch-invariant, attention runs per row)."""
        self._rows = caches
        try:
            return self._run(np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64), True)
        finally:
            self._rows = None

    def _run(self, ids: np.ndarray, positions: np.ndarray, all_logits: bool) -> np.ndarray:
        x = self.embed(ids)
        for i in range(self.cfg.n_layer):
            x = self.block(i, x, positions)
        if not all_logits:
            x = x[-1:]
        return self.head(x)

    @staticmethod
    def attn_scale(head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim)
