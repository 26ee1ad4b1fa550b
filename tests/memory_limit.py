"""A hard memory limit for test processes: a memory cgroup of their own (v1 or v2), as a phone or a
small laptop would impose. Page cache a process causes counts against the limit.

    with MemoryGroup(500 << 20) as g:                  # pytest.skip()s where cgroups are not writable
        subprocess.run(cmd, preexec_fn=g.enter)        # the child (and what it starts) joins the group
        g.peak_bytes, g.oom_killed

The tests need nothing outside this repository (the workplace's tools/memlimit does the same job
from the command line).
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest


def _read(p: Path, default: str = "") -> str:
    try:
        return p.read_text()
    except OSError:
        return default


def _group_root() -> tuple[Path, int] | None:
    """(the directory new groups go in, cgroup version) for this process, or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrl, path = line.split(":", 2)
        if "memory" in ctrl.split(","):
            root = Path("/sys/fs/cgroup/memory" + path)
            if (root / "memory.limit_in_bytes").exists():
                return root, 1
    for line in lines:
        _, ctrl, path = line.split(":", 2)
        if ctrl == "":
            root = Path("/sys/fs/cgroup" + path)
            if "memory" in _read(root / "cgroup.subtree_control").split():
                return root, 2
    return None


class MemoryGroup:
    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)

    def __enter__(self) -> "MemoryGroup":
        found = _group_root()
        if found is None or os.geteuid() != 0:
            pytest.skip("no writable memory cgroup here (needs root and a cgroup v1 memory controller or v2)")
        root, self.version = found
        self.path = root / f"edgellm-test-{uuid.uuid4().hex[:8]}"
        try:
            self.path.mkdir()
            limit_file = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
            (self.path / limit_file).write_text(str(self.limit))
        except OSError as e:
            self._remove()
            pytest.skip(f"cannot create a memory cgroup here: {e}")
        return self

    def enter(self) -> None:
        """preexec_fn: move the new child into the group before it runs its program."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    @property
    def peak_bytes(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int(_read(self.path / name, "0").strip() or 0)

    @property
    def oom_killed(self) -> bool:
        text = _read(self.path / ("memory.oom_control" if self.version == 1 else "memory.events"))
        return any(line.split()[:1] == ["oom_kill"] and int(line.split()[1]) > 0 for line in text.splitlines())

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for _ in range(50):  # the group goes once its last process has exited
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
