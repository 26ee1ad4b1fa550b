"""The LAN cluster (runtime/cluster): shard plans, exact column splits, multi-process runs on
loopback against llama.cpp's tokens, shards sent once to a node without the file, lost and stalled
nodes, bad peers, and nodes in their own network namespaces; TLS keys and allow-lists, a loopback
capture with no plaintext, nodes under hard memory limits streaming their shards, rejoin.

Workers are real `edgellm worker` processes; the test process is the coordinator. Kernels are
numpy's (exact float32 weights) so that a sharded run differs from a single node only by float
summation order: its teacher-forced argmax must match llama.cpp's as tests/test_models.py checks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from edgellm.runtime import Engine, RuntimeConfig, SamplingParams
from edgellm.runtime.cluster import ClusterError, keygen, load_identity, messages, plan as P, wire

from conftest import model_file, reference_file
from memory_limit import MemoryGroup

# llama.cpp's tokens, except where its top-2 logits are closer than this (the cluster's prompts run
# the exact float path; these checks predate the exact-path rule of tests/test_models.py)
NEAR_TIE = {"gemma3-270m": 0.1, "qwen2.5-coder-0.5b": 0.05, "qwen2.5-coder-1.5b": 0.05}


def check_step(name, s, logits, ref_step, ref_token):
    (a, la), (b, lb) = ref_step[0], ref_step[1]
    ours = int(np.argmax(logits))
    if la - lb >= NEAR_TIE[name]:
        assert ours == ref_token, (
            f"{name} step {s}: chose {ours}, llama.cpp {ref_token} (its gap {la - lb:.3f}; "
            f"our logits {logits[a]:.3f} vs {logits[b]:.3f})"
        )
        return True
    assert ours in (a, b), f"{name} step {s}: near-tie, but {ours} is not llama.cpp's top 2 ({a}, {b})"
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert len(top5 & {t for t, _ in ref_step}) >= 4, f"{name} step {s}: top-5 sets differ"
    return ours == ref_token

CLUSTER_MODELS = ["gemma3-270m", "qwen2.5-coder-0.5b"]
WORKER = [sys.executable, "-c", "from edgellm.cli import main; main()", "worker"]


class Node:
    """An `edgellm worker` process (optionally in a network namespace); `address` waits for it."""

    def __init__(self, *args, env=None, netns=None, listen="127.0.0.1:0", preexec=None):
        cmd = [*WORKER, "--listen", listen, "--threads", "1", *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        err = None if os.environ.get("EDGELLM_TEST_LOGS") else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec)
        self._address = None

    @property
    def address(self) -> str:
        if self._address is None:
            line = self.proc.stdout.readline()
            if "listening on" not in line:
                self.stop()
                raise RuntimeError(f"worker did not start: {line!r}")
            self._address = line.rsplit(" ", 1)[1].strip()
        return self._address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Three workers: two find the model in the shared cache, the third has an empty home."""
    empty = tmp_path_factory.mktemp("nofile-home")
    ws = [Node(), Node(), Node(env={"EDGELLM_HOME": str(empty)})]
    yield ws
    for w in ws:
        w.stop()


def cluster_engine(name, addresses, **kw):
    """Equal shares unless the test says otherwise (the default, auto, follows measured speeds)."""
    kw = {"n_ctx": 512, "threads": 1, "backend": "numpy", "cluster_timeout": 10.0,
          "cluster_split": (1.0,) * (len(addresses) + 1), **kw}
    return Engine(model_file(name), RuntimeConfig(cluster=tuple(addresses), **kw))


def check_greedy(name, ids, p):
    """Free-running greedy ids against llama.cpp's, up to the first near-tie where they may part."""
    for s, (ours, theirs) in enumerate(zip(ids, p["gen_ids"])):
        if ours != theirs:
            step = p["top5_per_step"][s]
            assert step[0][1] - step[1][1] < NEAR_TIE[name], f"{name}: diverged at step {s} with no near-tie"
            return


# ---- plans and exact column splits (no processes) --------------------------------------------------

