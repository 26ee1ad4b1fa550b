"""`edgellm worker`: serve one shard of a model to a coordinator.

Each connection is authenticated in its own thread with a deadline, so a peer with a wrong key,
garbage bytes or nothing to say is dropped without touching the session in progress. One session
runs at a time; another authenticated coordinator waits BUSY_WAIT seconds for it to end (as it
does at once when a re-planning coordinator closes its old connections), then is told "busy".
A coordinator that vanishes without closing is noticed by TCP keepalive (~20 s).

A session: OPEN (model hash, sizes) -> INFO (has the file? memory, speed) -> [PIECE: GGUF header,
when there is no local copy] -> PLAN (this node's shard; its hash is checked) -> NEED (the pieces a
replica lacks) -> PIECE... -> PROGRESS while packing -> READY; then per forward pass STEP (the
embedded tokens) -> per layer PARTIAL/SUM twice -> LOGITS (this node's vocabulary rows).

Memory: a shard that fits the node's --memory-budget (or, without one, the memory it has) with
its process, KV cache and activations stays resident; one that does not streams from a shard
file through offload's sliding window, in batches the budget allows (READY tells the coordinator
the largest).
"""
from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np

from ...errors import EdgeLLMError
from ...offload.planner import measure_baseline, memory_limit, process_bytes
from ...loaders.gguf import GGUFFile
from ...quant.ggml_types import KV_CACHE_TYPES
from ..config import RuntimeConfig
from ..engine import select_kernels
from ..model import model_class
from . import wire
from .messages import (BYE, ERROR, INFO, INFO_S, LOGIT_CHUNK, LOGITS, NEED, OPEN, OPEN_S, PARTIAL, PIECE, PIECE_CHUNK,
                       PIECE_S, PLAN, PLAN_S, PROBE, PROGRESS, READY, READY_S, ROWS_S, STATS, STATS_S, STEP, STEP_S, SUM,
                       step_limit)
from .keys import Identity
from .plan import FIELDS, Plan, kv_map, local_config, node_tensors, weight_bytes
from .replica import Replica, find_local, piece_bytes, pieces_of, subtract
from .shard import matvec_rate, shard_store
from .wire import ClusterError, ProtocolError, array

log = logging.getLogger("edgellm.cluster")

HANDSHAKE_TIMEOUT = 5.0
MAX_HANDSHAKES = 16
BUSY_WAIT = 3.0  # seconds a second coordinator waits for the session in progress to end


