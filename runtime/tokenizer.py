"""Tokenizers built from GGUF metadata, following llama.cpp's `llama-vocab.cpp`.

    tok = Tokenizer.from_metadata(gguf.metadata)
    ids = tok.encode("<start_of_turn>user\\nHi<end_of_turn>\\n")     # BOS added iff add_bos_token
    text = tok.decode(ids)
    stream = StreamDecoder(tok)                                      # text pieces, never half a character
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]

Two vocabularies are supported: "llama" (SentencePiece-style, `tokenizer_spm.py`, e.g. gemma3) and "gpt2"
(byte-level BPE, `tokenizer_bpe.py`, with the qwen2 pre-tokenizer). Special tokens (control, user-defined,
unknown) are cut out of the text first, longest token first, as llama.cpp's `tokenizer_st_partition`;
user-defined ones are cut out even when `parse_special` is false.

Checked id for id against llama.cpp (tests/test_tokenizer.py). Left out of llama.cpp's rules: per-model
lstrip/rstrip token attributes (phi-3, jina), the gpt-oss and gemma4 token fix-ups, clean_spaces (only used
by pre-tokenizers we do not support), and other tokenizer kinds (bert, t5, rwkv, ...). `decode` joins the
tokens' pieces as llama-cpp-python's detokenize does; llama_detokenize would also drop one leading space on
add_space_prefix models (none of ours).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable

import numpy as np

from ..errors import EdgeLLMError
from .tokenizer_bpe import BPE, PRE_TOKENIZERS, byte_decode
from .tokenizer_spm import SPACE, SPM


class TokenizerError(EdgeLLMError):
    """The GGUF tokenizer metadata is missing, inconsistent, or of a kind edgellm does not support."""


# llama.cpp token attributes (bit flags); GGUF token_type 0..6 picks one.
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 2, 4, 8, 16, 32
_ATTR_OF_TYPE = np.array([0, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE], np.uint8)
_SPECIAL = CONTROL | USER_DEFINED | UNKNOWN       # matched in the text before tokenizing

# Tokens llama.cpp finds by their text when the metadata does not name them (llama-vocab.cpp, load()).
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_FIM_NAMES = {  # metadata key suffix -> texts
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")

_KIND = {"llama": "spm", "gpt2": "bpe"}
_DEFAULT_IDS = {"spm": (1, 2, 0), "bpe": (11, 11, None)}  # bos, eos, unk before the metadata says otherwise


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary; build with `Tokenizer.from_metadata`."""

    def __init__(self, kind: str, tokens: list[str], vocab: dict[str, int], attrs: np.ndarray,
                 engine: SPM | BPE, bos_id: int | None, eos_id: int | None, eog_ids: frozenset[int],
                 add_bos: bool, add_eos: bool, add_space_prefix: bool):
        self.kind = kind                      # "spm" or "bpe"
        self.tokens = tokens                  # (n_vocab,) id -> token text as stored in the file
        self.vocab = vocab                    # token text -> id
        self.attrs = attrs                    # (n_vocab,) uint8 llama.cpp attribute bits
        self.n_vocab = len(tokens)
        self.bos_id, self.eos_id, self.eog_ids = bos_id, eos_id, eog_ids
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        self._engine = engine
        self._pieces: dict[int, bytes] = {}   # id -> bytes with special=True, filled on demand
        self._init_special_finder()

    # --- construction ---

    @classmethod
    def from_metadata(cls, md: dict) -> Tokenizer:
        model = md.get("tokenizer.ggml.model")
        kind = _KIND.get(model)
        if kind is None:
            raise TokenizerError(f"tokenizer.ggml.model '{model}' is not supported (supported: llama, gpt2)")
        tokens = md.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("tokenizer.ggml.tokens is missing or empty")
        tokens = list(tokens)
        n = len(tokens)
        vocab = dict(zip(tokens, range(n)))
        if "" in vocab:                       # llama.cpp renames empty entries
            for i, t in enumerate(tokens):
                if not t:
                    tokens[i] = f"[EMPTY_{i}]"
            vocab = dict(zip(tokens, range(n)))
        if len(vocab) != n:
            dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
            raise TokenizerError(f"duplicate token in vocabulary: {dup!r} has ids {tokens.index(dup)} and {vocab[dup]}")

        types = md.get("tokenizer.ggml.token_type")
        types = np.full(n, 1, np.int64) if types is None else np.asarray(types, np.int64)[:n]
        if len(types) < n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        attrs = np.where((types >= 0) & (types < 7), _ATTR_OF_TYPE[np.clip(types, 0, 6)], 0).astype(np.uint8)

        bos, eos, unk, eog = _special_ids(md, kind, vocab, attrs)

        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "spm"))
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", kind == "spm"))
        for flag, tid, what in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
            if flag and tid is None:
                raise TokenizerError(f"tokenizer.ggml.add_{what}_token is true but "
                                     f"tokenizer.ggml.{what}_token_id is not set")

        if kind == "spm":
            scores = md.get("tokenizer.ggml.scores")
            scores = [0.0] * n if scores is None else np.asarray(scores, np.float32)[:n].tolist()
            byte_ids = []
            for b in range(256):
                tid = vocab.get(f"<0x{b:02X}>", vocab.get(chr(b)) if b < 128 else None)
                byte_ids.append(tid if tid is not None else unk)
            engine = SPM(vocab, scores, byte_ids, tokens)
        else:
            pre = md.get("tokenizer.ggml.pre") or "default"
            if pre not in PRE_TOKENIZERS:
                raise TokenizerError(f"tokenizer.ggml.pre '{pre}' is not supported "
                                     f"(supported: {', '.join(PRE_TOKENIZERS)})")
            merges = md.get("tokenizer.ggml.merges")
            if merges is None:
                raise TokenizerError("tokenizer.ggml.merges is missing (needed by gpt2 tokenizers)")
            engine = BPE(vocab, list(merges), PRE_TOKENIZERS[pre])
        return cls(kind, tokens, vocab, attrs, engine, bos, eos, eog, add_bos, add_eos, add_space_prefix)

    def _init_special_finder(self) -> None:
        ids = np.nonzero(self.attrs & _SPECIAL)[0].tolist()
        self._special = {self.tokens[i]: i for i in ids}
        lengths: dict[str, set[int]] = {}     # first two characters (or the one) -> token lengths
        for t in self._special:
            lengths.setdefault(t[:2], set()).add(len(t))
        self._special_lengths = {k: sorted(v) for k, v in lengths.items()}
        keys = sorted(lengths, key=len, reverse=True)
        self._special_starts = re.compile("(?=" + "|".join(map(re.escape, keys)) + ")") if keys else None

    # --- encoding ---

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS/EOS as the model asks, `parse_special` matches
        control tokens such as <|im_start|> written in the text (user-defined ones are always matched)."""
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        fragments = self._partition(text, parse_special) if text else []
        if self.kind == "spm":
            prev_special = True
            for f in fragments:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    out += self._engine.encode(f.replace(" ", SPACE))
                    prev_special = False
        else:
            for f in fragments:
                if isinstance(f, int):
                    out.append(f)
                else:
                    out += self._engine.encode(f)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Raw-text pieces and special-token ids, each special token split out in turn, longest first."""
        if self._special_starts is None:
            return [text]
        found = set()
        lengths, special = self._special_lengths, self._special
        for m in self._special_starts.finditer(text):
            p = m.start()
            for key in {text[p:p + 2], text[p]}:
                for n in lengths.get(key, ()):
                    tid = special.get(text[p:p + n])
                    if tid is not None and (parse_special or not self.attrs[tid] & (CONTROL | UNKNOWN)):
                        found.add(tid)
        fragments: list[str | int] = [text]
        for tid in sorted(found, key=lambda i: (-len(self.tokens[i]), i)):
            tok = self.tokens[tid]
            new: list[str | int] = []
            for f in fragments:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                for j, part in enumerate(f.split(tok)):
                    if j:
                        new.append(tid)
                    if part:
                        new.append(part)
            fragments = new
        return fragments

    # --- decoding ---

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for (llama.cpp's token_to_piece); control and unknown tokens give
        their own text when `special`, else nothing. May be part of a UTF-8 character."""
        piece = self._pieces.get(token_id)
        if piece is None:
            if not 0 <= token_id < self.n_vocab:
                raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})")
            attr, text = int(self.attrs[token_id]), self.tokens[token_id]
            if attr & _SPECIAL:
                piece = text.encode("utf-8", "surrogatepass")
            elif attr & NORMAL:
                piece = (text.replace(SPACE, " ").encode("utf-8", "surrogatepass") if self.kind == "spm"
                         else byte_decode(text))
            elif attr & BYTE:
                piece = bytes([int(text[3:5], 16)])
            else:                             # unused or undefined
                piece = b""
            self._pieces[token_id] = piece
        if not special and self.attrs[token_id] & (CONTROL | UNKNOWN):
            return b""
        return piece

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of the token ids: their pieces joined, invalid UTF-8 replaced by U+FFFD."""
        return b"".join(self.token_bytes(int(i), special) for i in ids).decode("utf-8", "replace")

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids


def _special_ids(md: dict, kind: str, vocab: dict[str, int], attrs: np.ndarray):
    """(bos, eos, unk, eog set) as llama.cpp's load() finds them: metadata ids if in range, else defaults;
    end-of-generation tokens also by their text. Marks tokens found by text as control in `attrs`."""
    n = len(attrs)

    def special_id(key: str, default: int | None) -> int | None:
        if default is not None and default >= n:
            default = None
        v = md.get(f"tokenizer.ggml.{key}_token_id")
        return int(v) if v is not None and 0 <= int(v) < n else default

    def by_name(names: Iterable[str]) -> int | None:
        for name in names:
            if name in vocab:
                attrs[vocab[name]] |= CONTROL
                return vocab[name]
        return None

    bos, eos, unk = (special_id(k, d) for k, d in zip(("bos", "eos", "unknown"), _DEFAULT_IDS[kind]))
    eot = special_id("eot", None)
    eot = eot if eot is not None else by_name(_EOT_NAMES)
    eom = special_id("eom", None)
    eom = eom if eom is not None else by_name(("<|eom_id|>",))
    fim = {}
    for key, names in _FIM_NAMES.items():
        fim[key] = special_id(key, None)
        if fim[key] is None:
            fim[key] = by_name(names)
    eog = {fim["fim_pad"], fim["fim_rep"], fim["fim_sep"], eos, eot, eom}
    for name in _EOG_NAMES:
        if name in vocab:
            eog.add(vocab[name])
            attrs[vocab[name]] |= CONTROL
    eog.discard(None)
    return bos, eos, unk, frozenset(eog)


class StreamDecoder:
    """Feed token ids one at a time; each call returns the text completed so far (possibly empty),
    never a split UTF-8 character. Call `flush` at the end for what is left."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(int(token_id), self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
