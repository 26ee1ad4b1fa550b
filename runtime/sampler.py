"""Sampling: one step's logits -> one token id, in llama.cpp's order, with the sampler's own seeded RNG.

The chain is llama.cpp's default (`common_params_sampling::samplers`) restricted to what edgellm
implements: penalties -> top-k -> top-p -> min-p -> temperature -> softmax -> draw. Greedy decoding
(temperature <= 0) is the argmax after penalties. `StopMatcher` cuts streamed text at stop strings.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from ..errors import EdgeLLMError


class SamplingError(EdgeLLMError, ValueError):
    """A sampling setting is out of range, or the logits/history handed to the sampler are unusable."""


def _int(name: str, v, lo: float, rule: str) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
        raise SamplingError(f"{name} must be {rule}, got {v!r}")
    return int(v)


def _real(name: str, v, rule: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < lo or v > hi or (lo_open and v == lo):
        raise SamplingError(f"{name} must be {rule}, got {v!r}")
    return float(v)


MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's limit)

_ALIASES = {
    "temp": "temperature",
    "max_new_tokens": "max_tokens",
    "n_predict": "max_tokens",
    "repetition_penalty": "repeat_penalty",
    "penalty_repeat": "repeat_penalty",
    "penalty_last_n": "repeat_last_n",
    "penalty_freq": "frequency_penalty",
    "penalty_present": "presence_penalty",
}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token and when to stop; defaults are llama.cpp's (`common/common.h`)."""

    temperature: float = 0.8  # <= 0: greedy argmax (ties to the lowest id)
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # tokens of history the three penalties look at; 0: off, -1: all
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the window
    presence_penalty: float = 0.0  # subtracted once if present in the window
    seed: int | None = None  # None: drawn from os.urandom
    max_tokens: int = -1  # -1: until end of generation or a full context
    stop: tuple[str, ...] = ()  # stop strings; not emitted
    ignore_eos: bool = False  # ban end-of-generation tokens instead of stopping on them
    grammar: str | None = None  # an llguidance grammar the output must match (runtime/grammar.py)
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives (0..20)

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place)
        put("temperature", _real("temperature", self.temperature, "a finite number (<= 0 means greedy)"))
        put("top_k", _int("top_k", self.top_k, -math.inf, "an integer (<= 0 disables)"))
        put("top_p", _real("top_p", self.top_p, "in [0, 1]", 0.0, 1.0))
        put("min_p", _real("min_p", self.min_p, "in [0, 1]", 0.0, 1.0))
        put("repeat_penalty", _real("repeat_penalty", self.repeat_penalty, "> 0 (1.0 = off)", 0.0, lo_open=True))
        rule = "an integer >= -1 (0 = off, -1 = whole history)"
        put("repeat_last_n", _int("repeat_last_n", self.repeat_last_n, -1, rule))
        put("frequency_penalty", _real("frequency_penalty", self.frequency_penalty, "a finite number (0 = off)"))
        put("presence_penalty", _real("presence_penalty", self.presence_penalty, "a finite number (0 = off)"))
        if self.seed is not None:
            put("seed", _int("seed", self.seed, 0, "None or an integer >= 0"))
        put("max_tokens", _int("max_tokens", self.max_tokens, -1, "an integer >= -1 (-1 = no limit)"))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop must be a string or a sequence of non-empty strings, got {self.stop!r}")
        put("stop", tuple(stop))
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise SamplingError("grammar must be None or an llguidance grammar string")
        if self.logprobs is not None:
            put("logprobs", _int("logprobs", self.logprobs, 0, "None or an integer in 0..20"))
            if self.logprobs > MAX_TOP_LOGPROBS:
                raise SamplingError(f"logprobs must be None or an integer in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature <= 0)."""
        return self.temperature <= 0

    @classmethod
    def from_kwargs(cls, **kw) -> "SamplingParams":
        """Build from user keywords, accepting common aliases (`temp`, `n_predict`, `repetition_penalty`, ...)."""
        names = {f.name for f in fields(cls)}
        out: dict = {}
        for key, v in kw.items():
            name = _ALIASES.get(key, key)
            if name not in names:
                raise SamplingError(f"unknown sampling parameter '{key}'")
            if name in out:
                raise SamplingError(f"sampling parameter '{name}' given twice (as '{key}' and another alias)")
            out[name] = v
        return cls(**out)


def apply_penalties(logits: np.ndarray, history: Sequence[int], p: SamplingParams) -> np.ndarray:
    """Repeat/frequency/presence penalties over the last `repeat_last_n` history tokens, as llama.cpp does.

    logits: (n_vocab,) float32, never written; returns it unchanged when no penalty applies, else a copy.
    A penalised token's logit is divided by `repeat_penalty` if > 0 (multiplied if <= 0), then lowered by
    `count * frequency_penalty + presence_penalty`.
    """
    off = p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
    if off or p.repeat_last_n == 0 or len(history) == 0:
        return logits
    n = len(history)
    window = history if p.repeat_last_n < 0 or p.repeat_last_n >= n else history[n - p.repeat_last_n:]
    toks, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)  # (n_unique,) each
    if toks[0] < 0 or toks[-1] >= logits.shape[0]:
        bad = toks[0] if toks[0] < 0 else toks[-1]
        raise SamplingError(f"history holds token id {bad}, outside the vocabulary [0, {logits.shape[0]})")
    x = logits.copy()  # (n_vocab,)
    v = x[toks]  # (n_unique,)
    rp = np.float32(p.repeat_penalty)
    v = np.where(v <= 0, v * rp, v / rp)
    v -= counts.astype(np.float32) * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)
    x[toks] = v
    return x


