"""The coordinating node: a Model stand-in (forward, caches, n_ctx) that runs one shard itself and
drives the workers.

A forward pass: embed the tokens, send them (STEP) to every worker, run this node's layers with
`reduce` replaced by a star all-reduce (gather each worker's PARTIAL, add, send the SUM back: one
round trip), compute this node's vocabulary rows and gather the workers' (LOGITS).

Faults: every wait has a deadline (`cluster_timeout`). A worker that errs, closes or stays silent
raises NodeFailure; the coordinator logs which node and why, re-plans over the nodes left (each
reloads from its own file, or is sent only the pieces it lacks), re-prefills the tokens so far
and runs the pass again. If the nodes left cannot hold the model, the request fails with a
ClusterError saying so; the next request tries every configured node again. A lost node that
answers again (restarted, or back on the network) is re-admitted at the next request or chat turn
(`begin_request`): shards re-planned over it, sent only the pieces it lacks.

Shares (`--split auto`, the default): at the handshake each worker reports its free memory, its
process size and the weight bytes per second its kernels multiply (`shard.matvec_rate`); the
handshake's hellos time the round trip. Shares follow the rates, so every node finishes
its part of a layer together, and a node whose share would save less time than its round trips
add is left out and told why (`plan.choose_nodes`). Memory budgets (a node's --memory-budget, or
its free memory) cap the shares: a node whose shard does not fit streams it (shard.stream_shard).
"""
from __future__ import annotations

import logging
import socket
import time

import numpy as np

from ...errors import EdgeLLMError
from ...loaders.gguf import GGUFFile
from . import wire
from ...offload.planner import measure_baseline, process_bytes
from .keys import load_identity
from .plan import choose_nodes, local_config, make_plan, weight_bytes
from .replica import digest_of, piece_data
from .shard import matvec_rate, shard_store
from .messages import (BYE, ERROR, INFO, INFO_S, LOGITS, NEED, OPEN, OPEN_S, PARTIAL, PIECE, PIECE_CHUNK, PIECE_S, PLAN,
                       PLAN_S, PROBE, PROGRESS, READY, READY_S, ROWS_S, STATS, STATS_S, STEP, STEP_S, SUM, step_limit)
from .wire import ClusterError, array

log = logging.getLogger("edgellm.cluster")
SETUP_TIMEOUT = 20.0


class NodeFailure(Exception):
    def __init__(self, peer: "Peer", why: str):
        super().__init__(f"{peer.name}: {why}")
        self.peer, self.why = peer, why


class Peer:
    def __init__(self, address: str, index: int):
        self.host, self.port = wire.parse_address(address)
        self.address, self.index = address, index
        self.name = f"node {index} ({address})"
        self.ch: wire.Channel | None = None
        self.has = self.budget = self.threads = self.weight_bytes = self.baseline = self.free = 0
        self.rate = self.rtt = 0.0
        self.batch = self.streamed = self.setup_sent = 0
        self.shard = None

    def close(self) -> None:
        if self.ch is not None:
            self.ch.close()
            self.ch = None


