"""Byte-level BPE (GGUF tokenizer model "gpt2"): pre-tokenizer regex, GPT-2 byte mapping, merges by rank.

Behaviour follows llama.cpp's `llm_tokenizer_bpe_session`. The qwen2 pre-tokenizer has no hand-written
splitter in llama.cpp, so llama.cpp runs it with std::regex on a "collapsed" copy of the text in which
every non-ASCII code point stands for its class (whitespace, letter, number, other) and `\\s` means the
six ASCII spaces of the C locale. We do the same with Python's `re`, so the words match llama.cpp's.
Classes come from Python's `unicodedata` (Unicode 14 on Python 3.11); llama.cpp's table may be newer, which
only matters for code points assigned since.
"""

import heapq
import re
import unicodedata

# Words are cached with their ids; past this many entries the cache is cleared (bounded memory).
_CACHE_LIMIT = 200_000

# --- GPT-2 byte <-> unicode mapping (printable bytes map to themselves, the rest to U+0100 onwards) ---


def _byte_chars() -> list[str]:
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = [""] * 256
    for b in keep:
        chars[b] = chr(b)
    n = 0
    for b in range(256):
        if not chars[b]:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_CHARS = _byte_chars()                                 # (256,) byte -> one-char str
CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}      # one-char str -> byte
_BYTE_TRANS = {b: c for b, c in enumerate(BYTE_CHARS)}     # for bytes.decode('latin-1').translate


def byte_encode(word: str) -> str:
    """The word's UTF-8 bytes written with one GPT-2 byte character each."""
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_BYTE_TRANS)


def byte_decode(token_text: str) -> bytes:
    """Inverse of `byte_encode` for a vocabulary entry; characters outside the map pass as UTF-8."""
    out = bytearray()
    for c in token_text:
        b = CHAR_BYTES.get(c)
        if b is None:
            out += c.encode("utf-8", "surrogatepass")
        else:
            out.append(b)
    return bytes(out)


# --- pre-tokenizers ---

# Stand-ins for non-ASCII code points in the collapsed text (llama.cpp uses the same byte values).
_WS_STANDIN, _NUM_STANDIN, _LET_STANDIN, _OTHER_STANDIN = "\x0b", "\u00d1", "\u00d2", "\u00d0"
# Non-ASCII code points in llama.cpp's whitespace table (`regex` module's \s).
_NON_ASCII_SPACES = frozenset(map(chr, [0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                        0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))


class _Collapse(dict):
    """str.translate table: ASCII maps to itself, other code points to their class stand-in."""

    def __missing__(self, cp: int) -> str:
        c = chr(cp)
        if cp < 128:
            v = c
        elif c in _NON_ASCII_SPACES:
            v = _WS_STANDIN
        else:
            cat = unicodedata.category(c)[0]
            v = _LET_STANDIN if cat == "L" else _NUM_STANDIN if cat == "N" else _OTHER_STANDIN
        self[cp] = v
        return v


_COLLAPSE = _Collapse()

_S = r"\t\n\x0b\x0c\r "               # std::regex \s in the C locale
_L = r"A-Za-z\u00d2"                   # \p{L} after collapsing
_N = r"0-9\u00d1"                      # \p{N} after collapsing
_QWEN2 = re.compile(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    rf"|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]| ?[^{_S}{_L}{_N}]+[\r\n]*|[{_S}]*[\r\n]+|[{_S}]+(?![^{_S}])|[{_S}]+")

# GGUF `tokenizer.ggml.pre` -> compiled pre-tokenizer (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2, clean_spaces off).
PRE_TOKENIZERS = {"qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}


def split_words(text: str, pattern: re.Pattern) -> list[str]:
    """Pre-tokenize: the regex matches on the collapsed text cut the original text into words."""
    collapsed = text if text.isascii() else text.translate(_COLLAPSE)
    words = []
    pos = 0
    for m in pattern.finditer(collapsed):
        s, e = m.span()
        if s > pos:                      # llama.cpp keeps unmatched text as its own word
            words.append(text[pos:s])
        words.append(text[s:e])
        pos = e
    if pos < len(text):
        words.append(text[pos:])
    return words


# --- merges ---


class BPE:
    """Merges one byte-encoded word at a time, lowest rank first (ties: leftmost), like llama.cpp."""

    def __init__(self, vocab: dict[str, int], merges: list[str], pattern: re.Pattern):
        self.vocab = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}      # "left right" -> rank
        self.pattern = pattern
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for word in split_words(text, self.pattern):
            ids = cache.get(word)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                ids = cache[word] = self._word(byte_encode(word))
            out += ids
        return out

    def _word(self, w: str) -> list[int]:
        vocab, ranks = self.vocab, self.ranks
        if len(w) == 1:
            return self._lookup(w)
        n = len(w)
        length = [1] * n                     # (n,) symbol length; symbol i starts at char i, 0 once merged away
        prev = list(range(-1, n - 1))        # (n,) previous live symbol or -1
        nxt = [*range(1, n), -1]             # (n,) next live symbol or -1
        heap = []
        for i in range(n - 1):
            r = ranks.get(w[i] + " " + w[i + 1])
            if r is not None:
                heap.append((r, i, i + 1, 2))
        heapq.heapify(heap)

        def push(a: int, b: int) -> None:
            la, lb = length[a], length[b]
            r = ranks.get(w[a:a + la] + " " + w[b:b + lb])
            if r is not None:
                heapq.heappush(heap, (r, a, b, la + lb))

        while heap:
            _, a, b, size = heapq.heappop(heap)
            la, lb = length[a], length[b]
            if la == 0 or lb == 0 or la + lb != size:
                continue                     # stale: one side merged since this pair was queued
            length[a], length[b] = size, 0
            c = nxt[a] = nxt[b]
            if c >= 0:
                prev[c] = a
            if prev[a] >= 0:
                push(prev[a], a)
            if c >= 0:
                push(a, c)

        out: list[int] = []
        i = 0
        while i >= 0:
            out += self._lookup(w[i:i + length[i]])
            i = nxt[i]
        return out

    def _lookup(self, sym: str) -> list[int]:
        tid = self.vocab.get(sym)
        if tid is not None:
            return [tid]
        # llama.cpp falls back to the symbol's single UTF-8 bytes as tokens, dropping those not in the vocab
        return [self.vocab[chr(b)] for b in sym.encode("utf-8") if b < 0x80 and chr(b) in self.vocab]
