"""What `edgellm show` reports about a GGUF file: architecture, sizes, quant mix, memory estimate."""
from __future__ import annotations

from collections import Counter
from typing import Any

from ..quant.ggml_types import kv_bytes
from .gguf import GGUFFile

DEFAULT_CTX = 4096


def arch_key(f: GGUFFile, key: str, default: Any = None) -> Any:
    """Metadata `<architecture>.<key>`, e.g. arch_key(f, "block_count")."""
    arch = f.metadata.get("general.architecture", "")
    return f.metadata.get(f"{arch}.{key}", default)


def kv_cache_bytes(f: GGUFFile, n_ctx: int, cache_type: str = "f16") -> int:
    """Bytes of a K and V cache of `cache_type` (f16, q8_0, q4_0) holding `n_ctx` positions in every layer."""
    n_layer = int(arch_key(f, "block_count", 0))
    n_head = int(arch_key(f, "attention.head_count", 0) or 0)
    n_kv = arch_key(f, "attention.head_count_kv", n_head)
    n_kv = int(n_kv.max()) if hasattr(n_kv, "max") else int(n_kv or 0)
    d = int(arch_key(f, "embedding_length", 0))
    k_len = int(arch_key(f, "attention.key_length", d // n_head if n_head else 0))
    v_len = int(arch_key(f, "attention.value_length", k_len))
    return kv_bytes(cache_type, n_layer * n_ctx * n_kv * (k_len + v_len))


def describe(f: GGUFFile, n_ctx: int | None = None, cache_type: str = "f16") -> dict[str, Any]:
    """A JSON-ready summary of the model in `f` (memory estimated with a KV cache of `cache_type`)."""
    weights = sum(t.nbytes for t in f.tensors.values())
    types = Counter(t.type.name for t in f.tensors.values())
    ctx_train = int(arch_key(f, "context_length", 0) or 0)
    ctx = min(n_ctx or DEFAULT_CTX, ctx_train) if ctx_train else (n_ctx or DEFAULT_CTX)
    kv = kv_cache_bytes(f, ctx, cache_type)
    vocab = len(f.metadata.get("tokenizer.ggml.tokens", ())) or None
    d = int(arch_key(f, "embedding_length", 0) or 0)
    # activations and logits: a few model-width vectors per prompt batch plus the vocabulary logits
    scratch = (vocab or 0) * 4 * 2 + 512 * max(d, 1) * 4 * 16
    return {
        "path": str(f.path),
        "name": f.metadata.get("general.name"),
        "architecture": f.metadata.get("general.architecture"),
        "gguf_version": f.version,
        "parameters": sum(t.n_elements for t in f.tensors.values()),
        "context_length": ctx_train or None,
        "embedding_length": d or None,
        "block_count": arch_key(f, "block_count"),
        "vocab_size": vocab,
        "tensor_count": len(f.tensors),
        "quant_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        "file_size_bytes": f.file_size,
        "weights_bytes": weights,
        "estimated_memory_bytes": weights + kv + scratch,
        "estimated_memory_ctx": ctx,
        "kv_cache_bytes": kv,
        "kv_cache_type": cache_type,
    }
