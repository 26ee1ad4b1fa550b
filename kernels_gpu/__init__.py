"""CUDA kernels (optional): kernels.cu, compiled at run time by NVRTC through CuPy
(`pip install -e '.[gpu]'`), beside mirror.py, a numpy mirror of each kernel's arithmetic.

launch.py opens a device (CudaDevice, or MirrorDevice: the same calls on the mirrors) and
ops.py gives the runtime's ops interface on it; runtime/gpu.py places a model's blocks. Importing
this package never imports CuPy.
"""
