"""Training-free activation sparsity in the FFN (CATS' rule, TEAL's calibration), per layer.

A neuron i of layer l is active for a token when |act(gate_i . x)| > thr_l; an inactive neuron's
up row and down column are not read (kernels_cpu/sparse.py). `S` (`--sparsity`) is the
model-wide fraction of weight bytes a decoded token does not read, against dense decode:

    reads_l(s) = gate_l + (1 - s) (up_l + quants of down_l) + scales of down_l    (s: neurons skipped)
    S = 1 - sum_l reads_l / (all matrices read per token, the head included)

Calibration (`edgellm sparsify`, or the first `--sparsity` run of a model) runs the dense model
over a text that is not the evaluation text (GPL-3): two license texts and some of Python's own
source. Pass 1 takes |act(gate)| per layer and sets the thresholds of LEVELS (quantiles). Pass 2
measures, per layer and level, the relative error of the FFN output, |down(h * inactive)|^2 /
|down(h)|^2. (Measured against the block's output instead, TEAL's block-level error, the
allocation for S = 0.25 on qwen 0.5B scored GPL-3 perplexity 298 rather than 38.5.) For a target S, levels are raised one layer at a time, always where the error grows
least per byte saved (greedy, as TEAL allocates across blocks), until S is reached; no layer
goes above a cap (0.5, raised only as far as the target needs), since the calibrated error
understates what deep cuts in one layer cost.

Calibrations are cached in $EDGELLM_HOME/sparsity/<model sha256>.json with a checksum of their
contents; a corrupt, stale (another text, another format version) or unreadable file is
calibrated anew, never used. Pass 2 also measures locality (how many of a token's active neurons
were active for the previous token; how much of all activity the most active 20% of neurons
carry), the facts a hot/cold neuron cache would rest on.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError

VERSION = 3
LEVELS = tuple(round(0.1 * i, 1) for i in range(10))  # neuron sparsities calibrated per layer, 0 .. 0.9
CALIB_TOKENS = 1024  # tokens of calibration text (chunks of 512)
_SAMPLE = 1 << 18  # |act| values kept per layer and chunk for the quantiles
MAX_SPARSITY = 0.9
CAPS = (0.5, 0.6, 0.7, 0.8, 0.9)  # the most neuron sparsity one layer may get, lowest first (Calibration.allocate)


class SparsityError(EdgeLLMError):
    """Sparsity cannot be used here (backend, layout) or calibration failed."""


def check_sparsity(s) -> float:
    """s as a float; ValueError naming it unless it is a fraction 0..MAX_SPARSITY."""
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= MAX_SPARSITY:
        raise ValueError(f"sparsity must be a fraction 0..{MAX_SPARSITY}, not {s!r}")
    return float(s)


def check_model(model) -> None:
    """SparsityError unless the model's FFNs can run sparse (checked before any calibration)."""
    w = model.w
    b = "blk.0."
    if not hasattr(w, "linear") or not all(hasattr(w.linear(b + n), "w") for n in ("ffn_gate.weight", "ffn_up.weight")):
        raise SparsityError("sparsity needs the numba kernels (not --backend numpy) and resident weights")
    if any(w.has(f"blk.{i}.ffn_{n}.lr_b") for i in range(model.cfg.n_layer) for n in ("gate", "up", "down")):
        raise SparsityError("sparsity does not apply the low-rank corrections of a compressed model's FFNs; "
                            "use a file compressed without --rank")
    down = w.f.info(b + "ffn_down.weight").type.name
    if down not in ("Q4_K", "Q6_K") or model.cfg.n_ff % 256:
        raise SparsityError(f"sparsity needs Q4_K or Q6_K down matrices of a multiple of 256 inputs "
                            f"(this model: {down}, {model.cfg.n_ff})")


# ---- calibration text --------------------------------------------------------------------------

_LICENSES = ("/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0")
_PY_MODULES = ("textwrap", "json.decoder", "difflib")


