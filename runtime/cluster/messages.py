"""The cluster protocol's messages: a type byte each, and fixed little-endian payload headers.

| type     | from | payload                                                                      |
|----------|------|------------------------------------------------------------------------------|
| OPEN     | C    | model sha256, file size, n_ctx, n_batch, timeout ms, kernel backend, KV type |
| INFO     | W    | has the model (0 no, 1 own copy, 2 replica), budget, threads, process bytes, |
|          |      | free memory, matvec rate (weight bytes/s its kernels measured)               |
| PIECE    | C    | tensor index (-1: the GGUF header), axis, lo, hi, offset, piece size; bytes  |
| PLAN     | C    | this node's rank, node count, plan hash; the plan table int64 (nodes, 6)     |
| NEED     | W    | int64 (k, 4): (tensor index, axis, lo, hi) of the pieces a replica lacks     |
| PROGRESS | W    | nothing: packing goes on (each one restarts the coordinator's deadline)      |
| READY    | W    | plan hash, weight bytes, largest batch, bytes streamed per pass (0 resident) |
| STEP     | C    | start, tokens T, flags (1 all logits, 2 probe); float32 (T, n_embd) input    |
| PARTIAL  | W    | float32 (T, n_embd): this node's partial sum (after attn_output, ffn_down)   |
| SUM      | C    | float32 (T, n_embd): the total                                               |
| LOGITS   | W    | first row, rows; float32 (rows, this node's vocabulary rows)                 |
| STATS    | both | C: nothing (a request); W: peak and current RSS, bytes read, I/O wait s      |
| ERROR    | both | UTF-8 text, at most 1 KiB                                                    |
| BYE      | C    | nothing: the session ends                                                    |
"""
from __future__ import annotations

import struct

OPEN, INFO, PLAN, NEED, PIECE, PROGRESS, READY, STEP, PARTIAL, SUM, LOGITS, ERROR, BYE, STATS = range(1, 15)
NAMES = {v: k for k, v in dict(OPEN=OPEN, INFO=INFO, PLAN=PLAN, NEED=NEED, PIECE=PIECE, PROGRESS=PROGRESS,
                               READY=READY, STEP=STEP, PARTIAL=PARTIAL, SUM=SUM, LOGITS=LOGITS,
                               ERROR=ERROR, BYE=BYE, STATS=STATS).items()}

OPEN_S = struct.Struct("<32sQIII16s8s")
INFO_S = struct.Struct("<BQIQQd")
PIECE_S = struct.Struct("<qqqqQQ")
PLAN_S = struct.Struct("<II32s")
READY_S = struct.Struct("<32sQIQ")
STATS_S = struct.Struct("<QQQd")
STEP_S = struct.Struct("<IIII")
ROWS_S = struct.Struct("<II")
ALL_LOGITS, PROBE = 1, 2  # STEP flags
LOGIT_CHUNK = 4 << 20  # logits bytes per LOGITS frame (about)
PIECE_CHUNK = 4 << 20  # weight bytes per PIECE frame


def step_limit(n_batch: int, n_embd: int, n_vocab_local: int) -> int:
    """The largest payload of a session's forward passes: a STEP of n_batch tokens or a LOGITS chunk."""
    rows = max(1, LOGIT_CHUNK // (4 * n_vocab_local))
    return max(STEP_S.size + n_batch * n_embd * 4, ROWS_S.size + rows * n_vocab_local * 4)
