"""The two configurations: what the model file says (ModelConfig) and what the user chose (RuntimeConfig)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgeLLMError
from ..loaders.gguf import GGUFFile


class ConfigError(EdgeLLMError):
    """A setting or a model hyper-parameter is missing or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters read from GGUF metadata (`<arch>.*` keys)."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/query head size
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_neox: bool  # rotate (x[i], x[i + d/2]) pairs instead of (x[2i], x[2i+1])
    rope_freq_scale: float = 1.0
    rope_base_local: float = 0.0  # sliding-window layers' RoPE base (gemma3), 0 = same as global
    sliding_window: int = 0  # 0: no sliding-window layers
    swa_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for k in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "head_dim_v", "n_vocab"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model hyper-parameter {k} is {getattr(self, k)}; expected > 0")
        if self.n_head % self.n_head_kv:
            raise ConfigError(f"{self.n_head} attention heads are not a multiple of {self.n_head_kv} KV heads")

    @staticmethod
    def read(f: GGUFFile, **overrides) -> "ModelConfig":
        """The common keys; architectures pass what differs as `overrides`."""
        m = f.metadata
        arch = m.get("general.architecture")

        def key(name, default=None):
            v = m.get(f"{arch}.{name}", default)
            if v is None:
                raise ConfigError(f"model metadata lacks '{arch}.{name}'")
            return v

        n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", n_embd // n_head))
        vocab = m.get("tokenizer.ggml.tokens")
        args = dict(
            arch=arch,
            n_layer=int(key("block_count")),
            n_embd=n_embd,
            n_ff=int(key("feed_forward_length")),
            n_head=n_head,
            n_head_kv=int(key("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            head_dim_v=int(key("attention.value_length", head_dim)),
            n_vocab=len(vocab) if vocab is not None else int(key("vocab_size")),
            n_ctx_train=int(key("context_length")),
            rms_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_base=float(key("rope.freq_base", 10000.0)),
            rope_neox=True,
        )
        scale = m.get(f"{arch}.rope.scaling.factor")
        if scale and m.get(f"{arch}.rope.scaling.type", "linear") == "linear":
            args["rope_freq_scale"] = 1.0 / float(scale)
        args.update(overrides)
        return ModelConfig(**args)


@dataclass(frozen=True)
class RuntimeConfig:
    """User choices, validated once; errors name the setting."""

    threads: int | str = "auto"  # a fixed count, or "auto": the allowed CPUs, adapted to contention
    n_ctx: int = 4096  # bounded by the model's training context at load
    n_batch: int = 512  # prompt tokens per forward pass
    backend: str | None = None  # kernel backend; None = the fastest available
    cluster: tuple[str, ...] = ()  # workers' "host:port" (runtime/cluster); empty: this node alone
    cluster_key: str | None = None  # this node's key file (`edgellm keygen`); needed off loopback
    cluster_allow: str | None = None  # certificates (PEM) of the nodes accepted; None: the key's own
    cluster_split: tuple[float, ...] = ()  # share weights: this node first, then each worker
    cluster_timeout: float = 5.0  # seconds without an expected message before a node counts as lost
    memory_budget: int | str | None = None  # bytes (or "400M", "1.5G") the process may use; None: all it needs
    fit_ctx: bool = False  # under a memory budget, shrink n_ctx (to 256 at least) to fit rather than refuse
    draft: str | None = None  # speculative decoding: a smaller model of the same vocabulary (name or path)
    lookup: int = 0  # speculative decoding without a model: match the last N tokens (0: off)
    draft_max: int = 7  # tokens proposed per target pass, at most (the length used is the fastest measured)
    sparsity: float = 0.0  # activation-sparse FFN: the fraction of weight reads a decoded token skips (0: dense)
    sparsity_calib: str | None = None  # the calibration text (a file); None: the built-in choice (runtime/sparsity.py)
    cache_type: str = "f16"  # KV cache elements: f16, q8_0 or q4_0 (blocks of 32 along head_dim, as llama.cpp's)
    parallel: int = 1  # sequences generated at once (runtime/batch.py), each with KV caches of n_ctx
    gpu_layers: int | None = None  # backend cuda: the first N blocks on the GPU, the rest on the CPU (None: all)
    gpu_memory_budget: int | str | None = None  # backend cuda: device bytes; blocks that do not fit stream in

    @property
    def max_threads(self) -> int:
        """The most threads a product may use: the fixed count, or the CPUs this process may use."""
        if self.threads != "auto":
            return self.threads
        from ..kernels_cpu.threads import allowed_cpus
        return allowed_cpus()

    def __post_init__(self):
        for k in ("n_ctx", "n_batch"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{k} must be a positive integer, not {v!r}")
        t = self.threads
        if isinstance(t, str) and t.strip().isdigit():
            t = int(t)
        if t != "auto" and (not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 256):
            raise ConfigError(f"threads must be 1..256 or 'auto', not {self.threads!r}")
        object.__setattr__(self, "threads", t)
        if self.n_batch > 4096:
            raise ConfigError(f"n_batch must be at most 4096, not {self.n_batch}")
        _check_cluster(self)
        _check_budget(self)
        _check_speculative(self)
        _check_sparsity(self)
        _check_cache_type(self)
        _check_parallel(self)
        _check_gpu(self)


def _check_gpu(c: RuntimeConfig) -> None:
    env = os.environ.get("EDGELLM_BACKEND", "").strip().lower()
    if c.backend is None and env in ("cuda", "cuda-mirror"):  # (the CPU names are kernels_cpu.linear's)
        object.__setattr__(c, "backend", env)
    gpu = c.backend in ("cuda", "cuda-mirror")
    n = c.gpu_layers
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 4096):
        raise ConfigError(f"gpu_layers must be 0..4096, not {n!r}")
    _size_setting(c, "gpu_memory_budget", "'512M'")
    if (n is not None or c.gpu_memory_budget is not None) and not gpu:
        raise ConfigError("gpu_layers and gpu_memory_budget need backend 'cuda'")


def _check_parallel(c: RuntimeConfig) -> None:
    p = c.parallel
    if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 16:
        raise ConfigError(f"parallel must be 1..16, not {p!r}")
    if p > 1:
        for what, on in (("a cluster", c.cluster), ("speculative decoding", c.draft or c.lookup)):
            if on:
                raise ConfigError(f"parallel sequences do not run with {what} yet")


def _check_cache_type(c: RuntimeConfig) -> None:
    from ..quant.ggml_types import KV_CACHE_TYPES

    t = str(c.cache_type).strip().lower()
    if t not in KV_CACHE_TYPES:
        raise ConfigError(f"cache_type must be one of {', '.join(KV_CACHE_TYPES)}, not {c.cache_type!r}")
    object.__setattr__(c, "cache_type", t)


def _check_sparsity(c: RuntimeConfig) -> None:
    from .sparsity import check_sparsity

    try:
        s = check_sparsity(c.sparsity)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    object.__setattr__(c, "sparsity", s)
    if s and c.cluster:
        raise ConfigError("sparsity does not run with a cluster yet")
    if s and c.memory_budget is not None:
        raise ConfigError("sparsity does not run under a memory budget yet (the sparse layout is resident)")


def _check_cluster(c: RuntimeConfig) -> None:
    nodes = (c.cluster,) if isinstance(c.cluster, str) else tuple(c.cluster or ())
    for n in nodes:
        host, _, port = n.rpartition(":") if isinstance(n, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"cluster must list 'host:port' addresses, not {n!r}")
    split = tuple(c.cluster_split or ())
    if split and (len(split) != len(nodes) + 1 or not all(isinstance(w, (int, float)) and w > 0 for w in split)):
        raise ConfigError(f"cluster_split must be {len(nodes) + 1} positive weights (this node first), not {split!r}")
    t = c.cluster_timeout
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.05 <= t <= 3600:
        raise ConfigError(f"cluster_timeout must be 0.05..3600 seconds, not {t!r}")
    object.__setattr__(c, "cluster", nodes)
    object.__setattr__(c, "cluster_split", tuple(float(w) for w in split))


def _check_speculative(c: RuntimeConfig) -> None:
    from .speculative import MAX_DRAFT

    if not isinstance(c.lookup, int) or isinstance(c.lookup, bool) or not 0 <= c.lookup <= 16:
        raise ConfigError(f"lookup must be 0..16 tokens, not {c.lookup!r}")
    if not isinstance(c.draft_max, int) or isinstance(c.draft_max, bool) or not 1 <= c.draft_max <= MAX_DRAFT:
        raise ConfigError(f"draft_max must be 1..{MAX_DRAFT}, not {c.draft_max!r}")
    if c.draft is not None and (not isinstance(c.draft, str) or not c.draft.strip()):
        raise ConfigError(f"draft must be a model name or a GGUF path, not {c.draft!r}")
    if c.draft and c.lookup:
        raise ConfigError("choose a draft model or lookup, not both")
    if (c.draft or c.lookup) and c.draft_max > c.n_batch - 1:
        raise ConfigError(f"draft_max must stay below n_batch ({c.n_batch})")
    if c.draft and c.cluster:
        raise ConfigError("a draft model does not run with a cluster yet; use lookup")


def _check_budget(c: RuntimeConfig) -> None:
    _size_setting(c, "memory_budget", "'400M' or '1.5G'")


def _size_setting(c: RuntimeConfig, name: str, example: str) -> None:
    """A byte count setting given as bytes or a size string: stored as bytes, or ConfigError."""
    b = getattr(c, name)
    if b is None:
        return
    from ..offload.planner import parse_size

    try:
        n = parse_size(b) if isinstance(b, (int, str)) and not isinstance(b, bool) else None
    except ValueError:
        n = None
    if n is None or n <= 0:
        raise ConfigError(f"{name} must be a positive byte count or a size like {example}, not {b!r}")
    object.__setattr__(c, name, n)
