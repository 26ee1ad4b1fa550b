"""Model files on a node: hashing once, finding a local copy by hash, and sparse shard replicas.

A model is named on the wire by the SHA-256 of its GGUF file. `digest_of(path)` hashes a file
once: it trusts the model store's stamp (`<name>.gguf.sha256`: digest, size, mtime) and otherwise
keeps its own stamp under $EDGELLM_HOME/cluster/digests. `find_local(digest)` looks for a stamped
copy in the store or among the files hashed before.

A node without the file keeps a replica: $EDGELLM_HOME/cluster/replicas/<digest>.gguf is a sparse
file of the model's size holding the GGUF header and only the pieces this node was sent, at their
own offsets (so the ordinary reader opens it), and <digest>.pieces lists the pieces present, one
`name axis lo hi` line each, appended after the bytes are on disk: a piece is either listed and
complete, or fetched again. A later run (or a re-plan) asks only for the pieces it lacks.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ...loaders.gguf import GGUFFile, TensorInfo
from ...loaders.store import home
from .plan import Slice
from .wire import sha256_file


def _stamp(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _digest_dir() -> Path:
    return home() / "cluster" / "digests"


def digest_of(path) -> str:
    """The file's SHA-256 (hex), computed at most once per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    sig = [str(st.st_size), str(st.st_mtime_ns)]
    store = _stamp(p.with_suffix(p.suffix + ".sha256"))
    if len(store) >= 3 and store[1:3] == sig:
        return store[0]
    mine = _digest_dir() / (hashlib.sha256(str(p).encode()).hexdigest()[:32] + ".txt")
    got = _stamp(mine)
    if len(got) >= 3 and got[1:3] == sig:
        return got[0]
    d = sha256_file(p)
    mine.parent.mkdir(parents=True, exist_ok=True)
    tmp = mine.with_suffix(".tmp")
    tmp.write_text(f"{d} {sig[0]} {sig[1]} {p}\n")
    os.replace(tmp, mine)
    return d


def find_local(digest: str) -> Path | None:
    """A local, already-verified copy of the model with this digest, if there is one."""
    cands = [(p, p.with_suffix(".gguf.sha256")) for p in sorted((home() / "models").glob("*.gguf"))]
    for p, stamp in cands:
        s = _stamp(stamp)
        if len(s) >= 3 and s[0] == digest:
            try:
                st = p.stat()
            except OSError:
                continue
            if s[1:3] == [str(st.st_size), str(st.st_mtime_ns)]:
                return p
    for c in sorted(_digest_dir().glob("*.txt")) if _digest_dir().is_dir() else []:
        s = c.read_text().split(maxsplit=3)
        if len(s) == 4 and s[0] == digest:
            p = Path(s[3].strip())
            try:
                st = p.stat()
            except OSError:
                continue
            if s[1:3] == [str(st.st_size), str(st.st_mtime_ns)]:
                return p
    return None


# ---- pieces -------------------------------------------------------------------------------------

def pieces_of(f: GGUFFile, slices: dict[str, Slice]) -> list[tuple[str, int, int, int]]:
    """(tensor, axis, lo, hi) units a node's slices read: rows (axis 0) or quant blocks of every
    row (axis 1); a 1-D tensor is always whole."""
    out = []
    for name, sl in slices.items():
        if len(f.info(name).shape) == 1:
            out.append((name, 0, 0, 1))
        else:
            out.extend((name, sl.axis, a, b) for a, b in sl.ranges)
    return out


def piece_bytes(t: TensorInfo, axis: int, lo: int, hi: int) -> int:
    if axis == 0:
        return (hi - lo) * (t.row_bytes if len(t.shape) > 1 else t.nbytes)
    return t.n_rows * (hi - lo) * t.type.type_size


def piece_data(f: GGUFFile, i: int, axis: int, lo: int, hi: int) -> memoryview:
    """The bytes of piece (tensor index i, axis, lo, hi) of `f`; ValueError if there is no such piece."""
    names = list(f.tensors)
    t = f.info(names[i]) if 0 <= i < len(names) else None
    if t is None or axis not in (0, 1) or (axis == 1 and len(t.shape) == 1):
        raise ValueError("no such piece")
    limit = (t.n_rows if len(t.shape) > 1 else 1) if axis == 0 else t.shape[0] // t.type.block_size
    if not 0 <= lo < hi <= limit:
        raise ValueError("no such piece")
    if axis == 0:
        row = t.row_bytes if len(t.shape) > 1 else t.nbytes
        return memoryview(f.raw(t.name))[lo * row:hi * row]
    from .shard import read_columns

    return memoryview(read_columns(f.path, t, lo, hi)).cast("B")


def subtract(need: list[tuple[str, int, int, int]], have: dict) -> list[tuple[str, int, int, int]]:
    """The parts of `need` not covered by `have` ({(name, axis): [(lo, hi), ...]})."""
    out = []
    for name, axis, lo, hi in need:
        cur = lo
        for a, b in sorted(have.get((name, axis), [])):
            if b <= cur or a >= hi:
                continue
            if a > cur:
                out.append((name, axis, cur, a))
            cur = max(cur, b)
            if cur >= hi:
                break
        if cur < hi:
            out.append((name, axis, cur, hi))
    return out


class Replica:
    """The sparse local copy of the model with `digest` (see the module docstring)."""

    def __init__(self, digest: str):
        d = home() / "cluster" / "replicas"
        self.path = d / f"{digest}.gguf"
        self.index = d / f"{digest}.pieces"

    def has_header(self) -> bool:
        return self.path.is_file() and "header" in _stamp(self.index)[:1]

    def present(self) -> dict:
        have: dict = {}
        for line in self.index.read_text().splitlines()[1:] if self.index.is_file() else []:
            parts = line.split()
            if len(parts) == 4:
                have.setdefault((parts[0], int(parts[1])), []).append((int(parts[2]), int(parts[3])))
        return have

    def start(self, size: int) -> None:
        """A fresh sparse file of `size` bytes (any older replica of this digest is dropped)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.index.unlink(missing_ok=True)
        with open(self.path, "wb") as fh:
            fh.truncate(size)

    def write(self, offset: int, data) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def write_piece(self, t: TensorInfo, axis: int, lo: int, hi: int, at: int, data: memoryview) -> None:
        """Bytes [at, at + len(data)) of a piece: rows lo..hi (axis 0), or quant blocks lo..hi of
        every row (axis 1), laid out row after row as `read_columns` returns them."""
        if axis == 0:
            row = t.row_bytes if len(t.shape) > 1 else t.nbytes
            self.write(t.offset + lo * row + at, data)
            return
        width, ts, rb = (hi - lo) * t.type.type_size, t.type.type_size, t.row_bytes
        fd = os.open(self.path, os.O_WRONLY)
        try:
            pos, end, w = at, at + len(data), 0
            while pos < end:
                r, c = divmod(pos, width)
                n = min(width - c, end - pos)
                os.pwrite(fd, data[w:w + n], t.offset + r * rb + lo * ts + c)
                pos, w = pos + n, w + n
        finally:
            os.close(fd)

    def commit(self, lines: list[str]) -> None:
        """Record pieces as present once their bytes are on disk."""
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())
        with open(self.index, "a") as fh:
            for line in lines:
                fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