def default_text() -> str:
    """Two license texts (not GPL-3, the evaluation text) and some of Python's standard library."""
    import importlib

    parts = []
    for p in _LICENSES:
        try:
            parts.append(Path(p).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            pass
    for name in _PY_MODULES:
        f = getattr(importlib.import_module(name), "__file__", None)
        if f:
            parts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
    text = "\n\n".join(parts)
    if len(text) < 20_000:
        raise SparsityError("no calibration text found (license texts under /usr/share/common-licenses, "
                            "Python's library sources); give one with --calib FILE")
    return text


# ---- the model's byte accounting --------------------------------------------------------------

def _bytes(f, name: str) -> int:
    return f.info(name).nbytes if name in f.tensors else 0


def read_bytes(f) -> int:
    """Bytes of matrices a decoded token reads: every 2-D tensor but the embedding table (one
    row is looked up), which counts once more when it is also the output head."""
    total = sum(t.nbytes for n, t in f.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight")
    if "output.weight" not in f.tensors:
        total += _bytes(f, "token_embd.weight")
    return total


def layer_bytes(f, i: int, e: int, ff: int) -> dict:
    """A layer's FFN bytes: gate, up, down (dense), and the neuron-major down's quants and scales."""
    b = f"blk.{i}."
    down = f.info(b + "ffn_down.weight")
    q6 = down.type.name == "Q6_K"
    quants = ff * e * (6 if q6 else 4) // 8
    scales = (ff // 16 * e + ff // 256 * e * 4) if q6 else (ff // 32 * e * 2 + ff // 256 * e * 8)
    return {"gate": _bytes(f, b + "ffn_gate.weight"), "up": _bytes(f, b + "ffn_up.weight"),
            "down": down.nbytes, "down_quants": quants, "down_scales": scales}


def layer_reads(lb: dict, s: float | None) -> float:
    """Bytes layer FFN reads per token: dense (s None) or at neuron sparsity s."""
    if s is None:
        return lb["gate"] + lb["up"] + lb["down"]
    return lb["gate"] + (1 - s) * (lb["up"] + lb["down_quants"]) + lb["down_scales"]


# ---- the calibration --------------------------------------------------------------------------

@dataclass
class Calibration:
    model_sha256: str
    text_sha256: str
    n_tokens: int
    thr: list[list[float]]  # (layer, level) thresholds on |act(gate)|
    err: list[list[float]]  # (layer, level) relative squared error of the FFN output
    layers: list[dict]  # layer_bytes per layer
    total_bytes: int  # read_bytes of the model
    locality: dict  # measured at level 0.5

    def to_json(self) -> dict:
        body = {"version": VERSION, "model_sha256": self.model_sha256, "text_sha256": self.text_sha256,
                "n_tokens": self.n_tokens, "levels": list(LEVELS), "thr": self.thr, "err": self.err,
                "layers": self.layers, "total_bytes": self.total_bytes, "locality": self.locality}
        return {**body, "checksum": _checksum(body)}

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        body = {k: v for k, v in d.items() if k != "checksum"}
        if d.get("checksum") != _checksum(body):
            raise ValueError("checksum mismatch")
        if body.get("version") != VERSION or body.get("levels") != list(LEVELS):
            raise ValueError("another format version")
        n = len(body["layers"])
        if len(body["thr"]) != n or len(body["err"]) != n or any(len(r) != len(LEVELS) for r in body["thr"] + body["err"]):
            raise ValueError("malformed tables")
        return cls(body["model_sha256"], body["text_sha256"], int(body["n_tokens"]), body["thr"], body["err"],
                   body["layers"], int(body["total_bytes"]), body["locality"])

    def max_skipped(self) -> float:
        """The largest S: every layer at the last level."""
        return self.skipped([LEVELS[-1]] * len(self.layers))

    def allocate(self, target: float) -> list[float | None]:
        """Per layer, the neuron sparsity (a LEVELS value, or None: dense) that reaches model-wide
        S >= target with the least calibrated error per byte saved, no layer above a cap: the
        lowest of CAPS that reaches the target. (On qwen 0.5B at S = 0.1, GPL-3 perplexity: no cap
        5.68, cap 0.5 5.52, cap 0.4 5.56, all layers alike 6.43; dense 5.31.)"""
        check_sparsity(target)
        for cap in CAPS:
            levels = self._greedy(target, cap)
            if levels is not None:
                return levels
        raise SparsityError(f"sparsity {target} is beyond what this model's FFNs can skip "
                            f"(at most {self.max_skipped():.2f} at neuron sparsity {LEVELS[-1]})")

    def _greedy(self, target: float, cap: float) -> list[float | None] | None:
        n = len(self.layers)
        top = LEVELS.index(cap)
        k = [0] * n  # level index; 0 = dense
        reads = [layer_reads(lb, None) for lb in self.layers]
        other = self.total_bytes - sum(reads)
        while 1 - (other + sum(reads)) / self.total_bytes < target - 1e-9:
            best, best_cost = None, None
            for i in range(n):
                if k[i] >= top:
                    continue
                saved = reads[i] - layer_reads(self.layers[i], LEVELS[k[i] + 1])
                if saved <= 0:
                    continue
                cost = (self.err[i][k[i] + 1] - (self.err[i][k[i]] if k[i] else 0.0)) / saved
                if best_cost is None or cost < best_cost:
                    best, best_cost = i, cost
            if best is None:
                return None
            k[best] += 1
            reads[best] = layer_reads(self.layers[best], LEVELS[k[best]])
        return [LEVELS[j] if j else None for j in k]

    def skipped(self, levels: list[float | None]) -> float:
        """Model-wide S of a per-layer allocation."""
        dense = sum(layer_reads(lb, None) for lb in self.layers)
        now = sum(layer_reads(lb, s) for lb, s in zip(self.layers, levels))
        return (dense - now) / self.total_bytes


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _act(model):
    return "gelu_tanh" if model.cfg.arch.startswith("gemma") else "silu"


def _act_np(g: np.ndarray, act: str) -> np.ndarray:
    from ..kernels_cpu.sparse import ACTS, act_ref

    return act_ref(g, ACTS[act]).astype(np.float32)


class _Recorder:
    """Installed as model.sparse during calibration: runs each FFN densely and measures it."""

    def __init__(self, model, thr=None):
        self.model, self.thr = model, thr
        n = model.cfg.n_layer
        self.samples = [[] for _ in range(n)]
        self.err = np.zeros((n, len(LEVELS)))
        self.norm = np.zeros(n)  # squared norms of the FFN outputs
        self.overlap = np.zeros(2)  # active neurons shared with the previous token, active neurons
        self.freq = [np.zeros(model.cfg.n_ff) for _ in range(n)]
        self.rng = np.random.default_rng(0)

    def __call__(self, i: int, h: np.ndarray) -> np.ndarray:
        m, b = self.model, f"blk.{i}."
        g, u = m.linears(h, b + "ffn_gate.weight", b + "ffn_up.weight")
        a = _act_np(g, _act(m))
        hf = a * u
        y = m.linear(hf, b + "ffn_down.weight")
        mag = np.abs(a)
        if self.thr is None:  # pass 1: a sample of |act| for the quantiles
            flat = mag.reshape(-1)
            self.samples[i].append(flat[self.rng.integers(0, flat.size, min(_SAMPLE, flat.size))])
            return y
        self.norm[i] += float((y.astype(np.float64) ** 2).sum())
        for k, t in enumerate(self.thr[i]):
            if k == 0:
                continue
            off = mag <= t
            e = m.linear(np.where(off, hf, 0).astype(np.float32), b + "ffn_down.weight")
            self.err[i, k] += float((e.astype(np.float64) ** 2).sum())
        on = mag > self.thr[i][LEVELS.index(0.5)]
        self.overlap += ((on[1:] & on[:-1]).sum(), on[1:].sum())
        self.freq[i] += on.sum(axis=0)
        return y


def calibrate(engine, text: str, progress=None) -> Calibration:
    """Measure thresholds and errors on `text` with the engine's dense model (module doc)."""
    from ..loaders.store import file_sha256

    model, tok = engine.model, engine.tokenizer
    ids = tok.encode(text, add_special=True, parse_special=False)[:CALIB_TOKENS]
    if len(ids) < 64:
        raise SparsityError(f"the calibration text has {len(ids)} tokens; at least 64 are needed")
    chunk = min(512, engine.n_ctx)
    chunks = [ids[a:a + chunk] for a in range(0, len(ids), chunk) if len(ids) - a >= 16]
    cfg = model.cfg
    rec = _Recorder(model)
    saved = getattr(model, "sparse", None)
    steps, done = 2 * len(chunks), 0
    try:
        model.sparse = rec
        for p in range(2):
            if p == 1:
                thr = []
                for s in rec.samples:
                    v = np.concatenate(s)
                    thr.append([0.0] + [float(np.quantile(v, q)) for q in LEVELS[1:]])
                rec = _Recorder(model, thr)
                model.sparse = rec
            for c in chunks:
                engine.reset()
                engine.prefill(list(c))
                done += 1
                if progress:
                    progress(done, steps)
    finally:
        model.sparse = saved
        engine.reset()
    err = (rec.err / np.maximum(rec.norm, 1e-30)[:, None]).tolist()
    top = []
    for fr in rec.freq:
        srt = np.sort(fr)[::-1]
        top.append(float(srt[: len(srt) // 5].sum() / max(srt.sum(), 1)))
    locality = {"level": 0.5, "shared_with_previous_token": float(rec.overlap[0] / max(rec.overlap[1], 1)),
                "activity_in_top_20pct_neurons": float(np.mean(top))}
    f = engine.file
    return Calibration(file_sha256(engine.path), hashlib.sha256(text.encode()).hexdigest(), len(ids),
                       [list(map(float, t)) for t in thr], err,
                       [layer_bytes(f, i, cfg.n_embd, cfg.n_ff) for i in range(cfg.n_layer)],
                       read_bytes(f), locality)


def cache_path(model_sha256: str) -> Path:
    from ..loaders.store import home

    return home() / "sparsity" / f"{model_sha256}.json"


def load_cached(model_sha256: str, text_sha256: str) -> Calibration | None:
    """The cached calibration of this model and text, or None (missing, corrupt or stale)."""
    try:
        cal = Calibration.from_json(json.loads(cache_path(model_sha256).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if cal.model_sha256 != model_sha256 or cal.text_sha256 != text_sha256:
        return None
    return cal


def save(cal: Calibration) -> Path:
    p = cache_path(cal.model_sha256)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cal.to_json()))
    os.replace(tmp, p)
    return p


def calibration(engine, calib_file: str | None = None, progress=None, force: bool = False) -> Calibration:
    """The cached calibration of the engine's model (and the text), calibrating when there is none."""
    from ..loaders.store import file_sha256

    if calib_file is not None:
        try:
            text = Path(calib_file).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise SparsityError(f"cannot read the calibration text {calib_file}: {e.strerror or e}") from None
    else:
        text = default_text()
    sha = file_sha256(engine.path)
    cal = None if force else load_cached(sha, hashlib.sha256(text.encode()).hexdigest())
    if cal is None:
        cal = calibrate(engine, text, progress)
        save(cal)
    return cal


def bar(label: str):
    """A progress callback (done, total) drawing a one-line bar on stderr when it is a terminal."""
    t0 = time.monotonic()

    def show(done, total):
        if not sys.stderr.isatty():
            return
        w = 30
        fill = int(w * done / max(total, 1))
        sys.stderr.write(f"\r{label} [{'#' * fill}{'.' * (w - fill)}] {done}/{total} {time.monotonic() - t0:.0f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


# ---- sparse decode ------------------------------------------------------------------------------

class Sparse:
    """Installed as model.sparse: the FFN of each layer with a level, sparse (kernels_cpu/ffn.py);
    None for dense layers and, unless all_tokens (perplexity), for prompt-sized batches."""

    def __init__(self, model, cal: Calibration, target: float, max_batch: int = 16):
        from ..kernels_cpu.ffn import SparseFFN
        from ..kernels_cpu.sparse import down_t

        w = model.w
        self.levels = cal.allocate(target)
        self.target, self.s = target, cal.skipped(self.levels)
        self.max_batch, self.all_tokens = max_batch, False
        self.ffns, self.thr = {}, {}
        self.pairs = [0, 0]  # (token, neuron) pairs computed, and possible
        check_model(model)
        for i, lv in enumerate(self.levels):
            if lv is None:
                continue
            b = f"blk.{i}."
            fns = [w.linear(b + n) for n in ("ffn_gate.weight", "ffn_up.weight")]
            info = w.f.info(b + "ffn_down.weight")
            dt = down_t(w.f.rows(b + "ffn_down.weight"), info.type, info.shape[0])  # (prompts still read the rows)
            self.ffns[i] = SparseFFN(fns[0].w, fns[1].w, dt, _act(model))
            self.thr[i] = cal.thr[i][LEVELS.index(lv)]

    def __call__(self, i: int, h: np.ndarray):
        f = self.ffns.get(i)
        if f is None or (h.shape[0] > self.max_batch and not self.all_tokens):
            return None
        y, n = f(h, self.thr[i])
        self.pairs[0] += n
        self.pairs[1] += h.shape[0] * f.f
        return y

    def describe(self) -> dict:
        return {"sparsity": round(self.s, 4), "target": self.target,
                "layers": [lv if lv is not None else 0.0 for lv in self.levels],
                "neurons_active": round(self.pairs[0] / self.pairs[1], 4) if self.pairs[1] else None}
