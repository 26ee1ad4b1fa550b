"""The runtime: composes loaders, kernels and offload into models that generate text."""
from pathlib import Path

from ..loaders.gguf import GGUFFile
from ..loaders.modelinfo import describe
from ..loaders.store import CATALOG, DEFAULT_MODEL, home, list_cached, pull, remove, resolve


def describe_model(path: Path, n_ctx: int | None = None) -> dict:
    """`edgellm show`'s summary of the GGUF file at `path`."""
    with GGUFFile(path) as f:
        return describe(f, n_ctx)


__all__ = ["CATALOG", "DEFAULT_MODEL", "describe_model", "home", "list_cached", "pull", "remove", "resolve"]
