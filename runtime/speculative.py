"""Speculative decoding: cheap proposals, checked by one target pass over all of them.

    prop = NgramLookup(3)                      # or DraftModel(draft_engine, target_engine)
    drafts = prop.propose(history, k)          # up to k token ids that may come next
    n_ok, nxt = accept(sampler, logits, drafts, history)

The target evaluates [pending] + drafts in one forward pass (its weights are read once for all of
them) and `accept` keeps the longest prefix of drafts the target would have produced itself:

- greedy: draft i is kept iff it is the argmax of the target's logits after drafts < i (penalties
  included), and the first disagreement gives the target's own token. The kernels give a token
  the same bits whatever shares its batch (kernels_cpu), so the ids equal plain decoding's.
- sampling: proposals are deterministic (a lookup, or the draft model's argmax), i.e. q is a
  point mass at x. Draft x is kept with probability p(x); on rejection the token is drawn from p
  with x removed and renormalised, which is the standard accept/reject rule
  (max(p - q, 0) normalised) for that q: every emitted token is distributed exactly as p.

`NgramLookup` is llama.cpp's prompt-lookup idea: the last n tokens (n down to 1) matched against
the prompt and the output so far, proposing what followed the most recent match.
`DraftModel` runs a second, smaller model with the same vocabulary greedily.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import EdgeLLMError
from .sampler import Sampler, filter_candidates

MAX_DRAFT = 15  # verification batches stay within the kernels' per-query attention (ops.DECODE_T)


class NgramLookup:
    """Propose what followed the most recent earlier occurrence of the last n..1 tokens."""

    def __init__(self, n: int):
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
            raise EdgeLLMError(f"lookup must be 1..16 tokens, not {n!r}")
        self.n = n

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        h = np.asarray(history, dtype=np.int64)
        for m in range(min(self.n, len(h) - 1), 0, -1):
            pat = h[-m:]
            # starts j < len - m with h[j:j+m] == pat, the most recent first
            cand = np.flatnonzero(h[: len(h) - m] == pat[0])
            for j in cand[::-1]:
                if j + m < len(h) and np.array_equal(h[j:j + m], pat):
                    return h[j + m: j + m + k].tolist()
        return []

    def prepare(self, prompt: Sequence[int]) -> None:
        pass

    def close(self) -> None:
        pass


class DraftModel:
    """A smaller model of the same vocabulary drafting greedily; its KV cache follows the target's
    accepted tokens (Engine.prefill reuses the common prefix and rolls the rest back)."""

    def __init__(self, engine, target):
        if engine.config.n_vocab != target.config.n_vocab or engine.tokenizer.tokens != target.tokenizer.tokens:
            engine.close()
            raise EdgeLLMError(f"the draft model {engine.path.name} has another vocabulary than {target.path.name}: "
                               "a draft must share the target's tokens")
        self.engine = engine

    def prepare(self, prompt: Sequence[int]) -> None:
        """Read the prompt (with the target's prompt, before generation starts)."""
        self.engine.prefill(list(prompt))

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        e = self.engine
        if len(history) + k > e.n_ctx:
            return []
        logits = e.prefill(list(history))
        out = []
        for i in range(k):
            t = int(np.argmax(logits))
            out.append(t)
            if i + 1 < k:
                logits = e.decode_one(t)
        return out

    def close(self) -> None:
        self.engine.close()


def accept(sampler: Sampler, logits: np.ndarray, drafts: Sequence[int], history: Sequence[int]) -> tuple[int, int]:
    """logits (len(drafts) + 1, n_vocab): the target's after each prefix of drafts. Returns (how
    many drafts are kept, the token that follows them)."""
    hist = list(history)
    for i, x in enumerate(drafts):
        x = int(x)
        if sampler.params.greedy:
            y = sampler.sample(logits[i], hist)
            if y != x:
                return i, y
        else:
            ids, p = probabilities(sampler, logits[i], hist)
            at = np.flatnonzero(ids == x)
            px = float(p[at[0]]) if at.size else 0.0
            if sampler.rng.random() >= px:  # rejected: draw from p without x
                if at.size:
                    p = p.copy()
                    p[at[0]] = 0.0
                return i, _draw(sampler, ids, p)
        hist.append(x)
    return len(drafts), sampler.sample(logits[len(drafts)], hist)


def probabilities(sampler: Sampler, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The distribution `sampler.sample` draws from: (candidate ids, float64 probabilities)."""
    x = sampler.logits(logits, history)
    ids = filter_candidates(x, sampler.params)
    z = x[ids].astype(np.float64) / sampler.params.temperature
    p = np.exp(z - z[0])
    return ids, p / p.sum()


def _draw(sampler: Sampler, ids: np.ndarray, p: np.ndarray) -> int:
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, sampler.rng.random() * cum[-1], side="right"))
    return int(ids[min(i, ids.size - 1)])


class Controller:
    """How many tokens to propose next, chosen by what each choice has delivered in this run:
    an exponential average of tokens emitted per second (proposal and target pass) for each draft
    length in a ladder (0, 1, 3, 7, 15 up to k_max, and k_max), each tried once, then the best, with
    a neighbour tried every PROBE passes (acceptance changes along a generation: a copied stretch,
    then new text). 0 is plain decoding, so a proposer that does not pay is not used. The lengths
    make passes of 2, 4, 8, 16 tokens, the row kernels' widths: a pass of 3 or 5 runs as 2 + 1 or
    4 + 1 (Zen 4, qwen 1.5B's matmuls per pass of T tokens over T = 1: 1.15x at 2, 1.87x at 4,
    3.6x at 8). Counts for -v/--json."""

    PROBE = 8

    def __init__(self, k_max: int):
        if not isinstance(k_max, int) or isinstance(k_max, bool) or not 1 <= k_max <= MAX_DRAFT:
            raise EdgeLLMError(f"draft-max must be 1..{MAX_DRAFT}, not {k_max!r}")
        self.ladder = sorted({0, k_max} | {k for k in (1, 3, 7, 15) if k < k_max})
        self.rate: dict[int, float] = {}  # draft length -> tokens per second (average)
        self.k = k_max  # the length the next pass proposes
        self.drafted = self.accepted = self.passes = 0

    def update(self, k: int, n_drafted: int, n_ok: int, seconds: float) -> None:
        """A pass that asked for k drafts, got n_drafted and kept n_ok, in `seconds`."""
        self.drafted += n_drafted
        self.accepted += n_ok
        self.passes += 1
        r = (n_ok + 1) / max(seconds, 1e-9)
        if k in self.ladder:  # (near the end of the context k can be cut to another length)
            self.rate[k] = r if k not in self.rate else 0.7 * self.rate[k] + 0.3 * r
        if not self.rate:
            return
        untried = [c for c in reversed(self.ladder) if c not in self.rate]
        best = max(self.rate, key=self.rate.get)
        if untried:
            self.k = untried[0]
        elif self.passes % self.PROBE == 0:  # a neighbour of the best, up and down in turn
            i = self.ladder.index(best)
            up = (self.passes // self.PROBE) % 2 == 0
            self.k = self.ladder[i + 1 if (up or i == 0) and i + 1 < len(self.ladder) else max(0, i - 1)]
        else:
            self.k = best

    def report(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                "target_passes": self.passes}
