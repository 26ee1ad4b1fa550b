"""Parallel generations over one engine (`edgellm serve --parallel N`): continuous batching.

    b = Batcher(engine, n_slots=4)
    for ev in b.submit(prompt_ids, params):   # from any thread; events as the tokens come
        ...
    b.close()

One scheduler thread owns the engine. Each of the N slots is a sequence with KV caches of its own
(Engine.new_sequence). A new request takes a free slot and its prompt is prefilled one
chunk at a time, each chunk followed by a decode pass of the other slots (a long prompt delays
their tokens, it does not stop them); then it joins the decode batch, where every active slot adds
one token per pass: one read of the weights serves them all, which is where the speed comes from on a
memory-bound CPU. A token's logits are the bits a lone generation would give it (the products
are batch-invariant and attention runs per sequence), so greedy replies do not depend on what
else is being served. A slot keeps its cache after a request: a later prompt sharing its prefix
(the same conversation) reuses it. Requests beyond the free slots wait their turn in order.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence

from ..errors import EdgeLLMError
from .engine import Engine, Event, KVSequence, Stats, Turn, common_prefix, peak_rss_bytes
from .sampler import SamplingParams

MAX_SLOTS = 16  # the sparse FFN and attention treat up to 16 tokens as separate decode steps


class _Request:
    def __init__(self, ids: list[int], turn: Turn):
        self.ids, self.turn = ids, turn  # the turn: its sampler (grammar), stop strings, limits, stats
        self.events: queue.Queue = queue.Queue()  # Event, an exception, or None at the end
        self.cancelled = False
        self.history: list[int] = []  # prompt and generated ids (penalties look at them)
        self.next: int | None = None  # the sampled token the next pass feeds
        self.done = 0  # prompt tokens in the slot's cache so far
        self.cached: int | None = None  # of them, the ones the slot held before (after the first chunk)


class Batcher:
    """N slots of generation over `engine`, scheduled by one thread."""

    def __init__(self, engine: Engine, n_slots: int):
        if not 1 <= n_slots <= MAX_SLOTS:
            raise EdgeLLMError(f"parallel must be 1..{MAX_SLOTS}, not {n_slots}")
        self.engine = engine
        own = KVSequence(engine.model.caches, engine.tokens, engine.n_written)  # slot 0: the engine's caches,
        engine.model.caches, engine.tokens, engine.n_written = [], [], 0  # which it holds only while switched in
        self.slots = [own] + [engine.new_sequence() for _ in range(n_slots - 1)]
        self.busy: dict[int, _Request] = {}  # slot index -> its request
        self.waiting: deque[_Request] = deque()
        self.cv = threading.Condition()
        self.closed = False
        self.last_stats = Stats()  # of the latest finished request
        self.thread = threading.Thread(target=self._loop, name="edgellm-batch", daemon=True)
        self.thread.start()

    def submit(self, ids: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """Events of one generation; closing the iterator early cancels it (its slot is freed at
        the next pass). Errors of the generation are raised from the iterator."""
        req = _Request(list(ids), Turn(self.engine, ids, params))  # a bad grammar fails here, in the caller
        with self.cv:
            if self.closed:
                raise EdgeLLMError("the server is shutting down")
            self.waiting.append(req)
            self.cv.notify()
        return self._events(req)

    def _events(self, req: _Request) -> Iterator[Event]:
        try:
            while True:
                item = req.events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self.cv:
                req.cancelled = True
                if req in self.waiting:
                    self.waiting.remove(req)
                self.cv.notify()

    def reset(self) -> None:
        """Forget what the idle slots' caches hold."""
        with self.cv:
            for i, s in enumerate(self.slots):
                if i not in self.busy:
                    s.tokens.clear()
                    s.n_written = 0

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join()

    # --- the scheduler thread ---

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.closed and not self.waiting and not self.busy:
                    self.cv.wait()
                if self.closed:
                    for r in list(self.waiting) + list(self.busy.values()):
                        r.events.put(EdgeLLMError("the server is shutting down"))
                    return
                free = [i for i in range(len(self.slots)) if i not in self.busy]
                while free and self.waiting:
                    req = self.waiting.popleft()
                    if not req.cancelled:
                        self._slot_for(req, free)
            with self.cv:
                prefilling = [(i, r) for i, r in self.busy.items() if r.done < len(r.ids) and not r.cancelled]
            for slot, req in prefilling:
                self._prefill_chunk(slot, req)
            self._step()

    def _slot_for(self, req: _Request, free: list[int]) -> None:
        """Give `req` the free slot whose cached tokens share the longest prefix with its prompt."""
        best = max(free, key=lambda i: common_prefix(self.slots[i].tokens, req.ids))
        free.remove(best)
        self.busy[best] = req

    def _prefill_chunk(self, slot: int, req: _Request) -> None:
        """Bring the slot's cache one chunk further into the prompt (the first chunk
        starts after what the slot already holds of it); after the last, sample the first token.
        The chunks are the ones a lone prefill runs, so the results are its bits."""
        eng = self.engine
        try:
            old = eng.switch(self.slots[slot])
            try:
                eng.stats = req.turn.stats
                keep = eng.reusable(req.ids) if req.cached is None else req.done
                end = min(len(req.ids), keep + eng.chunk)
                logits = eng.prefill(req.ids[:end])
                req.cached = eng.stats.cached_tokens if req.cached is None else req.cached
                req.done = end
            finally:
                self.slots[slot] = eng.switch(old)
            if end < len(req.ids):
                return
            req.turn.prefilled(req.cached)
            req.history = list(req.ids)
            if req.turn.limit <= 0:
                self._finish(slot, req)
                return
            self._emit(slot, req, logits)
        except BaseException as e:  # noqa: BLE001  (delivered to the request's reader)
            self._fail(slot, req, e)

    def _step(self) -> None:
        """One decode pass over every active slot."""
        with self.cv:
            active = [(i, r) for i, r in self.busy.items() if r.next is not None and not r.cancelled]
            for i, r in list(self.busy.items()):
                if r.cancelled:
                    self._finish(i, r, locked=True)
        if not active:
            return
        try:
            logits = self.engine.decode_rows([self.slots[i] for i, _ in active], [r.next for _, r in active])
        except BaseException as e:  # noqa: BLE001
            for i, r in active:
                self._fail(i, r, e)
            return
        for (i, r), row in zip(active, logits):
            try:
                self._emit(i, r, row)
            except BaseException as e:  # noqa: BLE001
                self._fail(i, r, e)

    def _emit(self, slot: int, req: _Request, logits) -> None:
        """Sample the request's next token from `logits`, send its event, end it if it is the last."""
        tok = req.turn.sampler.sample(logits, req.history)
        req.history.append(tok)
        ev = req.turn.event(tok, logits)
        req.events.put(ev)
        req.next = None if ev.finish_reason else tok
        if ev.finish_reason:
            self._finish(slot, req)

    def _finish(self, slot: int, req: _Request, locked: bool = False) -> None:
        req.turn.stats.peak_rss_bytes = peak_rss_bytes()
        self.last_stats = req.turn.stats
        req.events.put(None)
        if locked:
            self.busy.pop(slot, None)
            return
        with self.cv:
            self.busy.pop(slot, None)

    def _fail(self, slot: int, req: _Request, e: BaseException) -> None:
        req.events.put(e)
        with self.cv:
            self.busy.pop(slot, None)
