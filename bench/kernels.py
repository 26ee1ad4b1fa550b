"""Quantized matmul throughput on the catalog models' shapes: `python bench/kernels.py --help`.

The code lives in edgellm.kernels_cpu.bench so the installed CLI can run it (`edgellm bench kernels`).
"""
from edgellm.kernels_cpu.bench import main, run  # noqa: F401  (run is the function the CLI wires)

if __name__ == "__main__":
    main()