class ClusterModel:
    def __init__(self, path, f: GGUFFile, cls, cfg, rcfg, ops, make_linear):
        self.f, self.cls, self.cfg, self.rcfg = f, cls, cfg, rcfg
        if any(n.endswith((".lr_a", ".lr_b")) for n in f.tensors):
            raise ClusterError(f"{f.path.name} carries low-rank corrections (edgellm compress --rank), which a "
                               "cluster does not shard yet; run it on one node or compress it without --rank")
        self.ops, self.make_linear = ops, make_linear
        self.digest = bytes.fromhex(digest_of(path))
        self.identity = load_identity(rcfg.cluster_key, getattr(rcfg, "cluster_allow", None))
        self.timeout = float(rcfg.cluster_timeout)
        self.peers = [Peer(a, i + 1) for i, a in enumerate(rcfg.cluster)]
        split = list(rcfg.cluster_split)
        if split and len(split) != len(self.peers) + 1:
            raise ClusterError(f"--split has {len(split)} weights for {len(self.peers) + 1} nodes "
                               "(the coordinator first, then each --cluster node)")
        self.split = split  # empty: auto, by the nodes' measured speeds
        self.rate = self._rate() if not split else 0.0
        self.slow: set[str] = set()  # addresses left out as too slow to help (not retried)
        self.batch = rcfg.n_batch  # tokens per cluster pass: the smallest any node's memory allows
        self._replay_from = None
        self.budget = getattr(rcfg, "memory_budget", None)
        self.n_ctx = min(rcfg.n_ctx, cfg.n_ctx_train)
        self.cache: dict = {}  # this node's packed weights, kept across re-plans
        self.history: list[int] = []  # the token at each position of the KV caches
        self.live: list[Peer] = []
        self.local = None
        self.comm_s, self.n_reduce = 0.0, 0
        self.events: list[str] = []
        self._setup(self.peers, strict=True)

    # --- the Model interface the engine uses ---

    @property
    def caches(self):
        return self.local.caches if self.local is not None else []

    def forward(self, ids, start: int, all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if start + ids.shape[0] > self.n_ctx:
            raise EdgeLLMError(f"context full: {start + ids.shape[0]} tokens exceed the context of {self.n_ctx}")
        if start > len(self.history):
            raise EdgeLLMError(f"forward at position {start} but only {len(self.history)} tokens are cached")
        replay = self._replay_from is not None
        self._replay_from = None
        for _ in range(len(self.peers) + 2):
            try:
                if self.local is None:  # a re-plan failed earlier: try every configured node again
                    self._setup(self.peers, strict=False)
                    replay = True
                if replay:
                    self._replay(start)
                    replay = False
                logits = self._chunks(ids, start, all_logits)
                del self.history[start:]
                self.history.extend(ids.tolist())
                return logits
            except NodeFailure as e:
                self._lost(e)
                replay = True
        raise ClusterError("the cluster keeps losing nodes; giving up on this request")

    def begin_request(self) -> None:
        """Called by the engine before each request or chat turn: lost nodes that answer again are
        admitted (the shards re-planned over them; the next pass rebuilds the KV caches)."""
        live = {p.address for p in self.live}
        back = [p for p in self.peers if p.address not in live and p.address not in self.slow and self._reachable(p)]
        if not back:
            return
        self._note(f"{', '.join(p.name for p in back)} answering again; re-planning over "
                   f"{len(self.live) + len(back) + 1} nodes")
        self._setup([p for p in self.peers if p.address in live or p in back], strict=False)
        self._replay_from = 0

    def _reachable(self, p: Peer) -> bool:
        try:
            socket.create_connection((p.host, p.port), timeout=min(self.timeout, 1.0)).close()
            return True
        except OSError:
            return False

    def node_stats(self) -> list[dict]:
        """Per node (the coordinator first): peak and current resident bytes, bytes streamed from
        disk, time waiting for streamed weights. A node that does not answer is skipped."""
        tel = getattr(self.local.w, "telemetry", {}) if self.local is not None else {}
        out = [{"node": "coordinator", "peak_rss_bytes": process_bytes("VmHWM") or 0, "rss_bytes": process_bytes() or 0,
                "bytes_read": int(tel.get("bytes_read", 0)), "io_wait_s": float(tel.get("io_wait_s", 0.0)),
                "weight_bytes": self.weight_bytes, "streamed_per_pass": self.streamed}]
        for p in self.live:
            try:
                self._send(p, STATS)
                _, pl = self._recv(p, (STATS,))
                peak, rss, nread, wait = wire.unpack(STATS_S, pl)
            except NodeFailure:
                continue
            out.append({"node": p.address, "peak_rss_bytes": peak, "rss_bytes": rss, "bytes_read": nread,
                        "io_wait_s": wait, "weight_bytes": p.weight_bytes, "streamed_per_pass": p.streamed})
        return out

    def close(self) -> None:
        if self.local is not None and hasattr(self.local.w, "close"):
            self.local.w.close()
        for p in self.live:
            if p.ch is not None:
                try:
                    p.ch.send(BYE, timeout=1.0)
                except wire.ClusterError:
                    pass
            p.close()
        self.live = []

    # --- setup and re-planning ---

    def _setup(self, peers: list[Peer], strict: bool) -> None:
        self.close()
        self.local = None
        peers = list(peers)
        while True:
            try:
                return self._try_setup(peers)
            except BaseException as e:
                for p in peers:
                    p.close()
                if not isinstance(e, NodeFailure):
                    raise
                if strict:
                    raise ClusterError(f"cannot set up the cluster: {e}") from None
                self._note(f"{e}; leaving it out")
                peers.remove(e.peer)

    def _try_setup(self, peers: list[Peer]) -> None:
        f, cfg, rc = self.f, self.cfg, self.rcfg
        opened = OPEN_S.pack(self.digest, f.file_size, self.n_ctx, rc.n_batch, int(self.timeout * 1000),
                             (rc.backend or "").encode("ascii")[:16], rc.cache_type.encode("ascii"))
        header = None
        for p in peers:
            self._connect(p)
            self._send(p, OPEN, opened)
            _, pl = self._recv(p, (INFO,), self._setup_deadline())
            if len(pl) != INFO_S.size:
                raise NodeFailure(p, "malformed INFO")
            p.has, p.budget, p.threads, p.baseline, p.free, p.rate = INFO_S.unpack(pl)
            if not (p.rate > 0 and p.rate < 1e15):
                raise NodeFailure(p, "reported an impossible speed")
            p.ch.set_limit(PIECE_S.size + PIECE_CHUNK)
            if p.has == 0:  # no copy of the model at all: send the GGUF header first
                if header is None:
                    with open(f.path, "rb") as fh:
                        header = memoryview(fh.read(f.data_offset))
                self._send_piece(p, -1, 0, 0, f.data_offset, header)
        if self.split:
            weights = [self.split[0]] + [self.split[p.index] for p in peers]
        else:  # speed-weighted; nodes too slow to help are told so and left out
            rates = [self.rate] + [p.rate for p in peers]
            keep, why = choose_nodes(rates, [0.0] + [p.rtt for p in peers], 2 * cfg.n_layer, self._model_bytes())
            for i, reason in why:
                p = peers[i - 1]
                self._note(f"{p.name} left out: {reason}")
                self.slow.add(p.address)
                try:
                    p.ch.send(ERROR, f"left out of the cluster: {reason}".encode()[:1024],
                              timeout=1.0)
                except wire.ClusterError:
                    pass
                p.close()
            peers[:] = [peers[i - 1] for i in keep if i > 0]
            weights = [self.rate] + [p.rate for p in peers]
        budgets = [self.budget] + [p.budget or p.free or None for p in peers]
        baselines = [measure_baseline(without_mapped_models=True)] + [p.baseline or None for p in peers]
        plan = make_plan(cfg, f, weights, budgets, self.n_ctx, rc.n_batch,
                         names=["the coordinator"] + [p.name for p in peers], cache_type=rc.cache_type,
                         baselines=baselines)
        h = plan.digest(self.digest, self.n_ctx, rc.n_batch)
        table = plan.table().astype("<i8")
        for r, p in enumerate(peers, 1):
            p.shard = plan.nodes[r]
            self._send(p, PLAN, PLAN_S.pack(r, len(plan.nodes), h), table)
        for p in peers:  # a replica asks for the pieces it lacks
            _, pl = self._recv(p, (NEED,), self._setup_deadline())
            if len(pl) % 32:
                raise NodeFailure(p, "malformed NEED")
            for i, axis, lo, hi in array(pl, np.int64, (len(pl) // 32, 4)).tolist():
                try:
                    data = piece_data(f, i, axis, lo, hi)
                except ValueError:
                    raise NodeFailure(p, "asked for a piece that does not exist") from None
                self._send_piece(p, i, axis, lo, hi, data)
        store, batch = self._local_store(plan), rc.n_batch
        if hasattr(store, "plan"):
            batch = store.plan.n_batch
        local = self.cls(local_config(cfg, plan.nodes[0]), rc, store, self.ops)
        store.load_all()
        for p in peers:
            while True:  # PROGRESS frames while the worker packs; each one restarts the deadline
                t, pl = self._recv(p, (PROGRESS, READY), self._setup_deadline())
                if t == READY:
                    break
            if len(pl) != READY_S.size or READY_S.unpack(pl)[0] != h:
                raise NodeFailure(p, "acknowledged another plan")
            _, p.weight_bytes, p.batch, p.streamed = READY_S.unpack(pl)
            if not 1 <= p.batch <= rc.n_batch:
                raise NodeFailure(p, "reported an impossible batch size")
            batch = min(batch, p.batch)
            p.setup_sent = p.ch.sent_bytes  # the model bytes it was sent (header, pieces), and the plan
            p.ch.set_limit(step_limit(rc.n_batch, cfg.n_embd, p.shard.v1 - p.shard.v0))
        local.reduce = self._allreduce
        self.local, self.plan, self.live, self.batch = local, plan, peers, batch
        self.weight_bytes = weight_bytes(cfg, f, plan.nodes[0], 0)
        self.streamed = store.plan.stream_bytes if hasattr(store, "plan") else 0
        log.info("cluster of %d nodes ready: %s", len(plan.nodes),
                 "; ".join(f"{n}: heads [{s.h0}, {s.h1}) FFN [{s.f0}, {s.f1}) vocab [{s.v0}, {s.v1})"
                           for n, s in zip(["coordinator"] + [p.name for p in peers], plan.nodes)))

    def _rate(self) -> float:
        """This node's matvec rate, measured with the default kernels as the workers measure theirs."""
        from ..engine import select_kernels

        return matvec_rate(select_kernels(None, self.rcfg.max_threads).make_linear)

    def _model_bytes(self) -> int:
        return sum(t.nbytes for t in self.f.tensors.values()
                   if not (t.name == "token_embd.weight" and "output.weight" in self.f.tensors))

    def _local_store(self, plan):
        """This node's shard: resident, or streamed from its shard file when --memory-budget cannot hold it."""
        store = shard_store(self.f, self.cfg, plan.nodes[0], 0, self.make_linear, self.digest.hex(), self.rcfg,
                            self.budget, self.cache, "the coordinator")
        if hasattr(store, "plan"):
            log.info("coordinator streams its shard:\n%s", store.plan.describe())
        return store

    def _setup_deadline(self) -> float:
        """Setup waits (a node opening and parsing its file, computing what it lacks) get more time
        than the waits of a forward pass, which detect lost nodes."""
        return time.monotonic() + max(4 * self.timeout, SETUP_TIMEOUT)

    def _connect(self, p: Peer) -> None:
        p.close()
        try:
            sock = socket.create_connection((p.host, p.port), timeout=self.timeout)
        except OSError as e:
            raise NodeFailure(p, f"cannot connect: {e.strerror or e}") from None
        try:
            wire.tune(sock)
            p.ch = wire.handshake_coordinator(sock, self.identity, max(self.timeout, 2.0))
            p.rtt = p.ch.rtt
        except (wire.ClusterError, OSError) as e:
            sock.close()
            raise NodeFailure(p, str(e)) from None

    def _send_piece(self, p: Peer, i: int, axis: int, lo: int, hi: int, data: memoryview) -> None:
        n = len(data)
        for at in range(0, n, PIECE_CHUNK):
            self._send(p, PIECE, PIECE_S.pack(i, axis, lo, hi, at, n), data[at:at + PIECE_CHUNK])

    def _lost(self, e: NodeFailure) -> None:
        left = [p for p in self.live if p is not e.peer]
        self._note(f"lost {e}; re-planning over {len(left) + 1} node{'s' * bool(left)}")
        e.peer.close()
        try:
            self._setup(left, strict=False)
        except ClusterError as err:
            raise ClusterError(f"lost {e}, and {err}") from None

    def _replay(self, start: int) -> None:
        """Rebuild the new shards' KV caches: re-prefill the tokens before `start`."""
        n = self.batch
        for s in range(0, start, n):
            self._forward(np.asarray(self.history[s:min(start, s + n)], np.int64), s, False)

    def _chunks(self, ids: np.ndarray, start: int, all_logits: bool) -> np.ndarray:
        """A forward pass in batches of at most `self.batch` tokens (the smallest any node's budget allows)."""
        if ids.shape[0] <= self.batch:
            return self._forward(ids, start, all_logits)
        out = []
        for s in range(0, ids.shape[0], self.batch):
            last = s + self.batch >= ids.shape[0]
            r = self._forward(ids[s:s + self.batch], start + s, all_logits)
            if all_logits or last:
                out.append(r)
        return np.concatenate(out)

    def _note(self, msg: str) -> None:
        self.events.append(msg)
        log.warning("cluster: %s", msg)

    def probe(self, n_reduce: int, T: int = 1) -> float:
        """Seconds for one STEP and `n_reduce` all-reduces of (T, n_embd) zeros with no model work
        on any node: the network's and the protocol's share of a forward pass (bench/cluster.py)."""
        x = np.zeros((T, self.cfg.n_embd), np.float32)  # (T, n_embd); partial sums of zeros stay zeros
        saved = self.comm_s, self.n_reduce
        t0 = time.perf_counter()
        for p in self.live:
            self._send(p, STEP, STEP_S.pack(n_reduce, T, PROBE, 0), x)
        for _ in range(n_reduce):
            self._allreduce(x)
        dt = time.perf_counter() - t0
        self.comm_s, self.n_reduce = saved
        return dt

    # --- the forward pass ---

    def _forward(self, ids: np.ndarray, start: int, all_logits: bool) -> np.ndarray:
        m = self.local
        x = np.ascontiguousarray(m.embed(ids), np.float32)  # (T, n_embd)
        T = x.shape[0]
        hdr = STEP_S.pack(start, T, int(all_logits), 0)
        t0 = time.perf_counter()
        for p in self.live:
            self._send(p, STEP, hdr, x)
        self.comm_s += time.perf_counter() - t0
        positions = np.arange(start, start + T, dtype=np.int64)
        for i in range(self.cfg.n_layer):
            x = m.block(i, x, positions)
        mine = m.head(x if all_logits else x[-1:])  # (rows, vocabulary rows of node 0)
        return self._gather(mine)

    def _allreduce(self, x: np.ndarray) -> np.ndarray:
        """Star all-reduce: the workers' partial sums are added to this node's, the total sent back."""
        t0 = time.perf_counter()
        x = np.ascontiguousarray(x, np.float32)  # (T, n_embd)
        deadline = time.monotonic() + self.timeout
        for p in self.live:
            _, pl = self._recv(p, (PARTIAL,), deadline)
            x += self._array(p, pl, x.shape)
        for p in self.live:
            self._send(p, SUM, x)
        self.comm_s += time.perf_counter() - t0
        self.n_reduce += 1
        return x

    def _gather(self, mine: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        R = mine.shape[0]
        out = np.empty((R, self.cfg.n_vocab), np.float32)  # (rows, n_vocab)
        s0 = self.plan.nodes[0]
        out[:, s0.v0:s0.v1] = mine
        deadline = time.monotonic() + self.timeout
        for p in self.live:
            v0, v1 = p.shard.v0, p.shard.v1
            r = 0
            while r < R:
                _, pl = self._recv(p, (LOGITS,), deadline)
                try:
                    r0, n = wire.unpack(ROWS_S, pl)
                except wire.ProtocolError as e:
                    raise NodeFailure(p, str(e)) from None
                if r0 != r or not 1 <= n <= R - r:
                    raise NodeFailure(p, "sent logits out of order")
                out[r:r + n, v0:v1] = self._array(p, pl, (n, v1 - v0), ROWS_S.size)
                r += n
        self.comm_s += time.perf_counter() - t0
        return out

    # --- messages, every failure pinned on its node ---

    def _send(self, p: Peer, mtype: int, *parts) -> None:
        try:
            p.ch.send(mtype, *parts, timeout=self.timeout)
        except wire.ClusterError as e:
            raise NodeFailure(p, str(e)) from None

    def _recv(self, p: Peer, expect, deadline: float | None = None):
        try:
            return p.ch.recv(deadline or time.monotonic() + self.timeout, expect)
        except wire.ClusterError as e:
            raise NodeFailure(p, str(e)) from None

    @staticmethod
    def _array(p: Peer, payload, shape, offset: int = 0) -> np.ndarray:
        try:
            return array(payload, np.float32, shape, offset)
        except wire.ProtocolError as e:
            raise NodeFailure(p, str(e)) from None
