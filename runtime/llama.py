"""The llama family as GGUF names it: `llama` and `qwen2`.

Per layer: RMSNorm -> q/k/v (qwen2: with bias) -> RoPE -> grouped-KV attention -> attn_output,
residual; RMSNorm -> SwiGLU FFN (silu(gate) * up -> down), residual. The output head is
`output.weight`, or the token embedding when tied. llama rotates consecutive pairs (its q/k
weights are permuted at conversion), qwen2 the NeoX way.
"""
from __future__ import annotations

import numpy as np

from ..loaders.gguf import GGUFFile
from .config import ModelConfig
from .model import Model, register


@register("llama", "qwen2")
class Llama(Model):
    @classmethod
    def config(cls, f: GGUFFile) -> ModelConfig:
        arch = f.metadata.get("general.architecture")
        return ModelConfig.read(f, rope_neox=arch != "llama")

    def block(self, i: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        c, ops, b = self.cfg, self.ops, f"blk.{i}."
        T = x.shape[0]
        h = self.norm(x, b + "attn_norm.weight")  # (T, n_embd)
        q, k, v = self.linears(h, b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight")
        q = q.reshape(T, c.n_head, c.head_dim)
        k = k.reshape(T, c.n_head_kv, c.head_dim)
        v = v.reshape(T, c.n_head_kv, c.head_dim_v)
        q = ops.rope(q, positions, c.rope_base, c.rope_neox, freq_scale=c.rope_freq_scale)
        k = ops.rope(k, positions, c.rope_base, c.rope_neox, freq_scale=c.rope_freq_scale)
        a = self.attention(i, q, k, v, positions, self.attn_scale(c.head_dim))  # (T, n_head * head_dim_v)
        x = x + self.reduce(self.linear(a, b + "attn_output.weight"))
        h = self.norm(x, b + "ffn_norm.weight")
        return x + self.reduce(self.ffn(i, h, ops.silu_gate))
