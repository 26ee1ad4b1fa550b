"""Tokenizers: exact agreement with llama.cpp on the real vocabularies, and small synthetic vocabularies.

The llama.cpp ids come from tests/data/tokenizer_cases.json (written by make_tokenizer_fixtures.py with
llama-cpp-python) and from the shared reference files; neither needs llama.cpp at test time.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
from functools import lru_cache
from pathlib import Path

import pytest

from edgellm.runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError

from conftest import MODELS, model_file, reference_file

FIXTURE = Path(__file__).parent / "data" / "tokenizer_cases.json"
GPL3 = Path("/usr/share/common-licenses/GPL-3")


@lru_cache(maxsize=None)
def metadata(name: str) -> dict:
    from edgellm.loaders.gguf import GGUFFile

    return GGUFFile(model_file(name)).metadata


@lru_cache(maxsize=None)
def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(metadata(name))


@lru_cache(maxsize=None)
def fixture() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


# --- real vocabularies against llama.cpp ---

@pytest.mark.parametrize("name", MODELS)
def test_start_up_is_fast(name):
    md = metadata(name)
    t0 = time.perf_counter()
    tok = Tokenizer.from_metadata(md)
    tok.encode("warm up")
    assert time.perf_counter() - t0 < 1.0
    assert tok.n_vocab == fixture()["models"][name]["n_vocab"] == len(md["tokenizer.ggml.tokens"])


@pytest.mark.parametrize("name", MODELS)
def test_reference_prompts_and_generations(name):
    tok = tokenizer(name)
    ref = json.loads(reference_file(f"llamacpp-{name}.json").read_text())
    assert tok.add_bos == ref["add_bos"]
    for p in ref["prompts"]:
        assert tok.encode(p["prompt"]) == p["prompt_ids"]
        assert tok.decode(p["gen_ids"]) == p["gen_text"]
        stream = StreamDecoder(tok)
        assert "".join([stream.feed(i) for i in p["gen_ids"]] + [stream.flush()]) == p["gen_text"]


@pytest.mark.parametrize("name", MODELS)
def test_gpl3_matches_llamacpp_and_is_fast(name):
    if not GPL3.exists():
        pytest.skip(f"{GPL3} is missing")
    text = GPL3.read_text()
    fresh = Tokenizer.from_metadata(metadata(name))      # empty word caches: a cold encode is timed
    t0 = time.perf_counter()
    ids = fresh.encode(text)
    assert time.perf_counter() - t0 < 1.0
    ppl = json.loads(reference_file("llamacpp-perplexity-gpl3-c512.json").read_text())
    assert len(ids) == ppl["models"][name]["n_tokens_total"]
    assert ids == fixture()["models"][name]["gpl3"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("group", ["cases", "random"])
def test_fixture_texts_match_llamacpp(name, group):
    tok, fx = tokenizer(name), fixture()
    ref = fx["models"][name]
    for text, want, want_plain in zip(fx[group], ref[group], ref[group + "_plain"], strict=True):
        assert tok.encode(text) == want, text
        assert tok.encode(text, add_special=False, parse_special=False) == want_plain, text


@pytest.mark.parametrize("name", MODELS)
def test_special_ids_match_llamacpp(name):
    tok, ref = tokenizer(name), fixture()["models"][name]
    assert (tok.bos_id, tok.eos_id) == (ref["bos"], ref["eos"])
    assert sorted(tok.eog_ids) == ref["eog"]
    assert all(tok.is_eog(i) for i in ref["eog"]) and not tok.is_eog(ref["eog"][0] - 1)


@pytest.mark.parametrize("name", MODELS)
def test_every_token_piece_matches_llamacpp(name):
    tok, ref = tokenizer(name), fixture()["models"][name]
    for special, key in ((True, "pieces_sha256"), (False, "pieces_plain_sha256")):
        h = hashlib.sha256()
        for i in range(tok.n_vocab):
            piece = tok.token_bytes(i, special)
            h.update(struct.pack("<I", len(piece)) + piece)
        assert h.hexdigest() == ref[key], f"special={special}"


@pytest.mark.parametrize("name", MODELS[:2])
def test_stream_decoder_never_splits_a_character(name):
    tok = tokenizer(name)
    text = "naïve 你好 👨‍👩‍👧‍👦 \U0010FFFD \U000E0041 𝔘 done"
    ids = tok.encode(text, add_special=False)
    assert any(len(tok.token_bytes(i)) and not _is_utf8(tok.token_bytes(i)) for i in ids)   # some split chars
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == tok.decode(ids) == text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- small synthetic vocabularies ---

def _spm(tokens_scores: list[tuple[str, float, int]], **extra) -> Tokenizer:
    base = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    allt = base + tokens_scores
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [t for t, _, _ in allt],
          "tokenizer.ggml.scores": [s for _, s, _ in allt], "tokenizer.ggml.token_type": [k for _, _, k in allt]}
    md.update(extra)
    return Tokenizer.from_metadata(md)


def test_spm_merges_by_score_and_falls_back_to_bytes():
    tok = _spm([("▁", -1, 1), ("a", -1, 1), ("b", -1, 1), ("▁a", -3, 1), ("ab", -2, 1), ("▁ab", -4, 1)])
    v = tok.vocab
    # "ab" (score -2) beats "▁a" (-3), then "▁"+"ab" forms "▁ab"; the space prefix is on by default
    assert tok.encode("ab") == [v["<s>"], v["▁ab"]]
    assert tok.encode("é", add_special=False) == [v["▁"], v["<0xC3>"], v["<0xA9>"]]
    assert tok.decode(tok.encode("ab é")) == " ab é"
    tok = _spm([("▁", -1, 1), ("a", -1, 1), ("b", -1, 1)], **{"tokenizer.ggml.add_space_prefix": False,
                                                                "tokenizer.ggml.add_bos_token": False})
    assert tok.encode("a b") == [tok.vocab["a"], tok.vocab["▁"], tok.vocab["b"]]


def test_special_tokens_are_split_longest_first():
    # llama.cpp cuts out the longest special token everywhere before shorter ones, so "xabc" -> x, <abc>
    tok = _spm([("x", -1, 1), ("y", -1, 1), ("xa", 0, 3), ("abc", 0, 3), ("<u>", 0, 4)],
               **{"tokenizer.ggml.add_space_prefix": False})
    v = tok.vocab
    assert tok.encode("xabc", add_special=False) == [v["x"], v["abc"]]
    # control tokens only with parse_special; user-defined ones always
    plain = [v["y"], v["<u>"], v["<0x61>"], v["<0x62>"], v["<0x63>"]]
    assert tok.encode("y<u>abc", add_special=False, parse_special=False) == plain
    assert tok.encode("y<u>abc", add_special=False) == [v["y"], v["<u>"], v["abc"]]
    assert tok.decode([v["xa"], v["x"]]) == "x" and tok.decode([v["xa"]], special=True) == "xa"


def test_bpe_merges_by_rank():
    chars = ["a", "b", "c", "Ġ"]
    tokens = chars + ["ab", "bc", "abc", "Ġa", "<|end|>"]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [1] * 8 + [3], "tokenizer.ggml.merges": ["b c", "a b", "a bc", "Ġ a"],
          "tokenizer.ggml.eos_token_id": 8}
    tok = Tokenizer.from_metadata(md)
    v = tok.vocab
    # words "abc", " abc"; "b c" (rank 0) goes first, so " abc" ends as Ġ + abc, never Ġa + bc
    assert tok.encode("abc abc") == [v["abc"], v["Ġ"], v["abc"]]
    assert tok.encode("ab<|end|>") == [v["ab"], v["<|end|>"]]
    assert tok.eog_ids == {v["<|end|>"]} and not tok.add_bos
    assert tok.decode(tok.encode("abc abc")) == "abc abc"


def test_errors_name_the_problem():
    good = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.merges": []}
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model 'bert'"):
        Tokenizer.from_metadata({**good, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre 'falcon'"):
        Tokenizer.from_metadata({**good, "tokenizer.ggml.pre": "falcon"})
    with pytest.raises(TokenizerError, match="duplicate token.*'a'"):
        Tokenizer.from_metadata({**good, "tokenizer.ggml.tokens": ["a", "a"]})
    with pytest.raises(TokenizerError, match="add_bos_token is true"):
        Tokenizer.from_metadata({**good, "tokenizer.ggml.add_bos_token": True})
    with pytest.raises(TokenizerError, match="token id 7 is outside"):
        Tokenizer.from_metadata(good).decode([7])
