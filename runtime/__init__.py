"""The runtime: composes loaders, kernels and offload into models that generate text."""
from pathlib import Path

from ..errors import EdgeLLMError
from ..loaders.gguf import GGUFFile
from ..loaders.modelinfo import describe
from ..loaders.store import CATALOG, DEFAULT_MODEL, home, list_cached, pull, remove, resolve


def describe_model(path: Path, n_ctx: int | None = None, cache_type: str = "f16") -> dict:
    """`edgellm show`'s summary of the GGUF file at `path`."""
    cache_type = RuntimeConfig(cache_type=cache_type).cache_type  # ConfigError naming a bad one
    with GGUFFile(path) as f:
        return describe(f, n_ctx, cache_type)


from .config import RuntimeConfig  # noqa: E402
from .engine import Engine  # noqa: E402
from .perplexity import perplexity  # noqa: E402
from .sampler import SamplingParams  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__all__ = ["EdgeLLMError", "Engine", "GGUFFile", "RuntimeConfig", "SamplingParams", "Tokenizer", "perplexity",
           "CATALOG", "DEFAULT_MODEL", "describe_model", "home", "list_cached", "pull", "remove", "resolve"]
