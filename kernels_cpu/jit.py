"""Compiled copies of a template function, one per constant (CPU path, kernel), cached safely.

    task = specialize(_task, "avx512vnni", ISA=0, _rows=rows)   # njit copy, globals replaced

numba's on-disk cache checks only the source file of the function it caches, yet a cached
function carries the code of everything it calls: a kernel whose intrinsics (qmatmul_rows.py,
simd.py) changed would load stale from the cache of the unchanged file that calls them. So every
copy's name carries a hash of all the kernel sources: new sources, new cache entries. And copies
take their kernels as globals, never as function-typed arguments (numba pickles the types of
arguments into its cache index, and one naming a dispatcher of another process fails to save).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from types import FunctionType

from numba import njit

_SOURCES = ("jit.py", "qmatmul.py", "qmatmul_rows.py", "qmatmul_tiles.py", "simd.py", "sparse.py", "threads.py")


@functools.cache
def source_tag() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((Path(__file__).with_name(name)).read_bytes())
    return h.hexdigest()[:12]


def specialize(fn, suffix: str, options: dict | None = None, **globals_):
    """An njit(cache=True, nogil=True) copy of the plain function fn with some globals replaced."""
    name = f"{fn.__name__}_{suffix}_{source_tag()}"
    f = FunctionType(fn.__code__, dict(fn.__globals__, **globals_), name, fn.__defaults__, fn.__closure__)
    f.__qualname__ = name
    return njit(cache=True, nogil=True, **(options or {}))(f)
