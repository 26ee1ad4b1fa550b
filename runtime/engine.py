"""A loaded model ready to generate: file, tokenizer, architecture, kernels, KV-cache state.

    eng = Engine.load("gemma3-270m", RuntimeConfig(threads=2))
    for ev in eng.generate(eng.tokenizer.encode("Hello"), SamplingParams(temperature=0)):
        print(ev.text, end="")

`prefill` runs prompt tokens through the model in chunks of `chunk` tokens (reusing the longest
prefix already in the KV cache), `decode_one` one token; `generate` yields an event per token.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import EdgeLLMError
from ..loaders.gguf import GGUFFile
from . import gemma3, llama  # noqa: F401  (register the architectures)
from .config import RuntimeConfig
from .kv_cache import RingCache, make_caches
from .model import model_class
from .sampler import Sampler, SamplingParams, StopMatcher, logprobs
from .tokenizer import StreamDecoder, Tokenizer
from ..offload import StreamingWeights
from .weights import Weights

GPU_BACKENDS = ("cuda", "cuda-mirror")  # runtime/gpu.py

# Prompt tokens per forward pass over resident weights, at most: as fast as 512 here (Zen 2, 2
# threads, pp512: qwen 1.5B 48.7 tok/s vs 48.0, gemma 450 vs 439) with half the activation buffers
# (qwen 0.5B: 25 MiB less peak RSS). Streamed or clustered weights take n_batch: each pass reads
# every weight from disk or costs round trips.
MICRO_BATCH = 256


def select_kernels(backend: str | None, threads: int | str):
    """The kernel table (kernels_cpu.linear, or runtime/gpu.py's for cuda), with a bad backend
    as a one-line user error."""
    from ..kernels_cpu import linear

    if backend in GPU_BACKENDS:
        from .gpu import open_kernels
        return open_kernels(backend)
    try:
        return linear.select(backend or None, threads)
    except ValueError as e:
        also = f" (or {', '.join(GPU_BACKENDS)})" if backend else ""
        raise EdgeLLMError(f"{e}{also}") from None


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would include a parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Event:
    """One generated token: its id, the text it completes (may be empty), running speed."""

    token: int
    text: str
    tokens_per_s: float
    finish_reason: str | None = None  # "stop" (end of generation or stop string), "length", or None
    logprob: float | None = None  # with SamplingParams.logprobs: the token's log-probability
    top_logprobs: tuple[tuple[int, float], ...] = ()  # and the most likely (id, log-probability) pairs


@dataclass
class Stats:
    prompt_tokens: int = 0  # tokens actually processed (after KV-cache reuse)
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    ttft_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    peak_rss_bytes: int = 0
    ids: list[int] = field(default_factory=list)
    compute_s: float = 0.0  # time in forward passes not spent waiting for streamed weights
    io_wait_s: float = 0.0  # time waiting for streamed weights (0 without a memory budget)
    bytes_read: int = 0  # weight bytes read from disk by those passes
    steps: list[dict] = field(default_factory=list)  # per forward pass: tokens, compute_s, io_wait_s, bytes_read
    speculative: dict | None = None  # drafted, accepted, acceptance, target_passes (speculative decoding)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s > 0 else 0.0


class Engine:
    def __init__(self, path: Path, rcfg: RuntimeConfig):
        self.path = Path(path)
        self.rcfg = rcfg
        self.file = GGUFFile(path)
        self.weights = None  # the weight store (None for a cluster)
        self.proposer = None  # speculative decoding (runtime/speculative.py), when rcfg asks for it
        self.placement = None  # the cuda backend's (runtime/gpu.py)
        self._host = None  # logits from the device to the host (the cuda backend)
        self.draft_bytes = 0  # what a resident draft model takes out of a memory budget
        try:
            arch = self.file.metadata.get("general.architecture")
            cls = model_class(arch)
            self.config = cls.config(self.file)
            self.tokenizer = Tokenizer.from_metadata(self.file.metadata)
            self.proposer, rcfg = self._proposer(rcfg)
            self.rcfg = rcfg
            self.plan, units = self._plan(rcfg)  # a memory budget: offload/ streams what does not fit
            rcfg = self.rcfg  # (with the context fitted to the budget, when rcfg.fit_ctx)
            if self.plan is not None:
                rcfg = self.rcfg = replace(rcfg, n_batch=self.plan.n_batch)
            kern = select_kernels(rcfg.backend, rcfg.threads)
            self.ops, self.backend, self._rest = kern.ops, kern.describe, kern.rest
            if rcfg.backend in GPU_BACKENDS:
                self._load_gpu(cls, kern, rcfg)
            elif rcfg.cluster:  # tensor parallel over the LAN: runtime/cluster shards the model from outside
                from .cluster import ClusterModel

                self.model = ClusterModel(self.path, self.file, cls, self.config, rcfg, self.ops, kern.make_linear)
            else:
                weights = (StreamingWeights(self.file, self.plan, units, kern.make_linear) if self.plan is not None
                           else Weights(self.file, kern.make_linear, kern.make_group))
                self.weights = weights
                self.model = cls(self.config, rcfg, weights, self.ops)
                weights.load_all()
        except BaseException:
            if hasattr(self.weights, "close"):
                self.weights.close()
            if self.proposer is not None:
                self.proposer.close()
            self.file.close()
            raise
        self.n_ctx = self.model.n_ctx
        self.chunk = rcfg.n_batch if self.plan is not None or rcfg.cluster else min(rcfg.n_batch, MICRO_BATCH)
        self.tokens: list[int] = []  # tokens whose K/V are in the cache, positions 0..len-1
        self.n_written = 0  # highest position + 1 written since reset (an interrupted pass writes some)
        self.stats = Stats()
        if rcfg.sparsity:
            try:
                self._sparsify(rcfg)
            except BaseException:
                self.close()
                raise

    def _load_gpu(self, cls, kern, rcfg: RuntimeConfig) -> None:
        """The cuda backend (runtime/gpu.py): blocks placed on the GPU (streamed there under
        --gpu-memory-budget) or, past --gpu-layers, on the CPU kernels; logits come back to the host."""
        from . import gpu

        gpu.check(rcfg)
        cpu = None
        if rcfg.gpu_layers is not None and rcfg.gpu_layers < self.config.n_layer:
            cpu = select_kernels(None, rcfg.threads)  # the default CPU kernels
            self._rest = cpu.rest
        self.placement = gpu.Placement(self.file, self.config, rcfg, kern, cpu, rcfg.gpu_layers, rcfg.gpu_memory_budget)
        self.weights = self.placement
        self.model = cls(self.config, rcfg, self.placement, kern.ops)
        self.placement.install(self.model)
        self.placement.load_all()
        self._host = kern.host
        self.backend = f"{kern.describe}; {self.placement.describe()}"

    def _sparsify(self, rcfg: RuntimeConfig) -> None:
        """Install the activation-sparse FFN (runtime/sparsity.py), calibrating on first use."""
        from . import sparsity

        if self.plan is not None:
            raise sparsity.SparsityError("sparsity does not run with streamed weights yet; give more memory")
        sparsity.check_model(self.model)
        cal = sparsity.calibration(self, rcfg.sparsity_calib, progress=sparsity.bar("calibrating sparsity"))
        self.model.sparse = sparsity.Sparse(self.model, cal, rcfg.sparsity)

    @classmethod
    def load(cls, model: str, rcfg: RuntimeConfig | None = None, progress=None) -> "Engine":
        from ..loaders.store import resolve

        return cls(resolve(model, progress=progress), rcfg or RuntimeConfig())

    def close(self) -> None:
        if self.proposer is not None:
            self.proposer.close()
            self.proposer = None
        if hasattr(self.model, "close"):  # a cluster says goodbye to its workers
            self.model.close()
        if hasattr(self.weights, "close"):  # a streaming store stops its I/O threads
            self.weights.close()
        self.file.close()

    def _proposer(self, rcfg: RuntimeConfig):
        """Speculative decoding's proposer (or None), and the config the target runs with: under a
        memory budget a draft model stays resident and the target's weights get what is left."""
        from . import speculative as sp

        if rcfg.lookup:
            return sp.NgramLookup(rcfg.lookup), rcfg
        if not rcfg.draft:
            return None, rcfg
        from ..loaders.store import resolve

        draft = Engine(resolve(rcfg.draft), replace(rcfg, draft=None, memory_budget=None, sparsity=0.0))
        prop = sp.DraftModel(draft, self)  # refuses (and closes) a draft with another vocabulary
        if rcfg.memory_budget is None:
            return prop, rcfg
        need = draft.path.stat().st_size + sum(c.nbytes for c in draft.model.caches)
        left = rcfg.memory_budget - need
        if left <= 0:
            prop.close()
            raise EdgeLLMError(f"the draft model {draft.path.name} needs about {need / 1e6:,.0f} MB resident, "
                               f"more than --memory-budget {rcfg.memory_budget / 1e6:,.0f} MB")
        self.draft_bytes = need
        return prop, replace(rcfg, memory_budget=left)

    def _plan(self, rcfg: RuntimeConfig):
        """(plan, units) when weights must stream (a budget, or a model larger than the memory
        left), else (None, None)."""
        if rcfg.cluster or rcfg.backend in GPU_BACKENDS:
            return None, None
        from .. import offload

        budget = rcfg.memory_budget
        if budget is None:
            budget = offload.auto_budget(self.file, self.config, rcfg.n_ctx, rcfg.n_batch, cache_type=rcfg.cache_type,
                                         n_seq=rcfg.parallel)
        if budget is None:
            return None, None
        from ..kernels_cpu.qmatmul import tile_rows

        if rcfg.fit_ctx:  # no context asked for: the longest that fits, said in one line
            n = offload.fit_context(self.file, self.config, rcfg.n_ctx, rcfg.n_batch, rcfg.max_threads, budget,
                                    row_align=tile_rows, cache_type=rcfg.cache_type, n_seq=rcfg.parallel)
            if n < min(rcfg.n_ctx, self.config.n_ctx_train):
                import sys
                print(f"edgellm: a context of {rcfg.n_ctx} tokens does not fit a memory budget of "
                      f"{offload.fmt(budget)}; using {n} (--ctx sets it)", file=sys.stderr)
                rcfg = self.rcfg = replace(rcfg, n_ctx=n, n_batch=min(rcfg.n_batch, n))
        return offload.plan_for(self.file, self.config, rcfg.n_ctx, rcfg.n_batch, rcfg.max_threads, budget,
                                row_align=tile_rows, cache_type=rcfg.cache_type, n_seq=rcfg.parallel)

    # --- the forward passes ---

    def reset(self) -> None:
        self.tokens = []
        self.n_written = 0

    def reusable(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` the KV cache already holds (leaving one to evaluate)."""
        n = min(common_prefix(self.tokens, ids), len(ids) - 1)
        for c in self.model.caches:
            if isinstance(c, RingCache) and c.ring and not c.can_rewind_to(n, self.n_written):
                return 0
        return max(n, 0)

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Bring the cache to exactly `ids`; logits of the last token (or of every new one)."""
        if not ids:
            raise EdgeLLMError("the prompt is empty")
        if len(ids) > self.n_ctx:
            raise EdgeLLMError(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}")
        begin = getattr(self.model, "begin_request", None)  # a cluster re-admits nodes that came back
        if begin is not None:
            begin()
        keep = 0 if all_logits else self.reusable(ids)
        self.tokens = list(ids[:keep])
        self.stats.cached_tokens = keep
        out = []
        for s in range(keep, len(ids), self.chunk):
            batch = ids[s : s + self.chunk]
            last = s + len(batch) == len(ids)
            self.n_written = max(self.n_written, s + len(batch))
            logits = self._forward(np.asarray(batch), s, all_logits)
            self.tokens.extend(batch)
            if all_logits or last:
                out.append(logits)
        return np.concatenate(out) if all_logits else out[-1][-1]

    def _forward(self, ids: np.ndarray, start: int, all_logits: bool = False) -> np.ndarray:
        """model.forward, with telemetry: compute time, and for streamed weights the time waiting
        for them and the bytes read, per pass in `stats.steps` (only then: it grows per token)."""
        tel = getattr(self.weights, "telemetry", None)
        before = None if tel is None else dict(tel)
        t0 = time.perf_counter()
        try:
            logits = self.model.forward(ids, start, all_logits=all_logits)
            if self._host is not None:
                logits = self._host(logits)
        finally:
            self._rest()  # kernel threads sleep until the next pass: an idle engine takes no CPU
        wall = time.perf_counter() - t0
        st = self.stats
        if tel is None:
            st.compute_s += wall
            return logits
        after = self.weights.telemetry
        io = after["io_wait_s"] - before["io_wait_s"]
        step = {"tokens": int(ids.shape[0]), "compute_s": wall - io, "io_wait_s": io,
                "bytes_read": after["bytes_read"] - before["bytes_read"]}
        st.steps.append(step)
        st.compute_s += step["compute_s"]
        st.io_wait_s += io
        st.bytes_read += step["bytes_read"]
        return logits

    def decode_one(self, token: int) -> np.ndarray:
        """Append one token; logits (n_vocab,) for the next."""
        if len(self.tokens) >= self.n_ctx:
            raise EdgeLLMError(f"context full ({self.n_ctx} tokens)")
        self.n_written = max(self.n_written, len(self.tokens) + 1)
        logits = self._forward(np.asarray([token]), len(self.tokens))
        self.tokens.append(token)
        return logits[-1]

    def verify(self, ids: Sequence[int]) -> np.ndarray:
        """Append ids (a pending token and drafts) in one pass; logits (len(ids), n_vocab) after
        each. `rollback(n)` then drops what was not accepted."""
        n0 = len(self.tokens)
        if n0 + len(ids) > self.n_ctx:
            raise EdgeLLMError(f"context full ({self.n_ctx} tokens)")
        self.n_written = max(self.n_written, n0 + len(ids))
        logits = self._forward(np.asarray(ids), n0, all_logits=True)
        self.tokens.extend(ids)
        return logits

    def rollback(self, n: int) -> None:
        """Keep the first n tokens of the cache (rows past them are rewritten before being read;
        a ring holds window + n_batch - 1 rows, and drafts are fewer than n_batch)."""
        del self.tokens[n:]

    # --- generation ---

    def _plain(self, logits, sampler, history):
        """(token, the logits it was sampled from), one decode step at a time."""
        while True:
            tok = sampler.sample(logits, history)
            history.append(tok)
            yield tok, logits
            logits = self.decode_one(tok)

    def _speculative(self, logits, sampler, history, st):
        """Tokens from proposals checked by one target pass each (runtime/speculative.py): the
        same ids as _plain when greedy, the same distribution when sampling."""
        from .speculative import Controller, accept

        ctl = Controller(self.rcfg.draft_max)
        tok = sampler.sample(logits, history)
        history.append(tok)
        try:
            yield tok, None
            while True:
                room = self.n_ctx - len(self.tokens) - 1
                k = min(ctl.k, room)
                t = time.perf_counter()  # the proposal's cost counts: a draft model's passes
                drafts = self.proposer.propose(history, k)[:k] if k > 0 else []
                n0 = len(self.tokens)
                out = self.verify([tok] + drafts)
                seconds = time.perf_counter() - t
                n_ok, tok = accept(sampler, out, drafts, history)
                ctl.update(k, len(drafts), n_ok, seconds)
                self.rollback(n0 + 1 + n_ok)
                for x in drafts[:n_ok]:
                    history.append(x)
                    yield x, None
                history.append(tok)
                yield tok, None
        finally:
            st.speculative = ctl.report()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """Prefill `prompt_ids`, then sample until end of generation, a stop string, the end of
        the grammar (`params.grammar`) or a limit."""
        turn = Turn(self, prompt_ids, params)  # a bad grammar fails before the prefill
        st = self.stats = turn.stats
        logits = self.prefill(list(prompt_ids))
        if self.proposer is not None:
            self.proposer.prepare(prompt_ids)  # a draft model reads the prompt too
        turn.prefilled(st.cached_tokens)
        history = list(prompt_ids)
        plain = self.proposer is None or turn.constraint is not None or params.logprobs is not None
        tokens = (self._plain(logits, turn.sampler, history) if plain
                  else self._speculative(logits, turn.sampler, history, st))
        try:
            for tok, step_logits in tokens if turn.limit > 0 else ():
                ev = turn.event(tok, step_logits)
                yield ev
                if ev.finish_reason:
                    break
            st.gen_s = time.perf_counter() - turn.t_gen
        finally:  # also when the caller stops reading early: /stats sees real figures
            tokens.close()
            st.peak_rss_bytes = peak_rss_bytes()

    # --- several sequences (runtime/batch.py) ---

    def new_sequence(self) -> "KVSequence":
        """An empty sequence with caches of its own (the engine's own is the one in use)."""
        if self.placement is not None:
            return KVSequence(self.placement.make_caches(self.rcfg, self.n_ctx))
        return KVSequence(make_caches(self.config, self.rcfg, self.n_ctx, self.ops))

    def switch(self, seq: "KVSequence") -> "KVSequence":
        """Make `seq` the sequence prefill / decode_one work on; returns the one it replaces."""
        old = KVSequence(self.model.caches, self.tokens, self.n_written)
        self.model.caches, self.tokens, self.n_written = seq.caches, seq.tokens, seq.n_written
        return old

    def decode_rows(self, seqs: list["KVSequence"], tokens: Sequence[int]) -> np.ndarray:
        """Append tokens[r] to seqs[r] (none of them in use), all in one pass: logits (B, n_vocab),
        row r the bits decode_one would give for its sequence alone."""
        for s in seqs:
            if len(s.tokens) >= self.n_ctx:
                raise EdgeLLMError(f"context full ({self.n_ctx} tokens)")
        positions = np.asarray([len(s.tokens) for s in seqs], np.int64)
        t0 = time.perf_counter()
        try:
            logits = self.model.forward_rows(np.asarray(tokens, np.int64), positions, [s.caches for s in seqs])
            if self._host is not None:
                logits = self._host(logits)
        finally:
            self._rest()
        self.stats.compute_s += time.perf_counter() - t0
        for s, t in zip(seqs, tokens):
            s.tokens.append(int(t))
            s.n_written = max(s.n_written, len(s.tokens))
        return logits


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading ids a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class KVSequence:
    """One sequence's KV caches and the tokens they hold (see Engine.switch)."""

    caches: list
    tokens: list[int] = field(default_factory=list)
    n_written: int = 0


class Turn:
    """One generation's state after its prompt: sampler (with its grammar), text decoding, stop
    strings, limits and stats; `event(token, logits)` turns each sampled token into an Event."""

    def __init__(self, engine: Engine, prompt_ids: Sequence[int], params: SamplingParams):
        self.constraint = None
        if params.grammar is not None:
            from .grammar import Constraint
            self.constraint = Constraint(engine.tokenizer, engine.config.n_vocab, params.grammar)
        self.params, self.tokenizer = params, engine.tokenizer
        self.stats = Stats()
        self.t0 = self.t_gen = time.perf_counter()
        self.n_prompt = len(prompt_ids)
        self.sampler = Sampler(params, engine.config.n_vocab, sorted(engine.tokenizer.eog_ids), self.constraint)
        self.decoder = StreamDecoder(engine.tokenizer)
        self.stops = StopMatcher(params.stop)
        self.limit = engine.n_ctx - len(prompt_ids)
        if params.max_tokens >= 0:
            self.limit = min(self.limit, params.max_tokens)
        self.n = 0

    def prefilled(self, cached: int) -> None:
        """The prompt is in the cache (`cached` of its tokens were there already)."""
        st = self.stats
        st.cached_tokens = cached
        st.prompt_tokens = self.n_prompt - cached
        self.t_gen = time.perf_counter()
        st.prompt_s = self.t_gen - self.t0

    def event(self, tok: int, step_logits: np.ndarray | None) -> Event:
        """The Event of sampled token `tok` (from `step_logits`, needed for logprobs); its
        finish_reason is set when the generation ends with it."""
        params, st = self.params, self.stats
        lp = {}
        if params.logprobs is not None:
            lp = dict(zip(("logprob", "top_logprobs"), logprobs(step_logits, tok, params.logprobs)))
        self.n += 1
        now = time.perf_counter()
        if self.n == 1:
            st.ttft_s = now - self.t0
        st.gen_tokens, st.gen_s = self.n, now - self.t_gen
        st.ids.append(tok)
        stops, decoder = self.stops, self.decoder
        if self.tokenizer.is_eog(tok) and not params.ignore_eos:
            text, _ = stops.feed(decoder.flush())
            return Event(tok, text + stops.flush(), st.tokens_per_s, "stop", **lp)
        text, hit = stops.feed(decoder.feed(tok))
        if hit:
            return Event(tok, text, st.tokens_per_s, "stop", **lp)
        done = self.constraint is not None and self.constraint.stopped  # the grammar is complete
        if self.n >= self.limit or done:
            text += stops.feed(decoder.flush())[0] + stops.flush()
            return Event(tok, text, st.tokens_per_s, "stop" if done else "length", **lp)
        return Event(tok, text, st.tokens_per_s, **lp)
