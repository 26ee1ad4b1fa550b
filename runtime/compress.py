"""`edgellm compress`: rewrite a GGUF model to a byte size (or bits per weight) of your choice.

1. An importance matrix: the mean square of each input channel of every matrix, collected while
   the model reads a calibration text (not GPL-3, the evaluation text; chunks of 512 tokens).
2. Per matrix, the source type and each lower type the CPU kernels run (quant/compress.py),
   with its importance-weighted error on sample rows; a greedy choice under the byte budget.
3. Optional low-rank corrections (--rank R) of a layer matrix's quantization error, offered to the
   choice as one more option per lower type (its bytes and its error measured out of sample), and
   stored as `blk.N.<name>.lr_a` (N, r) and `.lr_b` (r, K) beside the matrices that take them;
   the runtime adds a (b x).
4. The output GGUF: the source's metadata (plus `edgellm.compress.*`), tensors in the source's
   order, written under a temporary name and renamed at the end (no partial file on error).
"""
from __future__ import annotations

import hashlib
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from ..loaders.gguf import GGUFFile, ValueType
from ..loaders.gguf_write import OutTensor, header_bytes, write_gguf
from ..offload import parse_size  # noqa: F401  (the CLI reads --size with it)
from ..quant import compress as qc
from ..quant.formats import dequantize
from ..quant.ggml_types import GGMLType
from ..quant.quantize import quantize_rows

CALIB_CHUNK = 512
CALIB_TOKENS = 4096
MIN_CALIB_TOKENS = 256
LOW_RANK = ("lr_a", "lr_b")
MAX_RANK = qc.SAMPLE_ROWS // 4  # (a correction's error is estimated on half the sample rows)


class CompressError(EdgeLLMError):
    pass


def low_rank_names(weight_name: str) -> tuple[str, str]:
    """'blk.3.ffn_up.weight' -> ('blk.3.ffn_up.lr_a', 'blk.3.ffn_up.lr_b')."""
    base = weight_name[: -len(".weight")]
    return f"{base}.lr_a", f"{base}.lr_b"


# ---- 1. the importance matrix -------------------------------------------------------------------

class _Recorder:
    """A weight store that passes every product through, summing x^2 per input channel per name."""

    def __init__(self, store):
        self.store = store
        self.sums: dict[str, np.ndarray] = {}  # name -> float64 (K,)
        self.counts: dict[str, int] = {}

    def __getattr__(self, attr):
        return getattr(self.store, attr)

    def _add(self, name: str, x: np.ndarray) -> None:
        sq = np.einsum("tk,tk->k", x, x, dtype=np.float64)
        if name in self.sums:
            self.sums[name] += sq
        else:
            self.sums[name] = sq
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def linear(self, name: str):
        fn = self.store.linear(name)

        def run(x):
            self._add(name, x)
            return fn(x)
        return run

    def group(self, names: tuple[str, ...]):
        fn = self.store.group(names)

        def run(x):
            for n in names:
                self._add(n, x)
            return fn(x)
        return run


def importance(engine, text: str, n_tokens: int = CALIB_TOKENS, progress=None) -> tuple[dict[str, np.ndarray], int]:
    """Mean x^2 per input channel of each matrix (name -> float32 (K,)) over the text's first
    n_tokens, in chunks of 512 from an empty cache (BOS first when the model adds one); and the
    number of tokens read."""
    tok = engine.tokenizer
    ids = tok.encode(text, add_special=True, parse_special=False)[:n_tokens]
    if len(ids) < MIN_CALIB_TOKENS:
        raise CompressError(f"the calibration text has {len(ids)} tokens; at least {MIN_CALIB_TOKENS} are needed")
    model = engine.model
    rec = _Recorder(model.w)
    model.w = rec
    chunks = [ids[i:i + CALIB_CHUNK] for i in range(0, len(ids), CALIB_CHUNK)]
    chunks = [c for c in chunks if len(c) >= 16]
    try:
        for i, c in enumerate(chunks):
            c = list(c)
            if tok.add_bos and tok.bos_id is not None:
                c[0] = tok.bos_id
            engine.reset()
            engine.prefill(c)
            if progress:
                progress(i + 1, len(chunks))
    finally:
        model.w = rec.store
        engine.reset()
    return {n: (s / rec.counts[n]).astype(np.float32) for n, s in rec.sums.items()}, sum(len(c) for c in chunks)


