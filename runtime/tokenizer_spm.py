"""SentencePiece-style tokenizer (GGUF tokenizer model "llama"), as llama.cpp's `llm_tokenizer_spm_session`.

Spaces become U+2581; the text is split into code points; adjacent pairs whose concatenation is a token are
merged, highest score first (ties: leftmost), until none is left; symbols that are not tokens fall back to
their UTF-8 bytes as `<0xXX>` tokens.

Speed-up that keeps the result exact: the merges never cross a boundary that no vocabulary token spans, so
the text is cut before every U+2581 that no token has in its interior after the preceding character, and
each piece ("▁word", mostly) is merged on its own and cached.
"""

import heapq
import re

SPACE = "\u2581"
_CACHE_LIMIT = 200_000


class SPM:
    def __init__(self, vocab: dict[str, int], scores: list[float], byte_ids: list[int], tokens: list[str]):
        self.vocab = vocab
        self.scores = scores              # (n_vocab,) token score as Python float
        self.byte_ids = byte_ids          # (256,) byte -> id of its <0xXX> token
        self.tokens = tokens
        self.cache: dict[str, list[int]] = {}
        self._splitter: re.Pattern | None = None

    def encode(self, text: str) -> list[int]:
        """Tokenize one raw-text fragment whose spaces are already escaped as U+2581."""
        if self._splitter is None:
            self._splitter = self._make_splitter()
        out: list[int] = []
        cache = self.cache
        for piece in self._splitter.split(text):
            if not piece:
                continue
            ids = cache.get(piece)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                ids = cache[piece] = self._merge(piece)
            out += ids
        return out

    def _make_splitter(self) -> re.Pattern:
        # Characters that some token holds right before an interior U+2581: no cut after them.
        joined = "\x00".join(self.tokens)
        glue = sorted(set(re.findall("([^\x00])(?=" + SPACE + ")", joined)))
        if not glue:
            return re.compile("(?=" + SPACE + ")")
        return re.compile("(?<![" + "".join(re.escape(c) for c in glue) + "])(?=" + SPACE + ")")

    def _merge(self, text: str) -> list[int]:
        vocab, scores = self.vocab, self.scores
        get = vocab.get
        n = len(text)
        length = [1] * n                      # (n,) symbol length; symbol i starts at char i, 0 once merged away
        prev = list(range(-1, n - 1))         # (n,) previous live symbol or -1
        nxt = [*range(1, n), -1]              # (n,) next live symbol or -1
        heap = []
        for i in range(n - 1):
            tid = get(text[i:i + 2])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)

        def push(a: int, b: int) -> None:
            size = length[a] + length[b]
            tid = get(text[a:a + size])
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], a, b, size))

        while heap:
            _, a, b, size = heapq.heappop(heap)
            la, lb = length[a], length[b]
            if la == 0 or lb == 0 or la + lb != size:
                continue                      # stale: one side merged since this pair was queued
            length[a], length[b] = size, 0
            c = nxt[a] = nxt[b]
            if c >= 0:
                prev[c] = a
            if prev[a] >= 0:
                push(prev[a], a)
            if c >= 0:
                push(a, c)

        out: list[int] = []
        byte_ids = self.byte_ids
        i = 0
        while i >= 0:
            sym = text[i:i + length[i]]
            tid = get(sym)
            if tid is not None:
                out.append(tid)
            else:                             # only single code points can miss: byte fallback
                out += [byte_ids[b] for b in sym.encode("utf-8", "surrogatepass")]
            i = nxt[i]
        return out
