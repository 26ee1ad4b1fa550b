"""The few ONNX protobuf messages the onnxruntime backend needs, encoded by hand.

This avoids a runtime dependency on the `onnx` package for graphs of one or two nodes. Field
numbers are those of onnx/onnx.proto3; only what onnxruntime reads is written. Large tensors are
declared with external data and handed to onnxruntime as OrtValues (no copy through protobuf).
"""
from __future__ import annotations

import numpy as np

IR_VERSION = 10  # onnxruntime 1.17-1.31 all accept 10 (recent onnx stamps 14, which 1.31 refuses)
OPSETS = (("", 17), ("com.microsoft", 1))
ELEM = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3,
        np.dtype(np.int64): 7, np.dtype(np.float16): 10}


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _int(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(v)


def _msg(field: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def tensor(name: str, arr: np.ndarray) -> bytes:
    """TensorProto with its data inline (for small constants: shapes, axes)."""
    arr = np.ascontiguousarray(arr)
    return (b"".join(_int(1, d) for d in arr.shape) + _int(2, ELEM[arr.dtype]) + _msg(8, name)
            + _msg(9, arr.tobytes()))


def external_tensor(name: str, arr: np.ndarray) -> bytes:
    """TensorProto whose data comes from SessionOptions.add_external_initializers."""
    def entry(k: str, v: str) -> bytes:
        return _msg(13, _msg(1, k) + _msg(2, v))
    return (b"".join(_int(1, d) for d in arr.shape) + _int(2, ELEM[arr.dtype]) + _msg(8, name)
            + entry("location", "edgellm-memory") + entry("offset", "0") + entry("length", str(arr.nbytes))
            + _int(14, 1))


def attr_int(name: str, v: int) -> bytes:
    return _msg(1, name) + _int(3, v) + _int(20, 2)  # AttributeProto.type = INT


def node(op: str, inputs: list[str], outputs: list[str], attrs: list[bytes] = (), domain: str = "") -> bytes:
    b = b"".join(_msg(1, i) for i in inputs) + b"".join(_msg(2, o) for o in outputs) + _msg(4, op)
    b += b"".join(_msg(5, a) for a in attrs)
    return b + (_msg(7, domain) if domain else b"")


def value_info(name: str, dtype, dims: list[int | str]) -> bytes:
    """A graph input/output: float tensor of `dims` (ints, or strings for symbolic dimensions)."""
    shape = b"".join(_msg(1, _int(1, d) if isinstance(d, int) else _msg(2, d)) for d in dims)
    return _msg(1, name) + _msg(2, _msg(1, _int(1, ELEM[np.dtype(dtype)]) + _msg(2, shape)))


def model(nodes: list[bytes], initializers: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    """Serialized ModelProto of one graph."""
    g = b"".join(_msg(1, n) for n in nodes) + _msg(2, "edgellm")
    g += b"".join(_msg(5, t) for t in initializers)
    g += b"".join(_msg(11, v) for v in inputs) + b"".join(_msg(12, v) for v in outputs)
    opsets = b"".join(_msg(8, _msg(1, d) + _int(2, v)) for d, v in OPSETS)
    return _int(1, IR_VERSION) + opsets + _msg(7, g)