def imatrix_path(model_sha256: str, text: str, n_tokens: int) -> Path:
    from ..loaders.store import home

    key = hashlib.sha256(f"{model_sha256}:{n_tokens}:".encode() + text.encode()).hexdigest()[:32]
    return home() / "imatrix" / f"{key}.npz"


def cached_importance(engine, text: str, n_tokens: int, progress=None) -> tuple[dict[str, np.ndarray], int]:
    """`importance`, kept in $EDGELLM_HOME/imatrix/ (numpy arrays, no pickle) by the model's SHA-256,
    the text and the token count; a broken cache file is measured again."""
    from ..loaders.store import file_sha256

    path = imatrix_path(file_sha256(engine.path), text, n_tokens)
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k].astype(np.float32) for k in z.files if k != "__tokens__"}
            return got, int(z["__tokens__"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    imp, n = importance(engine, text, n_tokens, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.npz")
    np.savez(tmp, __tokens__=np.int64(n), **imp)
    os.replace(tmp, path)
    return imp, n


# ---- 2. the plan --------------------------------------------------------------------------------

@dataclass
class Plan:
    names: list[str]  # the matrices that were free to change, in file order
    options: list[list[qc.Option]]
    choice: list[int]
    rank: int
    lr: list[str]  # the matrices that get low-rank corrections

    def chosen(self, name: str) -> qc.Option:
        i = self.names.index(name)
        return self.options[i][self.choice[i]]

    def mix(self) -> dict[str, int]:
        """type name -> tensor count."""
        out: dict[str, int] = {}
        for o, c in zip(self.options, self.choice):
            out[o[c].type.name] = out.get(o[c].type.name, 0) + 1
        return out


def _matrices(f: GGUFFile) -> list[str]:
    return [n for n, t in f.tensors.items() if len(t.shape) == 2]


def _lr_candidates(f: GGUFFile, rank: int) -> list[str]:
    """The matrices that may get low-rank corrections: the layers' (the head and embeddings keep
    bits). Only those whose type is lowered get them (a kept matrix has no error to correct)."""
    return [n for n in _matrices(f) if rank > 0 and n.startswith("blk.") and n.endswith(".weight")]


def _values(f: GGUFFile, name: str) -> np.ndarray:
    t = f.info(name)
    return dequantize(f.raw(name), t.type).reshape(t.n_rows, t.shape[0])  # (N, K)


def _imp(imp: dict, name: str, k: int) -> np.ndarray:
    """The importance of a matrix's inputs; a tied embedding used as the head has the head's."""
    v = imp.get(name)
    return v if v is not None and v.shape == (k,) else np.ones(k, np.float32)


def fixed_bytes(f: GGUFFile, rank: int, metadata_extra: dict) -> int:
    """What the output holds besides its matrices and their low-rank factors: header (counting
    factors for every candidate), 1-D tensors, padding."""
    fixed = sum(t.nbytes for t in f.tensors.values() if len(t.shape) != 2)
    lr = _lr_candidates(f, rank)
    meta, types = _metadata(f, metadata_extra)
    fixed += len(header_bytes(meta, types, _out_tensors_stub(f, rank, set(lr))))
    return fixed + 32 * (len(f.tensors) + 2 * len(lr))  # each tensor's padding, at most


def smallest_size(f: GGUFFile, rank: int, metadata_extra: dict) -> int:
    """The smallest output any type mix gives (every matrix at its smallest candidate type)."""
    small = 0
    for n in _matrices(f):
        t = f.info(n)
        cands = qc.candidate_types(t.shape[0], t.type)
        small += t.n_rows * min([t.type.row_bytes(t.shape[0])] + [c.row_bytes(t.shape[0]) for c in cands])
    return fixed_bytes(f, rank, metadata_extra) + small


def plan(f: GGUFFile, imp: dict, target: int, rank: int, metadata_extra: dict, progress=None) -> Plan:
    """Each matrix's options (with corrections of rank `rank` as further options for the layers'
    matrices) and the greedy choice under `target` bytes."""
    mats = _matrices(f)
    lr_ok = set(_lr_candidates(f, rank))
    opts = []
    for i, n in enumerate(mats):
        t = f.info(n)
        rows = f.rows(n)[qc.sample_rows(t.n_rows)]
        sample = dequantize(np.ascontiguousarray(rows).reshape(-1), t.type).reshape(rows.shape[0], t.shape[0])
        opts.append(qc.options(sample, t.n_rows, t.type, _imp(imp, n, t.shape[0]), rank if n in lr_ok else 0))
        if progress:
            progress(i + 1, len(mats))
    choice = qc.allocate(opts, target - fixed_bytes(f, rank, metadata_extra))  # (the caller checked smallest_size)
    return Plan(mats, opts, choice, rank, [n for n, o, c in zip(mats, opts, choice) if o[c].rank])


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# ---- 4. the output file --------------------------------------------------------------------------

def _metadata(f: GGUFFile, extra: dict) -> tuple[dict, dict]:
    meta = {k: v for k, v in f.metadata.items() if not k.startswith("edgellm.compress.")}
    types = {k: f.metadata_types[k] for k in meta}
    for k, (v, vt) in extra.items():
        meta[k], types[k] = v, vt
    return meta, types


def _out_tensors_stub(f: GGUFFile, rank: int, lr: set) -> list[OutTensor]:
    """Tensor entries with the right names and dimension counts (the header's size hardly
    depends on the types)."""
    out = []
    for n, t in f.tensors.items():
        out.append(OutTensor(n, t.shape, t.type, lambda: None))
        if n in lr:
            a, b = low_rank_names(n)
            out += [OutTensor(a, (rank, t.n_rows), GGMLType.F16, None), OutTensor(b, (t.shape[0], rank), GGMLType.F16, None)]
    return out


def write(f: GGUFFile, p: Plan, imp: dict, out: Path, metadata_extra: dict, progress=None) -> int:
    lr = set(p.lr)
    tensors: list[OutTensor] = []
    cache: dict[str, tuple] = {}  # name -> (a, b) factors, made with their matrix

    def matrix(name, t, o):
        def make():
            if o.type == t.type:  # kept as it was (corrections only come with a lower type)
                return f.raw(name)
            w = _values(f, name)
            raw = quantize_rows(w, o.type, _imp(imp, name, t.shape[0]))
            if name in lr:
                cache[name] = _factors(f, name, t, raw, o.type, imp, p.rank, w)
            return raw
        return make

    for n, t in f.tensors.items():
        if len(t.shape) == 2:
            o = p.chosen(n)
            tensors.append(OutTensor(n, t.shape, o.type, matrix(n, t, o)))
            if n in lr:
                an, bn = low_rank_names(n)
                ta, tb = qc.factor_type(p.rank), qc.factor_type(t.shape[0])
                tensors.append(OutTensor(an, (p.rank, t.n_rows), ta, lambda n=n: cache[n][0]))
                tensors.append(OutTensor(bn, (t.shape[0], p.rank), tb, lambda n=n: cache.pop(n)[1]))
        else:
            tensors.append(OutTensor(n, t.shape, t.type, lambda n=n: f.raw(n)))
    meta, types = _metadata(f, metadata_extra)
    return write_gguf(out, meta, types, tensors, progress)


def _factors(f, name, t, raw, qtype, imp, rank, w):
    """The stored bytes of a lowered matrix's correction factors (a, b)."""
    w_hat = dequantize(np.ascontiguousarray(raw).reshape(-1), qtype).reshape(w.shape)
    a, b = qc.low_rank(w, w_hat, _imp(imp, name, t.shape[0]), rank)
    return qc.encode_factor(a), qc.encode_factor(b)


# ---- the command --------------------------------------------------------------------------------

def _check_output(out: Path, src: Path) -> Path:
    out = Path(out)
    if out.resolve() == src.resolve():
        raise CompressError(f"the output {out} is the input model; give another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CompressError(f"cannot write {out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CompressError(f"cannot write {out}: permission denied")
    if out.is_dir():
        raise CompressError(f"cannot write {out}: it is a directory")
    return out


def read_calibration(path: str | None) -> str:
    if path is None:
        from .sparsity import default_text

        return default_text()
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise CompressError(f"cannot read the calibration text {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CompressError(f"the calibration text {path} is not UTF-8 (byte {e.start:,}): a truncated or binary file?") from None
    return text


@dataclass
class Result:
    path: Path
    size: int
    source_size: int
    bpw: float
    mix: dict
    rank: int
    corrected: int  # matrices given low-rank corrections
    seconds: float
    calib_tokens: int


def compress(model_path: Path, out: Path, size: int | None = None, bpw: float | None = None, rank: int = 0,
             calib: str | None = None, calib_tokens: int = CALIB_TOKENS, threads="auto", progress=None,
             log=lambda s: None) -> Result:
    """Rewrite the model at `model_path` to `out` at about `size` bytes (or `bpw` bits per weight
    of its matrices); see the module doc."""
    from .config import RuntimeConfig
    from .engine import Engine

    t0 = time.monotonic()
    if (size is None) == (bpw is None):
        raise CompressError("give exactly one of --size and --bpw")
    if not MIN_CALIB_TOKENS <= calib_tokens <= 1 << 20:
        raise CompressError(f"--calib-tokens {calib_tokens} is out of range {MIN_CALIB_TOKENS}..{1 << 20}")
    if not 0 <= rank <= MAX_RANK:
        raise CompressError(f"--rank {rank} is out of range 0..{MAX_RANK}")
    out = _check_output(out, model_path)
    if bpw is not None and not 1.0 <= bpw <= 16.0:
        raise CompressError(f"--bpw {bpw} is out of range 1..16")
    text = read_calibration(calib)
    src_size = model_path.stat().st_size
    extra = {"edgellm.compress.rank": (int(rank), ValueType.UINT32),
             "edgellm.compress.calib_tokens": (int(calib_tokens), ValueType.UINT32),
             "edgellm.compress.source": (model_path.name, ValueType.STRING)}
    with GGUFFile(model_path) as f:
        if any(n.endswith(LOW_RANK) for n in f.tensors):
            raise CompressError(f"{model_path.name} is already compressed with low-rank corrections; start from the original")
        n_weights = sum(t.n_elements for t in f.tensors.values() if len(t.shape) == 2)
        if size is None:
            size = int(src_size - sum(t.nbytes for t in f.tensors.values() if len(t.shape) == 2) + n_weights * bpw / 8)
        if size >= src_size:
            raise CompressError(f"--size {_mb(size)} is not below the model's own {_mb(src_size)}: nothing to compress")
        smallest = smallest_size(f, rank, extra)
    if size < smallest:
        raise CompressError(f"{_mb(size)} is below what any type mix reaches: the smallest is {_mb(smallest)}"
                            + (f" with --rank {rank}" if rank else ""))
    log(f"importance matrix: up to {calib_tokens} tokens of calibration text")
    engine = Engine(model_path, RuntimeConfig(n_ctx=CALIB_CHUNK, threads=threads))
    try:
        imp, n_tok = cached_importance(engine, text, calib_tokens, progress("importance") if progress else None)
    finally:
        engine.close()
    extra["edgellm.compress.calib_tokens"] = (int(n_tok), ValueType.UINT32)  # (same size in the header)
    with GGUFFile(model_path) as f:
        log(f"type choice for {_mb(size)} (the model is {_mb(src_size)})")
        p = plan(f, imp, size, rank, extra, progress("measuring types") if progress else None)
        written = write(f, p, imp, out, extra, progress("writing") if progress else None)
        mat_bytes = sum(p.chosen(n).nbytes for n in p.names)
    return Result(out, written, src_size, 8 * mat_bytes / n_weights, p.mix(), rank, len(p.lr), time.monotonic() - t0, n_tok)


def describe(r: Result) -> str:
    mix = ", ".join(f"{k} {v}" for k, v in sorted(r.mix.items()))
    lr = f", low-rank corrections of rank {r.rank} on {r.corrected} matrices" if r.rank else ""
    return (f"wrote {r.path} ({_mb(r.size)}, {100 * r.size / r.source_size:.1f}% of {_mb(r.source_size)}; "
            f"{r.bpw:.2f} bits per matrix weight; {mix}{lr}) in {r.seconds:.0f} s")