def _sort_desc(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids (n,) int64 reordered by x[ids] descending, ties by id ascending.

    One int64 sort of unique keys (-logit's order-preserving int32 bits, id): exact, and ~5x faster than
    numpy's stable argsort on a whole 262k vocabulary.
    """
    b = (np.float32(0) - x[ids]).view(np.int32)  # (n,) bits of -logit; 0 - x also turns -0.0 into +0.0
    key = b ^ ((b >> 31) & 0x7FFFFFFF)  # (n,) int32 that orders like the floats
    key = (key.astype(np.int64) << 32) | ids  # (n,) unique: (-logit, id)
    key.sort()
    return key & 0xFFFFFFFF


def _top_sorted(x: np.ndarray, n: int) -> np.ndarray:
    """Ids (n,) of the n largest of x (n_vocab,), by logit descending then id ascending; no full sort."""
    size = x.shape[0]
    if n >= size:
        return _sort_desc(x, np.arange(size, dtype=np.int64))
    kth = np.partition(x, size - n)[size - n]  # the n-th largest value
    ids = np.flatnonzero(x >= kth)  # (>= n,) ascending ids; more than n when tied at kth
    return _sort_desc(x, ids)[:n]


def filter_candidates(x: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Top-k, then top-p, then min-p on penalised logits x (n_vocab,) float32 (finite max).

    Returns the surviving ids (n_cand,) int64, by logit descending then id ascending. Each filter keeps a
    prefix of that order, so the result is the shortest of the three prefixes; top-p's softmax is over the
    top-k survivors and min-p keeps logits >= max + log(min_p), as in llama.cpp.
    """
    size = x.shape[0]
    m = x.max()
    k = p.top_k if 0 < p.top_k < size else size
    keep = k
    if p.min_p > 0:
        keep = min(keep, int(np.count_nonzero(x >= m + np.log(np.float32(p.min_p)))))
    if p.top_p >= 1.0:
        return _top_sorted(x, keep)
    if k < size:
        top = _top_sorted(x, k)  # (k,)
        z = np.exp(x[top] - m).sum(dtype=np.float64)
    else:
        z = np.exp(x - m).sum(dtype=np.float64)
    n = keep if k < size else min(keep, 1024)  # whole vocabulary: widen the sorted prefix only when needed
    while True:
        ids = top[:n] if k < size else _top_sorted(x, n)  # (n,)
        cum = np.cumsum(np.exp(x[ids] - m), dtype=np.float64) / z  # (n,)
        i = int(np.searchsorted(cum, p.top_p, side="left"))  # first i with cum[i] >= top_p
        if i < n:
            return ids[: i + 1]
        if n >= keep:
            return ids
        n = min(keep, n * 16)


class Sampler:
    """Picks tokens for one generation with its own RNG (`numpy.random.Generator(PCG64(seed))`).

    `eog_ids`: end-of-generation token ids, banned (logit -inf) when `params.ignore_eos` is set.
    `seed` holds the seed in use, so a run with a random seed can be replayed.
    """

    def __init__(self, params: SamplingParams, n_vocab: int, eog_ids: Sequence[int] = (), constraint=None):
        if not isinstance(params, SamplingParams):
            raise SamplingError(f"params must be SamplingParams, got {type(params).__name__}")
        self.params = params
        self.n_vocab = _int("n_vocab", n_vocab, 1, "an integer >= 1")
        self.banned = np.asarray(eog_ids if params.ignore_eos else (), dtype=np.int64)  # (n_banned,)
        if self.banned.size and (self.banned.min() < 0 or self.banned.max() >= n_vocab):
            raise SamplingError(f"eog_ids must be in [0, {n_vocab}), got {list(eog_ids)}")
        self.constraint = constraint  # a grammar.Constraint: masks the logits, consumes each sampled token
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.rng = np.random.Generator(np.random.PCG64(self.seed))

    def logits(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The logits (n_vocab,) float32 that the filters see: banned tokens -inf, then penalties applied."""
        x = np.asarray(logits, dtype=np.float32)  # (n_vocab,); copied below before any write
        if x.shape != (self.n_vocab,):
            raise SamplingError(f"logits have shape {x.shape}, expected ({self.n_vocab},)")
        if self.banned.size:
            x = x.copy()
            x[self.banned] = -np.inf
        if self.constraint is not None:
            x = np.where(self.constraint.allowed(), x, np.float32(-np.inf))
        x = apply_penalties(x, history, self.params)
        m = x.max()
        if np.isnan(m):
            raise SamplingError("logits contain NaN")
        if m == -np.inf:
            raise SamplingError("every token's logit is -inf: nothing left to sample"
                                + (" (the grammar allows only tokens that are banned)" if self.constraint else ""))
        if m == np.inf:  # only the +inf tokens can be chosen, uniformly
            x = np.where(x == np.inf, np.float32(0), np.float32(-np.inf))
        return x

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token id for logits (n_vocab,) float32, given the ids generated so far (prompt included
        if the caller wants it penalised). Does not write to `logits`."""
        x = self.logits(logits, history)  # (n_vocab,)
        if self.params.greedy:
            tok = int(np.argmax(x))  # first maximum: ties go to the lowest id
        else:
            ids = filter_candidates(x, self.params)  # (n_cand,), largest logit first
            z = x[ids].astype(np.float64) / self.params.temperature  # (n_cand,)
            cum = np.cumsum(np.exp(z - z[0]))  # (n_cand,) unnormalised CDF
            i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
            tok = int(ids[min(i, ids.size - 1)])
        if self.constraint is not None:
            self.constraint.consume(tok)
        return tok


def logprobs(logits: np.ndarray, token: int, n_top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of `token` under logits (n_vocab,) (softmax at temperature 1,
    before any sampling filter, as OpenAI reports them) and the `n_top` most likely tokens with
    theirs, most likely first."""
    x32 = np.asarray(logits, dtype=np.float32)  # (n_vocab,)
    x = x32.astype(np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    top = _top_sorted(x32, n_top) if n_top else np.zeros(0, np.int64)
    return float(x[token] - lse), tuple((int(i), float(x[i] - lse)) for i in top)


class StopMatcher:
    """Cuts streamed text at the first stop string.

    `feed(piece)` returns (text safe to emit now, stopped). Text that could be the start of a stop string
    is held back until the next piece decides it; on a hit the stop string and everything after it are
    dropped. `flush()` returns what is still held back once the stream ends.
    """

    def __init__(self, stops: Sequence[str] = ()):
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        if not all(isinstance(s, str) and s for s in stops):
            raise SamplingError(f"stop strings must be non-empty strings, got {stops!r}")
        self.stops = stops
        self.stopped = False
        self._held = ""

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def feed(self, piece: str) -> tuple[str, bool]:
        """Take the next piece of text; return (text to emit, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)], True
        cut = len(text) - self._partial(text)
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """The held-back text, once no more pieces will come (empty after a stop)."""
        rest, self._held = self._held, ""
        return rest
