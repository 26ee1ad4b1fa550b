"""The resident weight store: every tensor of the file, packed once for the kernels at load time.

Models ask for weights by GGUF name: `linear(name)` (a matrix the kernels multiply by),
`vector(name)` (norm weights, biases: float32), `table(name)` (embedding rows, left quantized
and dequantized per looked-up row). A streaming store (offload/) offers the same interface.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import EdgeLLMError
from ..loaders.gguf import GGUFFile
from ..quant.formats import dequantize
from ..quant.ggml_types import GGMLType

# (raw rows uint8 (N, row_bytes), type, K) -> callable x (T, K) f32 -> (T, N) f32
LinearFactory = Callable[[np.ndarray, GGMLType, int], Callable[[np.ndarray], np.ndarray]]


class Weights:
    def __init__(self, f: GGUFFile, make_linear: LinearFactory, make_group=None):
        self.f = f
        self.make_linear = make_linear
        self.make_group = make_group
        self._linear: dict[str, Callable] = {}
        self._group: dict[tuple, Callable] = {}
        self._vector: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return name in self.f.tensors

    def linear(self, name: str):
        fn = self._linear.get(name)
        if fn is None:
            t = self.f.info(name)
            if len(t.shape) != 2:
                raise EdgeLLMError(f"tensor '{name}' has shape {t.shape}; expected a matrix")
            fn = self._linear[name] = self.make_linear(self.f.rows(name), t.type, t.shape[0])
        return fn

    def group(self, names: tuple[str, ...]):
        """A callable x -> [x @ W.T for each name]: matrices that share their input, multiplied in
        one pass over x (q/k/v, gate/up) when the kernels can."""
        fn = self._group.get(names)
        if fn is None:
            fns = [self.linear(n) for n in names]
            fn = self._group[names] = (self.make_group(fns) if self.make_group is not None
                                       else (lambda x: [f(x) for f in fns]))
        return fn

    def vector(self, name: str) -> np.ndarray:
        v = self._vector.get(name)
        if v is None:
            t = self.f.info(name)
            v = self._vector[name] = np.ascontiguousarray(dequantize(self.f.raw(name), t.type), np.float32)
        return v

    def table(self, name: str) -> tuple[np.ndarray, GGMLType]:
        """Rows to look up: a table the head does not also use is read on lookup (a mapped one
        gains ~64 KiB of resident pages per row through fault-around); a tied one stays mapped
        (the head reads all of it anyway)."""
        return untied_table(self.f, name), self.f.info(name).type

    def load_all(self) -> None:
        """Pack every matrix now (so the first token does not pay for it)."""
        tied = "output.weight" not in self.f.tensors
        for name, t in self.f.tensors.items():
            if len(t.shape) == 2 and (name != "token_embd.weight" or tied):
                self.linear(name)
                self.f.drop_pages(name)
            elif len(t.shape) == 1:
                self.vector(name)


def untied_table(f: GGUFFile, name: str):
    """f's rows of `name` for lookups: read on lookup when the model has a separate head, else mapped."""
    return f.lookups(name) if name == "token_embd.weight" and "output.weight" in f.tensors else f.rows(name)