class Worker:
    def __init__(self, host: str = "127.0.0.1", port: int = wire.DEFAULT_PORT, identity: Identity | None = None,
                 memory_budget: int | None = None, threads: int | None = None):
        identity = identity or Identity(None)
        if not identity.secured and not wire.is_loopback(host):
            raise ClusterError(f"listening on {host} (not loopback) needs a key: make one with "
                               "`edgellm keygen FILE` and pass --key FILE here and on the coordinator")
        self.identity, self.budget = identity, memory_budget
        self.threads = threads or RuntimeConfig().max_threads
        self.rate = matvec_rate(select_kernels(None, self.threads).make_linear)  # reported at every handshake
        try:
            self.sock = socket.create_server((host, port), backlog=64)
        except OSError as e:
            raise ClusterError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.address = self.sock.getsockname()[:2]
        self._slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._current: wire.Channel | None = None
        self._current_lock = threading.Lock()
        self._run = threading.Lock()  # held by the session in progress
        self._closed = False
        self.files: dict[str, tuple[GGUFFile, int]] = {}  # digest -> (file, 1 local copy / 2 replica)
        self.cache: dict = {}  # packed weights kept across sessions of one model
        self.cache_digest = None

    def serve_forever(self) -> None:
        while not self._closed:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                raise
            if not self._slots.acquire(blocking=False):
                conn.close()  # too many handshakes in flight
                continue
            threading.Thread(target=self._handle, args=(conn, addr), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        with self._current_lock:
            if self._current:
                _shutdown(self._current.sock)

    def _handle(self, conn: socket.socket, addr) -> None:
        who = f"{addr[0]}:{addr[1]}"
        try:
            wire.tune(conn)
            ch = wire.handshake_worker(conn, self.identity, HANDSHAKE_TIMEOUT)
        except (ClusterError, OSError) as e:
            log.warning("rejected %s: %s", who, e)
            conn.close()
            return
        finally:
            self._slots.release()
        if not self._run.acquire(timeout=BUSY_WAIT):  # one coordinator at a time
            try:
                ch.send(ERROR, b"worker busy: serving another coordinator", timeout=2)
            except ClusterError:
                pass
            log.warning("refused %s: busy with another coordinator", who)
            ch.close()
            return
        with self._current_lock:
            self._current = ch
        try:
            Session(self, ch, who).run()
        except wire.PeerGone as e:
            log.info("session with %s ended: %s", who, e)
        except Exception as e:  # tell the coordinator why (best effort), keep serving
            if isinstance(e, ClusterError):
                log.warning("session with %s ended: %s", who, e)
            else:
                log.exception("session with %s failed", who)
            try:
                ch.send(ERROR, f"worker {self.address[0]}:{self.address[1]}: {e}".encode()[:1024], timeout=2)
            except ClusterError:
                pass
        finally:
            ch.close()
            with self._current_lock:
                if self._current is ch:
                    self._current = None
            self._run.release()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Session:
    def __init__(self, worker: Worker, ch: wire.Channel, who: str):
        self.w, self.ch, self.who = worker, ch, who
        self.timeout = HANDSHAKE_TIMEOUT

    def deadline(self) -> float:
        """For the waits of the setup, when the coordinator may be busy with other nodes."""
        return time.monotonic() + max(4 * self.timeout, 20.0)

    def run(self) -> None:
        ch = self.ch
        _, p = ch.recv(self.deadline(), (OPEN,))
        if len(p) != OPEN_S.size:
            raise ProtocolError("malformed OPEN")
        digest, size, n_ctx, n_batch, timeout_ms, backend, cache_type = OPEN_S.unpack(p)
        backend = backend.rstrip(b"\0").decode("ascii", "replace")
        cache_type = cache_type.rstrip(b"\0").decode("ascii", "replace")
        if not (1 <= n_ctx <= 1 << 22 and 1 <= n_batch <= 4096 and 50 <= timeout_ms <= 3_600_000
                and all(c.isalnum() or c == "_" for c in backend) and cache_type in KV_CACHE_TYPES):
            raise ProtocolError("OPEN holds out-of-range settings")
        self.cache_type = cache_type
        self.timeout = timeout_ms / 1000
        hexd = digest.hex()
        f, has = self._model_file(hexd, size)
        ch.send(INFO, INFO_S.pack(has, self.w.budget or 0, self.w.threads, measure_baseline(without_mapped_models=True),
                                  memory_limit(),
                                  self.w.rate), timeout=self.timeout)
        replica = Replica(hexd)
        ch.set_limit(PIECE_S.size + PIECE_CHUNK)
        if has == 0:
            f = self._receive_header(replica, hexd, size)
        cls = model_class(f.metadata.get("general.architecture"))
        cfg = cls.config(f)

        _, p = ch.recv(self.deadline(), (PLAN,))
        rank, n, sent = wire.unpack(PLAN_S, p)
        if not (1 <= rank < n <= 4096):
            raise ProtocolError("PLAN names an impossible rank")
        plan = Plan.from_table(array(p, np.int64, (n, FIELDS), PLAN_S.size))
        if plan.digest(digest, n_ctx, n_batch) != sent:
            raise ProtocolError("the plan does not match its hash")
        s = plan.nodes[rank]
        V = f.info("output.weight" if "output.weight" in f.tensors else "token_embd.weight").n_rows
        if not (0 <= s.h0 < s.h1 <= cfg.n_head and 0 <= s.f0 < s.f1 <= cfg.n_ff and 0 <= s.v0 < s.v1 <= V):
            raise ProtocolError("the plan's ranges do not fit the model")
        slices = node_tensors(cfg, f, s, rank)
        missing = subtract(pieces_of(f, slices), replica.present()) if has != 1 else []
        names = list(f.tensors)
        idx = {nm: i for i, nm in enumerate(names)}
        ch.send(NEED, np.array([(idx[nm], a, lo, hi) for nm, a, lo, hi in missing], "<i8").reshape(-1, 4),
                timeout=self.timeout)
        for nm, axis, lo, hi in missing:
            self._receive_piece(replica, f, idx[nm], axis, lo, hi)
        if missing:
            replica.commit([f"{nm} {a} {lo} {hi}" for nm, a, lo, hi in missing])
            log.info("received %d pieces from %s (cached in %s)", len(missing), self.who, replica.path.parent)

        w = self.w
        if w.cache_digest != hexd:
            w.cache.clear()
            w.cache_digest = hexd
        try:  # the coordinator's kernels where this node has them (same arithmetic), else its own best
            kern = select_kernels(backend or None, w.threads)
        except EdgeLLMError:
            kern = select_kernels(None, w.threads)
        ops, make_linear = kern.ops, kern.make_linear
        rcfg = RuntimeConfig(threads=w.threads, n_ctx=n_ctx, n_batch=n_batch, cache_type=self.cache_type)
        last = [time.monotonic()]

        def beat():
            if time.monotonic() - last[0] > 0.25:
                ch.send(PROGRESS, timeout=self.timeout)
                last[0] = time.monotonic()

        held = weight_bytes(cfg, f, s, rank)
        # without --memory-budget: what the machine (or its cgroup) has
        self.store = store = shard_store(f, cfg, s, rank, make_linear, hexd, rcfg, w.budget or memory_limit(),
                                         w.cache, "this node", beat)
        if hasattr(store, "plan"):
            n_batch = store.plan.n_batch
            log.info("streaming the shard:\n%s", store.plan.describe())
        self.model = cls(local_config(cfg, s), rcfg, store, ops)
        self.model.reduce = self.reduce
        store.load_all(beat)
        streamed = store.plan.stream_bytes if hasattr(store, "plan") else 0
        ch.send(READY, READY_S.pack(sent, held, n_batch, streamed), timeout=self.timeout)
        log.info("node %d/%d for %s: heads [%d, %d) (KV %s), FFN [%d, %d), vocabulary [%d, %d), %.1f MB of weights%s",
                 rank, n, self.who, s.h0, s.h1, list(kv_map(cfg, s.h0, s.h1)), s.f0, s.f1, s.v0, s.v1,
                 held / 1e6, f", {streamed / 1e6:.1f} MB streamed per pass" if streamed else "")
        self.E, self.V = cfg.n_embd, s.v1 - s.v0
        ch.set_limit(step_limit(n_batch, self.E, self.V))
        self.xbuf = np.empty((n_batch, self.E), np.float32)  # (n_batch, n_embd): the step's input
        self.n_ctx, self.n_batch = self.model.n_ctx, n_batch
        try:
            self.serve_steps()
        finally:
            if hasattr(store, "close"):
                store.close()

    def serve_steps(self) -> None:
        ch, m = self.ch, self.model
        while True:
            t, p = ch.recv(None, (STEP, STATS, BYE))
            if t == BYE:
                return
            if t == STATS:
                tel = getattr(self.store, "telemetry", {})
                ch.send(STATS, STATS_S.pack(process_bytes("VmHWM") or 0, process_bytes() or 0, int(tel.get("bytes_read", 0)),
                                            float(tel.get("io_wait_s", 0.0))), timeout=self.timeout)
                continue
            start, T, flags, z = wire.unpack(STEP_S, p)
            if z or not 1 <= T <= self.n_batch or flags > PROBE:
                raise ProtocolError("STEP out of range")
            x = self.xbuf[:T]
            x[:] = array(p, np.float32, (T, self.E), STEP_S.size)
            if flags == PROBE:  # `start` all-reduces of x and nothing else: the network's share of a step
                for _ in range(min(start, 4096)):
                    self.reduce(x)
                continue
            all_logits = flags == 1
            if start + T > self.n_ctx:
                raise ProtocolError("STEP beyond the context")
            positions = np.arange(start, start + T, dtype=np.int64)
            for i in range(m.cfg.n_layer):
                x = m.block(i, x, positions)
            logits = m.head(x if all_logits else x[-1:])  # (rows, V local)
            rows = max(1, LOGIT_CHUNK // (4 * self.V))
            for r0 in range(0, logits.shape[0], rows):
                part = np.ascontiguousarray(logits[r0:r0 + rows])
                ch.send(LOGITS, ROWS_S.pack(r0, part.shape[0]), part, timeout=self.timeout)

    def reduce(self, x: np.ndarray) -> np.ndarray:
        """Send this node's partial sum, return the total (a view valid until the next message)."""
        x = np.ascontiguousarray(x, np.float32)
        self.ch.send(PARTIAL, x, timeout=self.timeout)
        _, p = self.ch.recv(time.monotonic() + max(30.0, 6 * self.timeout), (SUM,))
        return array(p, np.float32, x.shape)

    def _model_file(self, hexd: str, size: int) -> tuple[GGUFFile | None, int]:
        """(the model file, 1) for a local copy, (the replica, 2) for a partial one, (None, 0)."""
        got = self.w.files.get(hexd)
        if got is not None:
            return got
        path = find_local(hexd)
        if path is not None:
            got = self.w.files[hexd] = (GGUFFile(path), 1)
            return got
        rep = Replica(hexd)
        if rep.has_header() and rep.path.stat().st_size == size:
            got = self.w.files[hexd] = (GGUFFile(rep.path), 2)
            return got
        return None, 0

    def _receive_header(self, rep: Replica, hexd: str, size: int) -> GGUFFile:
        rep.start(size)
        got, total = 0, None
        while total is None or got < total:
            _, p = self.ch.recv(self.deadline(), (PIECE,))
            i, axis, lo, hi, at, n = wire.unpack(PIECE_S, p)
            data = p[PIECE_S.size:]
            if i != -1 or axis or lo or at != got or hi != n or n > min(size, 1 << 30) or (total or n) != n \
                    or got + len(data) > n:
                raise ProtocolError("unexpected header piece")
            total = n
            rep.write(at, data)
            got += len(data)
        rep.commit(["header"])
        f = GGUFFile(rep.path)
        self.w.files[hexd] = (f, 2)
        if f.file_size != size:
            raise ProtocolError("the received header does not describe a file of the announced size")
        log.info("received the model header from %s", self.who)
        return f

    def _receive_piece(self, rep: Replica, f: GGUFFile, i: int, axis: int, lo: int, hi: int) -> None:
        t = f.info(list(f.tensors)[i])
        total, got = piece_bytes(t, axis, lo, hi), 0
        while got < total:
            _, p = self.ch.recv(self.deadline(), (PIECE,))
            hdr = wire.unpack(PIECE_S, p)
            data = p[PIECE_S.size:]
            if hdr != (i, axis, lo, hi, got, total) or got + len(data) > total or not len(data):
                raise ProtocolError("unexpected weight piece")
            rep.write_piece(t, axis, lo, hi, got, data)
            got += len(data)


def parse_size(text: str | None) -> int | None:
    """'2G', '512M' -> bytes (powers of 1024, as --memory-budget everywhere); None -> None."""
    if text is None:
        return None
    from ...offload.planner import parse_size as parse

    try:
        v = parse(text)
    except ValueError as e:
        raise ClusterError(f"--memory-budget: {e}") from None
    if v <= 0:
        raise ClusterError(f"memory budget must be positive, not {text!r}")
    return v
