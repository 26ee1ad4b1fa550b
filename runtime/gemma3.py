"""Gemma 3 (`gemma3`).

Differences from llama: embeddings scaled by sqrt(n_embd); RMSNorm on each q and k head; norms
after attention and FFN as well as before (the GGUF norm weights already include gemma's +1);
GELU-tanh gating; five sliding-window layers (window `attention.sliding_window`, RoPE base 10,000)
for every global layer (RoPE base `rope.freq_base`); queries scaled by 1/sqrt(head_dim).
"""
from __future__ import annotations

import math

import numpy as np

from ..loaders.gguf import GGUFFile
from .config import ModelConfig
from .model import Model, register

SWA_PATTERN = 6  # layers i with i % 6 < 5 use the sliding window
LOCAL_ROPE_BASE = 10000.0


@register("gemma3")
class Gemma3(Model):
    @classmethod
    def config(cls, f: GGUFFile) -> ModelConfig:
        n_layer = int(f.metadata["gemma3.block_count"])
        window = int(f.metadata.get("gemma3.attention.sliding_window", 0))
        return ModelConfig.read(
            f,
            rope_neox=True,
            rope_base_local=LOCAL_ROPE_BASE,
            sliding_window=window,
            swa_layers=tuple(window > 0 and i % SWA_PATTERN < SWA_PATTERN - 1 for i in range(n_layer)),
        )

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.embd_scale = math.sqrt(self.cfg.n_embd)

    def block(self, i: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        c, ops, b = self.cfg, self.ops, f"blk.{i}."
        T = x.shape[0]
        local = bool(c.swa_layers and c.swa_layers[i])
        base = c.rope_base_local if local else c.rope_base
        h = self.norm(x, b + "attn_norm.weight")  # (T, n_embd)
        q, k, v = self.linears(h, b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight")
        q = q.reshape(T, c.n_head, c.head_dim)
        k = k.reshape(T, c.n_head_kv, c.head_dim)
        v = v.reshape(T, c.n_head_kv, c.head_dim_v)
        q = self.norm(q, b + "attn_q_norm.weight")
        k = self.norm(k, b + "attn_k_norm.weight")
        q = ops.rope(q, positions, base, True, freq_scale=1.0 if local else c.rope_freq_scale)
        k = ops.rope(k, positions, base, True, freq_scale=1.0 if local else c.rope_freq_scale)
        a = self.attention(i, q, k, v, positions, self.attn_scale(c.head_dim))
        x = x + self.norm(self.reduce(self.linear(a, b + "attn_output.weight")), b + "post_attention_norm.weight")
        h = self.norm(x, b + "ffn_norm.weight")
        return x + self.norm(self.reduce(self.ffn(i, h, ops.gelu_tanh_gate)), b + "post_ffw_norm.weight")