@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_plans_cover_the_model_and_balance_bytes(name):
    from edgellm.loaders.gguf import GGUFFile
    from edgellm.runtime.model import model_class

    with GGUFFile(model_file(name)) as f:
        cfg = model_class(f.metadata["general.architecture"]).config(f)
        V = f.info(P.output_name(f)).n_rows
        total = P.weight_bytes(cfg, f, P.NodeShard(0, cfg.n_head, 0, cfg.n_ff, 0, V), 0)
        for weights in ([1, 1], [1, 1, 1], [1, 1, 1, 1], [3, 1, 2]):
            plan = P.make_plan(cfg, f, weights, n_ctx=512, n_batch=64)
            ns = plan.nodes
            for field, end in (("h", cfg.n_head), ("f", cfg.n_ff), ("v", V)):
                bounds = [getattr(n, field + "0") for n in ns] + [getattr(ns[-1], field + "1")]
                assert bounds[0] == 0 and bounds[-1] == end and all(a < b for a, b in zip(bounds, bounds[1:]))
            for n in ns:
                kv = P.kv_map(cfg, n.h0, n.h1)
                assert (n.h1 - n.h0) % len(kv) == 0  # the local config's grouping holds
                g = cfg.n_head // cfg.n_head_kv
                local_g = (n.h1 - n.h0) // len(kv)
                assert [kv[j // local_g] for j in range(n.h1 - n.h0)] == [h // g for h in range(n.h0, n.h1)]
            got = [P.weight_bytes(cfg, f, n, r) for r, n in enumerate(ns)]
            for r, b in enumerate(got):  # each node about its share (KV heads replicated on top)
                assert b <= total * weights[r] / sum(weights) * 1.07 + 1e6, (name, weights, r, b / total)
            assert plan.digest(b"x" * 32, 512, 64) == P.Plan.from_table(plan.table()).digest(b"x" * 32, 512, 64)
        # memory budgets bound each node's streaming minimum (process, KV cache, its largest layer's
        # buffer), not its weights: a budget just under an equal share's minimum gets a smaller
        # share whose minimum fits; a budget below the process itself fails, naming the shortfall
        even = P.make_plan(cfg, f, [1, 1], n_ctx=4096, n_batch=64)
        tight = P.node_minimum(cfg, f, even, 1, 4096, 64) - 2_000_000
        plan = P.make_plan(cfg, f, [1, 1], budgets=[None, tight], n_ctx=4096, n_batch=64)
        assert P.node_minimum(cfg, f, plan, 1, 4096, 64) <= tight
        assert P.weight_bytes(cfg, f, plan.nodes[1], 1) < P.weight_bytes(cfg, f, even.nodes[1], 1)
        assert P.weight_bytes(cfg, f, plan.nodes[1], 1) + P.weight_bytes(cfg, f, plan.nodes[0], 0) >= total
        with pytest.raises(ClusterError, match=r"cannot hold the model.*node 1: needs at least .* MB short"):
            P.make_plan(cfg, f, [1, 1], budgets=[None, 150_000_000], n_ctx=512, n_batch=64)


def test_speed_weighted_membership():
    """Nodes join fastest first while they shorten the estimated token time; one whose share saves
    less than its round trips cost is left out with the numbers."""
    gb = 1e9
    keep, why = P.choose_nodes([10 * gb, 10 * gb, 10 * gb], [0, 1e-4, 1e-4], 56, 1_000_000_000)
    assert keep == [0, 1, 2] and not why
    keep, why = P.choose_nodes([10 * gb, 10 * gb, 0.2 * gb], [0, 1e-4, 1e-4], 56, 1_000_000_000)
    assert keep == [0, 1] and why[0][0] == 2 and "too slow to help" in why[0][1] and "0.20 GB/s" in why[0][1]
    keep, why = P.choose_nodes([10 * gb, 10 * gb], [0, 0.01], 56, 100_000_000)  # a slow link: 56 x 10 ms
    assert keep == [0] and "10.00 ms round trip" in why[0][1]


def test_column_split_inside_a_quant_block_is_exact():
    """3 heads of 128 columns in Q4_K's 256-wide blocks (qwen 1.5B on 4 nodes): each side keeps the
    covering blocks and multiplies a zero-padded input; the sum equals the whole product."""
    from edgellm.kernels_cpu import linear
    from edgellm.kernels_cpu.qmatmul_ref import matmul_ref, random_raw
    from edgellm.quant.ggml_types import GGMLType
    from edgellm.runtime.cluster.shard import _padded

    t, N, K, cut = GGMLType.Q4_K, 64, 1536, 384
    raw = random_raw(t, N, K, np.random.default_rng(0)).reshape(N, -1)
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    bs, ts = t.block_size, t.type_size
    parts = []
    for c0, c1 in ((0, cut), (cut, K)):
        b0, b1 = c0 // bs, -(-c1 // bs)
        w = linear.select("numpy").make_linear(np.ascontiguousarray(raw[:, b0 * ts:b1 * ts]), t, (b1 - b0) * bs)
        fn = _padded(w, c1 - c0, c0 - b0 * bs, b1 * bs - c1)
        parts.append(fn(x[:, c0:c1]))
    ref = matmul_ref(raw, t, K, x)
    assert np.allclose(parts[0] + parts[1], ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_keys_and_addresses(tmp_path):
    k = tmp_path / "cluster.key"
    keygen(k)
    ident = load_identity(k)
    assert ident.secured and (k.stat().st_mode & 0o777) == 0o600 and "PRIVATE KEY" not in (tmp_path / "cluster.key.crt").read_text()
    assert ident.allowed() == [ident.cert_der]  # without --allow: its own certificate only
    with pytest.raises(ClusterError, match="exists"):
        keygen(k)
    (tmp_path / "old.key").write_text("ab" * 32)  # a version-2 pre-shared key
    with pytest.raises(ClusterError, match="no private key"):
        load_identity(tmp_path / "old.key")
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(ClusterError, match="holds no certificate"):
        load_identity(k, tmp_path / "empty.pem")
    with pytest.raises(ClusterError, match="cannot read"):
        load_identity(k, tmp_path / "missing.pem")
    keygen(tmp_path / "two")  # one key's private half with another's certificate
    text, other = k.read_text(), (tmp_path / "two.crt").read_text()
    (tmp_path / "mixed").write_text(text[:text.index("-----BEGIN CERTIFICATE-----")] + other)
    with pytest.raises(ClusterError, match="cannot be used"):
        load_identity(tmp_path / "mixed")
    assert wire.parse_address("10.0.0.2:7000") == ("10.0.0.2", 7000)
    assert wire.parse_address("[::1]:7001") == ("::1", 7001)
    with pytest.raises(ClusterError):
        wire.parse_address("host:99999")
    with pytest.raises(ClusterError, match="needs a key"):
        from edgellm.runtime.cluster import Worker
        Worker("0.0.0.0", 0)


def test_frames_are_encrypted_authenticated_and_bounded(tmp_path):
    """Over a socket pair: TLS 1.3 between allowed keys; a key off the other's list, a flipped
    byte on the wire and an oversized length are refused; silence ends in a timeout."""
    import threading

    for n in ("a", "b", "c"):
        keygen(tmp_path / n)
    (tmp_path / "allow").write_text((tmp_path / "a.crt").read_text() + (tmp_path / "b.crt").read_text())
    a, b, c = (load_identity(tmp_path / n, tmp_path / "allow") for n in "abc")

    def pair(coord, work):
        x, y = socket.socketpair()
        got = {}

        def serve():
            try:
                got["w"] = wire.handshake_worker(y, work, 5)
            except ClusterError as e:
                got["w"] = e
        t = threading.Thread(target=serve)
        t.start()
        try:
            ch = wire.handshake_coordinator(x, coord, 5)
        finally:
            t.join()
        return ch, got["w"]

    ch, w = pair(a, b)
    assert ch.sock.version() == "TLSv1.3"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ch.send(messages.SUM, x)
    t, pl = w.recv(time.monotonic() + 5, (messages.SUM,))
    assert np.array_equal(wire.array(pl, np.float32, (3, 4)), x)
    with pytest.raises(wire.ProtocolError, match="expected"):
        ch.send(messages.BYE)
        w.recv(time.monotonic() + 5, (messages.SUM,))
    with pytest.raises(ClusterError, match="authentication failed"):  # c is on nobody's list
        pair(c, b)
    with pytest.raises(ClusterError, match="authentication failed"):
        pair(a, c)
    ch, w = pair(a, b)  # a length beyond the limit is refused before anything is read or allocated
    ch.sock.sendall(wire.HEADER.pack(messages.SUM, 0, 0, wire.HARD_LIMIT + 1))
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        w.recv(time.monotonic() + 5)
    with pytest.raises(wire.PeerGone):  # and silence ends in a timeout, not a hang
        w.recv(time.monotonic() + 0.2)
    # a byte flipped on the wire after the handshake: TLS's record authentication fails and
    # nothing is delivered. The worker's side passes through a relay that flips one byte when armed.
    x1, y1 = socket.socketpair()
    r1, r2 = socket.socketpair()
    armed = threading.Event()

    def pump(src, dst, flip):
        try:
            while data := src.recv(1 << 16):
                if flip and armed.is_set() and len(data) > 10:
                    data = bytearray(data)
                    data[10] ^= 1  # past the 5-byte record header: the ciphertext
                    armed.clear()
                dst.sendall(data)
        except OSError:  # the worker's side hangs up on the forged record
            pass
    threading.Thread(target=pump, args=(y1, r1, True), daemon=True).start()
    threading.Thread(target=pump, args=(r1, y1, False), daemon=True).start()
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("w", wire.handshake_worker(r2, b, 5)))
    t.start()
    ch = wire.handshake_coordinator(x1, a, 5)
    t.join()
    armed.set()
    ch.send(messages.SUM, np.zeros(64, np.float32))
    with pytest.raises(wire.PeerGone, match="connection lost"):
        got["w"].recv(time.monotonic() + 5)


# ---- multi-process runs on loopback ---------------------------------------------------------------

@pytest.mark.parametrize("name", CLUSTER_MODELS)
def test_cluster_matches_single_node(nodes, name):
    """2, 3 and 4 nodes: teacher-forced argmax as llama.cpp's (near-tie rule), weights ~1/N each,
    and the node without the file is sent its shard once, never again."""
    ref = json.loads(reference_file(f"llamacpp-{name}.json").read_text())
    for n in (2, 3, 4):
        eng = cluster_engine(name, [w.address for w in nodes[:n - 1]])
        try:
            cm = eng.model
            total = sum(P.weight_bytes(cm.cfg, cm.f, s, r) for r, s in enumerate(cm.plan.nodes))
            held = [cm.weight_bytes] + [p.weight_bytes for p in cm.live]
            assert max(held) <= 1.07 * total / n, (n, [h / total for h in held])
            if n == 4:
                sent = cm.live[2].ch.sent_bytes  # the worker without the file got its shard
                assert sent >= 0.9 * held[3], (sent, held[3])
            for p in ref["prompts"] if n == 4 else ref["prompts"][:2]:
                ids = p["prompt_ids"] + p["gen_ids"][:-1]
                logits = eng.prefill(ids, all_logits=True)[len(p["prompt_ids"]) - 1:]
                for s in range(32):
                    check_step(name, s, logits[s], p["top5_per_step"][s], p["gen_ids"][s])
            if n == 3:  # and the decode path (one token per pass) once per model
                eng.reset()
                p = ref["prompts"][0]
                list(eng.generate(p["prompt_ids"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)))
                check_greedy(name, eng.stats.ids, p)
        finally:
            eng.close()
    eng = cluster_engine(name, [w.address for w in nodes])  # again: nothing re-sent
    try:
        assert eng.model.live[2].ch.sent_bytes < 1e6
    finally:
        eng.close()


def test_workers_use_the_coordinators_cache_type(nodes):
    """OPEN carries the KV cache type: two nodes with q4_0 give logits near the single node's q4_0
    ones and far from float16's. Not equal: the shards' partial sums differ from one node's in the
    last bits, and q4_0's coarse rounding turns that into flipped values downstream (measured
    median max |difference| 0.44 vs 1.63 for float16; a worker left on float16 would sit midway)."""
    name = "qwen2.5-coder-0.5b"
    path = model_file(name)
    out = {}
    for key, kw in (("single f16", {}), ("single q4_0", {"cache_type": "q4_0"})):
        eng = Engine(path, RuntimeConfig(n_ctx=512, threads=1, backend="numpy", **kw))
        try:
            ids = eng.tokenizer.encode("def mean(xs):\n    total = 0\n    for x in xs:\n")
            out[key] = eng.prefill(ids, all_logits=True)
        finally:
            eng.close()
    eng = cluster_engine(name, [nodes[0].address], cache_type="q4_0")
    try:
        out["cluster q4_0"] = eng.prefill(ids, all_logits=True)
        assert isinstance(eng.model.caches[0].k, tuple)
    finally:
        eng.close()
    same = np.abs(out["cluster q4_0"] - out["single q4_0"]).max(axis=1)  # (T,)
    other = np.abs(out["single f16"] - out["single q4_0"]).max(axis=1)
    print(f"\nmedian max |logit difference|: cluster vs single q4_0 {np.median(same):.4f}, f16 vs q4_0 {np.median(other):.4f}")
    assert np.median(same) < np.median(other) / 3, (np.median(same), np.median(other))


# ---- faults -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_lost_node_is_replanned_and_generation_continues(nodes, how):
    """A worker killed (or stopped) mid-generation: detected within the timeout, reported by name,
    shards re-planned over the rest (the node without the file is sent only what it lacks), the
    KV caches rebuilt, and greedy generation goes on as if nothing happened."""
    name = "gemma3-270m"
    p = json.loads(reference_file(f"llamacpp-{name}.json").read_text())["prompts"][1]
    victim = Node()
    eng = cluster_engine(name, [victim.address, nodes[2].address], cluster_timeout=1.5)
    try:
        t = {}

        def fault():
            victim.proc.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            t["at"] = time.monotonic()

        ids = []
        for i, ev in enumerate(eng.generate(p["prompt_ids"], SamplingParams(temperature=0, max_tokens=8,
                                                                         ignore_eos=True))):
            ids.append(ev.token)
            if i == 2:
                fault()
            elif i == 3:
                t["next"] = time.monotonic()
        assert len(ids) == 8 and t["next"] - t["at"] < 1.5 + 8  # detection + re-plan + replay
        check_greedy(name, ids, p)
        ev = eng.model.events
        assert any(victim.address in e and "lost" in e for e in ev), ev
        cm = eng.model
        assert [q.address for q in cm.live] == [nodes[2].address] and len(cm.plan.nodes) == 2
        assert cm.live[0].ch.sent_bytes < 0.8 * P.weight_bytes(cm.cfg, cm.f, cm.plan.nodes[1], 1)
    finally:
        eng.close()
        victim.stop()


def test_setup_refuses_budgets_below_the_streaming_minimum():
    """Workers whose --memory-budget cannot hold even a streamed shard (process, KV cache, one
    layer's buffer): the cluster is refused, naming each such node and its shortfall."""
    name = "gemma3-270m"
    x, y = Node("--memory-budget", "100M"), Node("--memory-budget", "100M")
    try:
        with pytest.raises(ClusterError, match=rf"node 1 \({x.address}\): needs at least [\d,]+ MB, budget 105 MB, "
                                               rf"[\d,]+ MB short; node 2 \({y.address}\)"):
            Engine(model_file(name), RuntimeConfig(cluster=(x.address, y.address), n_ctx=256, threads=1,
                                                   backend="numpy", cluster_timeout=1.5, cluster_split=(1, 1, 1)))
    finally:
        x.stop()
        y.stop()


# ---- bad peers ------------------------------------------------------------------------------------------

def _raw(addr, data=b"", wait=0.0):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    if data:
        s.sendall(data)
    time.sleep(wait)
    return s


def _closed_by_peer(s, within):
    """Whether the worker hangs up on `s` within `within` seconds (it never answers a bad hello)."""
    s.settimeout(within)
    try:
        return s.recv(1 << 16) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_bad_peers_are_rejected_without_disturbing_a_session(tmp_path):
    name = "gemma3-270m"
    key = keygen(tmp_path / "k")
    keygen(tmp_path / "other")
    w = Node("--key", str(key))
    eng = cluster_engine(name, [w.address], cluster_key=str(key))
    try:
        before = eng.prefill([2, 818, 5279, 529], all_logits=True)
        silent = _raw(w.address)  # connects, sends nothing
        garbage = _raw(w.address, os.urandom(40))
        huge = _raw(w.address, wire.HEADER.pack(messages.STEP, 0, 0, 1 << 31) + b"\0" * 24)
        for s in (garbage, huge):
            assert _closed_by_peer(s, 5)
        with pytest.raises(ClusterError, match="authentication failed"):  # wrong key
            cluster_engine(name, [w.address], cluster_key=str(tmp_path / "other"))
        with pytest.raises(ClusterError, match="authentication failed"):  # no key at all
            cluster_engine(name, [w.address])
        eng.reset()
        after = eng.prefill([2, 818, 5279, 529], all_logits=True)  # the session is undisturbed
        assert np.array_equal(before, after)
        assert _closed_by_peer(silent, 8)  # dropped after the handshake timeout
    finally:
        eng.close()
    # an authenticated peer sending an oversized frame: the session ends, no allocation, worker lives
    host, port = w.address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    ch = wire.handshake_coordinator(s, load_identity(key), 5)
    ch.sock.sendall(wire.HEADER.pack(messages.OPEN, 0, 0, wire.HARD_LIMIT * 4))
    with pytest.raises(ClusterError, match="exceeds"):
        ch.recv(time.monotonic() + 5)
    s.close()
    eng = cluster_engine(name, [w.address], cluster_key=str(key))
    try:
        assert np.array_equal(eng.prefill([2, 818, 5279, 529], all_logits=True), before)
    finally:
        eng.close()
        w.stop()


# ---- separate hosts: network namespaces joined by veth, with tc shaping ---------------------------------

def _sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("network namespaces need root and iproute2 (ip, tc)")
    tag = f"el{os.getpid() % 10000}"
    made = []
    try:
        for ns in ("c", "a", "b"):
            _sh("ip", "netns", "add", f"{tag}{ns}")
            made.append(f"{tag}{ns}")
            _sh("ip", "-n", f"{tag}{ns}", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        for ns in made:
            _sh("ip", "netns", "del", ns, check=False)
        pytest.skip(f"cannot create network namespaces here: {getattr(e, 'stderr', e)}")
    shaping = []
    try:
        for i, w in enumerate(("a", "b"), 1):  # a star: the coordinator's namespace to each worker's
            c_if, w_if = f"{tag}c{i}", f"{tag}{w}0"
            _sh("ip", "link", "add", c_if, "type", "veth", "peer", "name", w_if)
            _sh("ip", "link", "set", c_if, "netns", f"{tag}c")
            _sh("ip", "link", "set", w_if, "netns", f"{tag}{w}")
            for ns, dev, ip in ((f"{tag}c", c_if, f"10.79.{i}.1/24"), (f"{tag}{w}", w_if, f"10.79.{i}.2/24")):
                _sh("ip", "-n", ns, "addr", "add", ip, "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                if _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "2ms", "rate", "100mbit",
                       check=False).returncode == 0:
                    shaping.append("netem 2ms 100mbit")
                elif _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "100mbit", "burst", "64kb",
                         "latency", "50ms", check=False).returncode == 0:
                    shaping.append("tbf 100mbit (this kernel has no netem: no added delay)")
        yield tag, shaping
    finally:
        for ns in made:
            _sh("ip", "netns", "del", ns, check=False)


def test_nodes_in_separate_network_namespaces(namespaces, tmp_path):
    tag, shaping = namespaces
    name = "gemma3-270m"
    p = json.loads(reference_file(f"llamacpp-{name}.json").read_text())["prompts"][0]
    key = keygen(tmp_path / "k")
    ws = [Node("--key", str(key), netns=f"{tag}{w}", listen=f"10.79.{i}.2:7370") for i, w in enumerate("ab", 1)]
    try:
        cmd = ["ip", "netns", "exec", f"{tag}c", sys.executable, "-c", "from edgellm.cli import main; main()",
               "run", str(model_file(name)), "--file", str(tmp_path / "prompt"), "--temp", "0", "-n", "8",
               "--ignore-eos", "--threads", "1", "--ctx", "256", "--backend", "numpy", "--json",
               "--cluster", ",".join(w.address for w in ws), "--key", str(key), "--split", "1,1,1"]
        (tmp_path / "prompt").write_text(p["prompt"])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout)
        assert out["prompt_ids"] == p["prompt_ids"] and len(out["ids"]) == 8
        assert [n["node"] for n in out["cluster"]][1:] == [w.address for w in ws]  # both workers took part
        check_greedy(name, out["ids"], p)
        print("shaping:", shaping)
    finally:
        for w in ws:
            w.stop()


# ---- cluster v2: per-node budgets, encrypted traffic, allow-lists, rejoin ------------------------------

def test_three_nodes_each_under_500m_stream_their_shards(tmp_path):
    """qwen2.5-coder-1.5b (1.1 GB) on 3 nodes, each in its own memory cgroup limited to 500 MiB
    with --memory-budget 500M: every node streams its shard, none is killed, and the greedy tokens
    are llama.cpp's (near-tie rule); per-node peak memory and bytes streamed are reported."""
    name = "qwen2.5-coder-1.5b"
    p = json.loads(reference_file(f"llamacpp-{name}.json").read_text())["prompts"][0]
    key = keygen(tmp_path / "k")
    limit = 500 << 20
    with MemoryGroup(limit) as g0, MemoryGroup(limit) as g1, MemoryGroup(limit) as g2:
        ws = [Node("--key", str(key), "--memory-budget", "500M", preexec=g.enter) for g in (g1, g2)]
        try:
            (tmp_path / "prompt").write_text(p["prompt"])
            cmd = [*WORKER[:3], "run", str(model_file(name)), "--file", str(tmp_path / "prompt"), "--temp", "0",
                   "-n", "12", "--ignore-eos", "--threads", "1", "--ctx", "512", "--json", "--memory-budget", "500M",
                   "--cluster", ",".join(w.address for w in ws), "--key", str(key), "--split", "1,1,1"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=g0.enter)
            assert r.returncode == 0 and not g0.oom_killed, r.stderr[-3000:]
            out = json.loads(r.stdout)
            assert out["prompt_ids"] == p["prompt_ids"] and len(out["ids"]) == 12
            check_greedy(name, out["ids"], p)
            nodes = out["cluster"]
            assert len(nodes) == 3 and all(n["streamed_per_pass"] > 100e6 for n in nodes), nodes
            assert all(n["bytes_read"] >= 12 * n["streamed_per_pass"] for n in nodes), nodes
            assert all(w.proc.poll() is None for w in ws) and not g1.oom_killed and not g2.oom_killed
            assert all(g.peak_bytes <= limit for g in (g0, g1, g2))
            print("\n" + "\n".join(f"{n['node']}: weights {n['weight_bytes'] / 1e6:.0f} MB, streamed "
                                    f"{n['streamed_per_pass'] / 1e6:.0f} MB/pass, peak RSS {n['peak_rss_bytes'] / 1e6:.0f} MB, "
                                    f"cgroup peak {g.peak_bytes / 1e6:.0f} MB" for n, g in zip(nodes, (g0, g1, g2))))
        finally:
            for w in ws:
                w.stop()


def _entropy(b: bytes) -> float:
    c = np.bincount(np.frombuffer(b, np.uint8), minlength=256) / max(1, len(b))
    c = c[c > 0]
    return float(-(c * np.log2(c)).sum())


def test_loopback_capture_shows_no_plaintext(tmp_path):
    """tshark on loopback while a worker without the model file is sent its shard (the GGUF header
    with every tensor name, then weight pieces) and a prompt runs: the TCP payload is random-looking
    (entropy ~8 bits/byte) and holds neither the prompt, its token ids, a tensor name nor a window
    of the weights."""
    if os.geteuid() != 0 or not shutil.which("tshark"):
        pytest.skip("capturing loopback traffic needs root and tshark (.ci/run installs it)")
    name = "gemma3-270m"
    empty = tmp_path / "home"
    empty.mkdir()
    key = keygen(tmp_path / "k")
    w = Node("--key", str(key), env={"EDGELLM_HOME": str(empty)})
    port = w.address.rsplit(":", 1)[1]
    pcap = tmp_path / "cap.pcapng"
    cap = subprocess.Popen(["tshark", "-i", "lo", "-B", "256", "-f", f"tcp port {port}", "-w", str(pcap), "-q"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not pcap.exists() and time.monotonic() < deadline:  # tshark writes the file once capturing
            time.sleep(0.2)
        time.sleep(1.0)
        prompt = "The secret launch code is swordfish-42, said the general."
        eng = cluster_engine(name, [w.address], cluster_key=str(key))
        try:
            ids = eng.tokenizer.encode(prompt)
            list(eng.generate(ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
            sent = eng.model.live[0].ch.sent_bytes
        finally:
            eng.close()
        time.sleep(1.0)
    finally:
        cap.terminate()
        cap.wait(20)
        w.stop()
    r = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "tcp.payload"], capture_output=True,
                       text=True, timeout=300)
    payload = b"".join(bytes.fromhex(line.replace(":", "")) for line in r.stdout.split() if line)
    # the shard travelled and most of it was captured (a busy 2-core machine drops some packets)
    assert len(payload) >= 0.5 * sent > 10e6, (len(payload), sent)
    h = _entropy(payload)
    print(f"\ncaptured {len(payload) / 1e6:.1f} MB of TCP payload, entropy {h:.4f} bits/byte")
    assert h > 7.99, h
    from edgellm.loaders.gguf import GGUFFile
    with GGUFFile(model_file(name)) as f:
        windows = [bytes(np.asarray(f.raw(n)).view(np.uint8).reshape(-1)[:64]) for n in
                   ("blk.0.ffn_down.weight", "blk.3.attn_q.weight", "output_norm.weight") if n in f.tensors]
        names = ["blk.0.ffn_down.weight", "token_embd.weight", "general.architecture"]
    for needle in [prompt.encode(), b"swordfish", np.asarray(ids, "<i8").tobytes(), np.asarray(ids, "<i4").tobytes(),
                   *(n.encode() for n in names), *windows]:
        assert needle not in payload, needle[:40]


def test_allow_lists_accept_and_revoke_keys(tmp_path):
    """Each node its own key: a worker accepts the coordinator whose certificate is on its
    --allow list, and refuses it once the certificate is taken off the list (no restart); the
    coordinator refuses a worker whose certificate it does not list."""
    name = "gemma3-270m"
    for n in ("worker", "coord", "stranger"):
        keygen(tmp_path / n)
    allow = tmp_path / "worker-allows"
    allow.write_text((tmp_path / "coord.crt").read_text())
    w = Node("--key", str(tmp_path / "worker"), "--allow", str(allow))
    kw = dict(cluster_key=str(tmp_path / "coord"), cluster_allow=str(tmp_path / "worker.crt"))
    try:
        eng = cluster_engine(name, [w.address], **kw)
        try:
            assert eng.model.live and eng.prefill([2, 818, 5279]).shape
        finally:
            eng.close()
        allow.write_text((tmp_path / "stranger.crt").read_text())  # revoked
        with pytest.raises(ClusterError, match="authentication failed: the worker refused this node's key"):
            cluster_engine(name, [w.address], **kw)
        allow.write_text((tmp_path / "coord.crt").read_text())
        with pytest.raises(ClusterError, match="authentication failed: the worker's key is not on this node's allow-list"):
            cluster_engine(name, [w.address], cluster_key=str(tmp_path / "coord"),
                           cluster_allow=str(tmp_path / "stranger.crt"))
    finally:
        w.stop()


def test_restarted_worker_is_readmitted_at_the_next_request():
    """A worker killed mid-generation: the run finishes on the rest; restarted on its address, the
    next request re-plans over it (logged) with the same greedy tokens, sent nothing it holds."""
    name = "gemma3-270m"
    p = json.loads(reference_file(f"llamacpp-{name}.json").read_text())["prompts"][1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    victim = Node(listen=f"127.0.0.1:{port}")
    other = Node()
    eng = cluster_engine(name, [victim.address, other.address], cluster_timeout=1.5)
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        first = []
        for i, ev in enumerate(eng.generate(p["prompt_ids"], params)):
            first.append(ev.token)
            if i == 1:
                victim.proc.kill()
        assert len(eng.model.live) == 1
        victim.stop()
        victim = Node(listen=f"127.0.0.1:{port}")
        assert victim.address.endswith(f":{port}")
        eng.reset()
        second = [ev.token for ev in eng.generate(p["prompt_ids"], params)]
        cm = eng.model
        assert [q.address for q in cm.live] == [victim.address, other.address] and len(cm.plan.nodes) == 3
        assert any("answering again" in e for e in cm.events), cm.events
        assert cm.live[0].setup_sent < 10_000  # it has the model file: OPEN and PLAN, no weights
        assert first == second
        check_greedy(name, second, p)
    finally:
        eng.close()
        victim.stop()
        other.stop()
