"""The GGUF reader: agreement with the `gguf` package, and the malformed-file suite."""
from __future__ import annotations

import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.errors import GGUFError
from edgellm.loaders.gguf import GGUFFile
from edgellm.quant.ggml_types import GGMLType

import gguf_builder as gb
from conftest import MODELS, model_file

U64_MAX = (1 << 64) - 1


def open_bytes(tmp_path, data: bytes, name: str = "t.gguf") -> GGUFFile:
    p = tmp_path / name
    p.write_bytes(data)
    return GGUFFile(p)


def expect_error(tmp_path, data: bytes, match: str) -> GGUFError:
    """The file must fail with one GGUFError matching `match`, quickly and in bounded memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(GGUFError, match=match) as e:
            open_bytes(tmp_path, data)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 16 << 20, f"reader allocated {peak:,} bytes on a {len(data)}-byte file"
    assert "\n" not in str(e.value)
    return e.value


# --- a valid file reads back exactly ---

def test_sample_round_trip(tmp_path):
    f = open_bytes(tmp_path, gb.sample().build())
    m = f.metadata
    assert m["general.architecture"] == "llama"
    assert [m[f"test.int{i}"] for i in range(8)] == list(range(7, 15))
    assert m["test.f32"] == 1.5 and m["test.f64"] == -2.25 and m["test.bool"] is True
    assert m["test.strs"] == ["a", "bc", "\u00e9"]
    assert m["test.ints"].tolist() == [1, -2, 3]
    assert [a.tolist() for a in m["test.nested"]] == [[1, 2], [3]]
    a = f.array("a.weight")
    assert a.shape == (2, 32) and np.array_equal(a, np.arange(64, dtype=np.float32).reshape(2, 32))
    assert f.tensors["b.weight"].type == GGMLType.F16 and f.array("b.weight").tolist() == [1.0] * 8
    assert f.rows("a.weight").shape == (2, 128)
    with pytest.raises(GGUFError, match="Q4_0|dequantize"):
        f.tensors["a.weight"] = f.tensors["a.weight"].__class__("q", (32,), GGMLType.Q4_0, 0, 18)
        f.array("a.weight")


def test_sample_matches_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "s.gguf"
    p.write_bytes(gb.sample().build())
    ours, theirs = GGUFFile(p), gguf.GGUFReader(p)
    for t in theirs.tensors:
        assert ours.tensors[t.name].offset == t.data_offset
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_version_2_is_read(tmp_path):
    b = gb.sample()
    b.version = 2
    assert open_bytes(tmp_path, b.build()).version == 2


def test_alignment_from_metadata(tmp_path):
    b = gb.Builder(alignment=64)
    b.add_kv("general.alignment", gb.U32, 64)
    b.add_tensor("x", np.ones(3, dtype=np.float32)).add_tensor("y", np.full(5, 2, dtype=np.float32))
    f = open_bytes(tmp_path, b.build())
    assert f.data_offset % 64 == 0 and f.tensors["y"].offset - f.tensors["x"].offset == 64
    assert f.array("y").tolist() == [2.0] * 5


# --- the malformed-file suite ---

def header_with(**kw) -> bytes:
    fields = {"magic": b"GGUF", "version": 3, "n_tensors": 0, "n_kv": 0} | kw
    return fields["magic"] + struct.pack("<IQQ", fields["version"], fields["n_tensors"], fields["n_kv"])


def test_bad_magic(tmp_path):
    expect_error(tmp_path, header_with(magic=b"GGML") + b"\0" * 16, "magic at byte 0")


@pytest.mark.parametrize("version", [0, 1, 4, 3 << 24])
def test_unsupported_version(tmp_path, version):
    expect_error(tmp_path, header_with(version=version), "version at byte 4")


def test_tensor_count_max(tmp_path):
    expect_error(tmp_path, header_with(n_tensors=U64_MAX), "tensor count at byte 8")


def test_kv_count_max(tmp_path):
    expect_error(tmp_path, header_with(n_kv=U64_MAX), "metadata count at byte 16")


def test_counts_larger_than_file(tmp_path):
    expect_error(tmp_path, header_with(n_kv=1000) + b"\0" * 64, "hold at most")


def test_key_length_past_eof(tmp_path):
    data = header_with(n_kv=1) + struct.pack("<Q", 1 << 40) + b"abc" + b"\0" * 16
    expect_error(tmp_path, data, "metadata key length at byte 24")


def test_string_value_past_eof(tmp_path):
    data = header_with(n_kv=1) + gb.s("k") + struct.pack("<IQ", gb.STR, U64_MAX - 5) + b"xy"
    expect_error(tmp_path, data, "value of 'k'")


def test_array_length_past_eof(tmp_path):
    data = header_with(n_kv=1) + gb.s("k") + struct.pack("<IIQ", gb.ARR, gb.U32, U64_MAX) + b"\0" * 40
    expect_error(tmp_path, data, "array length of 'k'")


def test_string_array_length_past_eof(tmp_path):
    data = header_with(n_kv=1) + gb.s("k") + struct.pack("<IIQ", gb.ARR, gb.STR, 1 << 60) + b"\0" * 40
    expect_error(tmp_path, data, "array length of 'k'")


@pytest.mark.parametrize("vtype", [13, 99, 0xFFFFFFFF])
def test_value_type_out_of_range(tmp_path, vtype):
    data = header_with(n_kv=1) + gb.s("k") + struct.pack("<I", vtype) + b"\0" * 16
    expect_error(tmp_path, data, "value type of 'k'")


def test_array_element_type_out_of_range(tmp_path):
    data = header_with(n_kv=1) + gb.s("k") + struct.pack("<IIQ", gb.ARR, 77, 1) + b"\0" * 16
    expect_error(tmp_path, data, "array element type of 'k'")


def test_arrays_nested_too_deep(tmp_path):
    v = (gb.U8, [1])
    for _ in range(6):
        v = (gb.ARR, [v])
    b = gb.Builder().add_kv("k", gb.ARR, v)
    expect_error(tmp_path, b.build(), "nests arrays deeper")


def test_bool_not_0_or_1(tmp_path):
    data = header_with(n_kv=1) + gb.s("k") + struct.pack("<IB", gb.BOOL, 2)
    expect_error(tmp_path, data, "expected a bool")


def test_invalid_utf8(tmp_path):
    data = header_with(n_kv=1) + gb.s(b"\xff\xfe") + struct.pack("<IB", gb.U8, 1)
    expect_error(tmp_path, data, "not valid UTF-8")


def test_duplicate_keys(tmp_path):
    b = gb.Builder().add_kv("k", gb.U8, 1).add_kv("k", gb.U8, 2)
    expect_error(tmp_path, b.build(), "'k' at byte 38 appears twice")


def tensor_entry(name="t", dims=(32,), gtype=0, offset=0) -> bytes:
    return gb.s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", gtype, offset)


def one_tensor(tmp_path, match, data_bytes=128, **kw):
    head = header_with(n_tensors=1) + tensor_entry(**kw)
    return expect_error(tmp_path, head + b"\0" * (-len(head) % 32) + b"\0" * data_bytes, match)


@pytest.mark.parametrize("dims", [(), (1, 1, 1, 1, 1)])
def test_dimension_count(tmp_path, dims):
    head = header_with(n_tensors=1) + gb.s("t") + struct.pack("<I", len(dims)) + b"\0" * 64
    expect_error(tmp_path, head, "dimension count of 't'")


def test_zero_dimension(tmp_path):
    one_tensor(tmp_path, "dimension 1 of 't'", dims=(32, 0))


def test_negative_dimension(tmp_path):
    one_tensor(tmp_path, "dimension 0 of 't'", dims=(U64_MAX,))


def test_dimension_product_overflow(tmp_path):
    one_tensor(tmp_path, "more than", dims=(1 << 40, 1 << 40))


@pytest.mark.parametrize("gtype", [4, 5, 31, 99, 1 << 31])
def test_unknown_ggml_type(tmp_path, gtype):
    one_tensor(tmp_path, "not a known GGML type id", gtype=gtype)


def test_row_not_multiple_of_block(tmp_path):
    one_tensor(tmp_path, "Q4_0 needs a multiple of 32", dims=(16,), gtype=int(GGMLType.Q4_0))


def test_tensor_offset_past_eof(tmp_path):
    one_tensor(tmp_path, "data ends at byte", offset=1 << 20)


def test_tensor_offset_unaligned(tmp_path):
    one_tensor(tmp_path, "expected a multiple of 32", offset=4)


def test_overlapping_tensors(tmp_path):
    head = header_with(n_tensors=2) + tensor_entry("a", (32,)) + tensor_entry("b", (32,), offset=64)
    head = head[:0] + head
    # a covers bytes 0..128 of the data section, b starts at 64
    expect_error(tmp_path, head + b"\0" * (-len(head) % 32) + b"\0" * 256, "'b' data at byte .* overlaps tensor 'a'")


def test_duplicate_tensor_names(tmp_path):
    head = header_with(n_tensors=2) + tensor_entry("a") + tensor_entry("a", offset=128)
    expect_error(tmp_path, head + b"\0" * 512, "tensor name 'a' .* appears twice")


@pytest.mark.parametrize("align, vtype", [(0, gb.U32), (3, gb.U32), (48, gb.U32), (32, gb.U64)])
def test_bad_alignment(tmp_path, align, vtype):
    b = gb.Builder().add_kv("general.alignment", vtype, align)
    expect_error(tmp_path, b.build(), "general.alignment")


def test_every_truncation_fails_cleanly(tmp_path):
    data = gb.sample().build()
    p = tmp_path / "t.gguf"
    for n in range(len(data)):
        p.write_bytes(data[:n])
        with pytest.raises(GGUFError):
            GGUFFile(p)


def test_truncated_by_one_byte(tmp_path):
    expect_error(tmp_path, gb.sample().build()[:-1], "data ends at byte")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        GGUFFile(tmp_path)


# --- fuzzing: any mutation of a valid file parses or ends in GGUFError ---

def _mutations():
    base = gb.sample().build()
    flip = st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255))
    word = st.tuples(st.integers(0, len(base) - 8), st.sampled_from(
        [0, 1, 2, 3, 31, 32, 255, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) + 1, U64_MAX]))
    return base, st.lists(st.one_of(flip.map(lambda x: ("b",) + x), word.map(lambda x: ("q",) + x)),
                          min_size=1, max_size=6), st.integers(0, len(base))


_BASE, _EDITS, _CUT = _mutations()
FUZZ_EXAMPLES = int(os.environ.get("EDGELLM_FUZZ_EXAMPLES", "400"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_EDITS, cut=_CUT)
def test_fuzz_mutations(tmp_path, edits, cut):
    data = bytearray(_BASE)
    for kind, pos, v in edits:
        if kind == "b":
            data[pos] = v
        else:
            data[pos:pos + 8] = struct.pack("<Q", v)
    data = bytes(data[: max(cut, 24)])
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(data)
    try:
        f = GGUFFile(p)
    except GGUFError:
        return
    for name in f.tensors:  # whatever parsed must be readable inside the file
        assert f.tensors[name].offset + f.tensors[name].nbytes <= len(data)
        f.raw(name)


@pytest.mark.slow
@settings(max_examples=20000, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_EDITS, cut=_CUT)
def test_fuzz_mutations_long(tmp_path, edits, cut):
    test_fuzz_mutations.hypothesis.inner_test(tmp_path, edits, cut)


# --- the real models agree with the gguf package on every field ---

@pytest.mark.parametrize("name", MODELS)
def test_real_model_matches_gguf_package(name):
    gguf = pytest.importorskip("gguf")
    path = model_file(name)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted(ours.metadata)
    for k in keys:
        v, mine = theirs.fields[k].contents(), ours.metadata[k]
        if isinstance(mine, np.ndarray):
            assert np.array_equal(mine, np.asarray(v)), k
        else:
            assert mine == v, k
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in t.shape)
        assert int(mine.type) == int(t.tensor_type)
        assert (mine.offset, mine.nbytes) == (t.data_offset, t.n_bytes)
    # spot-check the bytes of a few tensors (zero-copy views of the same file)
    for t in theirs.tensors[:: max(1, len(theirs.tensors) // 8)]:
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))
