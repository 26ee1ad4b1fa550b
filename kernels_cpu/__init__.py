"""CPU kernels: quantized products (qmatmul, chosen through linear.select) and the other ops.

numba's parallel ops (prompt-sized norms, RoPE, attention) use its workqueue threading layer,
whose threads sleep between parallel regions; OpenMP's spin after each one, which on a 2-core
machine starves the product workers of threads.py (and any other process) of their core.
"""
import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
try:
    import numba

    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"
except ImportError:  # pragma: no cover - the numpy path needs no numba
    pass
