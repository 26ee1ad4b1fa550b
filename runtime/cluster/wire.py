"""The cluster's transport: keys, mutual authentication, and framed, MACed messages over TCP.

Handshake (coordinator C connects to worker W; K = the pre-shared key, b"" without one):
    C -> W  HELLO  "EGLM" | u16 version | u16 role=1 | nonce_c (32)                      40 bytes
    W -> C  REPLY  "EGLM" | u16 version | u16 role=2 | nonce_w (32) | mac_w (32)        72 bytes
    C -> W  PROOF  mac_c (32)
with t = HELLO || REPLY[:40], mac_w = HMAC(K, "edgellm worker" || t), mac_c = HMAC(K, "edgellm
coordinator" || t). Each side checks the other's MAC (constant time) before anything else is read;
the labels differ, so a proof cannot be reflected. Session keys: k_cw = HMAC(K, "c->w" || t),
k_wc = HMAC(K, "w->c" || t): fresh per connection, so frames replayed from another session fail.

Frames after the handshake (both directions):
    u8 type | u8 0 | u16 0 | u32 payload length | u64 sequence || payload || HMAC-SHA256(32)
The MAC covers header and payload under the direction's session key; the sequence number must be
exactly the next one expected (replay, reordering and deletion fail). Lengths above the channel's
current limit are refused before anything is allocated. Payloads are fixed little-endian structs
and float32/int64 arrays read with numpy.frombuffer at shapes the receiver already knows: nothing
received is unpickled or evaluated. Integrity and authentication only: payloads travel unencrypted.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import struct
import time
from pathlib import Path

import numpy as np

from ...errors import EdgeLLMError
from .messages import ERROR, NAMES

VERSION = 2  # 2: OPEN carries the KV cache type
MAGIC = b"EGLM"
HELLO = struct.Struct("<4sHH32s")  # magic, version, role, nonce
ROLE_COORDINATOR, ROLE_WORKER = 1, 2
HEADER = struct.Struct("<BBHIQ")  # type, 0, 0, payload length, sequence
MAC_BYTES = 32
DEFAULT_PORT = 7370
CONTROL_LIMIT = 1 << 20  # payload limit before a plan fixes the session's shapes
HARD_LIMIT = 64 << 20  # no frame is ever larger


class ClusterError(EdgeLLMError):
    """A cluster could not be set up or lost too much to go on; the message says which node and why."""


class ProtocolError(ClusterError):
    """A peer broke the protocol: bad magic, MAC, sequence, type or length; or it timed out."""


class PeerGone(ProtocolError):
    """The peer closed the connection or stopped answering within the deadline."""


# ---- keys and addresses -------------------------------------------------------------------------

def keygen(path: str | os.PathLike, force: bool = False) -> Path:
    """Write a new 256-bit key as hex to `path` (mode 0600); refuses to overwrite unless `force`."""
    p = Path(path).expanduser()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise ClusterError(f"{p} exists; remove it first (or pass --force) to make a new key") from None
    except OSError as e:
        raise ClusterError(f"cannot write {p}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return p


def load_key(path: str | os.PathLike | None) -> bytes:
    """The key in `path` (64 hex digits), or b"" for None (no key: loopback only)."""
    if path is None:
        return b""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="ascii", errors="replace").strip()
    except OSError as e:
        raise ClusterError(f"cannot read key file {p}: {e.strerror}") from None
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ClusterError(f"key file {p} must hold 64 hex digits (make one with `edgellm keygen {p}`)")
    return bytes.fromhex(text)


def parse_address(s: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT', ':PORT', 'HOST' or '[v6]:PORT' -> (host, port)."""
    s = s.strip()
    host, port = s, DEFAULT_PORT
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif s.count(":") == 1:
        host, port = s.split(":")
    try:
        port = int(port)
    except ValueError:
        port = -1
    if not 0 <= port < 65536:
        raise ClusterError(f"bad address {s!r}: expected HOST:PORT with a port 0..65535")
    return host or default_host, port


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def tune(sock: socket.socket) -> None:
    """Low latency (TCP_NODELAY) and dead-peer detection (keepalive) on a connected socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, v in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), v)


# ---- reading with a deadline --------------------------------------------------------------------

def read_exact(sock: socket.socket, mv: memoryview, deadline: float | None, what: str) -> None:
    """Fill `mv` from `sock` or raise PeerGone (closed, or the deadline passed)."""
    got, n = 0, len(mv)
    while got < n:
        if deadline is None:
            sock.settimeout(None)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerGone(f"no {what} within the timeout")
            sock.settimeout(left)
        try:
            k = sock.recv_into(mv[got:], n - got)
        except socket.timeout:
            raise PeerGone(f"no {what} within the timeout") from None
        except OSError as e:
            raise PeerGone(f"connection lost while reading {what}: {e.strerror or e}") from None
        if k == 0:
            raise PeerGone(f"connection closed while reading {what}")
        got += k


# ---- the handshake ------------------------------------------------------------------------------

def _mac(key: bytes, label: bytes, t: bytes) -> bytes:
    return hmac.digest(key, label + t, "sha256")


def handshake_coordinator(sock: socket.socket, key: bytes, timeout: float) -> "Channel":
    deadline = time.monotonic() + timeout
    hello = HELLO.pack(MAGIC, VERSION, ROLE_COORDINATOR, secrets.token_bytes(32))
    _send_raw(sock, hello, deadline)
    reply = bytearray(HELLO.size + MAC_BYTES)
    read_exact(sock, memoryview(reply), deadline, "handshake reply")
    magic, version, role, _ = HELLO.unpack_from(reply)
    if magic != MAGIC or role != ROLE_WORKER:
        raise ProtocolError("the peer is not an edgellm worker")
    if version != VERSION:
        raise ProtocolError(f"protocol version mismatch: this coordinator speaks {VERSION}, the worker {version}")
    t = hello + bytes(reply[:HELLO.size])
    if not hmac.compare_digest(bytes(reply[HELLO.size:]), _mac(key, b"edgellm worker", t)):
        raise ProtocolError("authentication failed: the worker does not hold this key (or needs one)")
    _send_raw(sock, _mac(key, b"edgellm coordinator", t), deadline)
    return Channel(sock, _mac(key, b"c->w", t), _mac(key, b"w->c", t))


def handshake_worker(sock: socket.socket, key: bytes, timeout: float) -> "Channel":
    deadline = time.monotonic() + timeout
    hello = bytearray(HELLO.size)
    read_exact(sock, memoryview(hello), deadline, "handshake hello")
    magic, version, role, _ = HELLO.unpack_from(hello)
    if magic != MAGIC or role != ROLE_COORDINATOR:
        raise ProtocolError("not an edgellm coordinator hello")
    mine = HELLO.pack(MAGIC, VERSION, ROLE_WORKER, secrets.token_bytes(32))
    t = bytes(hello) + mine
    _send_raw(sock, mine + _mac(key, b"edgellm worker", t), deadline)
    if version != VERSION:
        raise ProtocolError(f"protocol version mismatch: this worker speaks {VERSION}, the coordinator {version}")
    proof = bytearray(MAC_BYTES)
    read_exact(sock, memoryview(proof), deadline, "handshake proof")
    if not hmac.compare_digest(bytes(proof), _mac(key, b"edgellm coordinator", t)):
        raise ProtocolError("authentication failed: wrong key")
    return Channel(sock, _mac(key, b"w->c", t), _mac(key, b"c->w", t))


def _send_raw(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        sock.sendall(data)
    except (socket.timeout, OSError) as e:
        raise PeerGone(f"connection lost during the handshake: {e}") from None


# ---- frames -------------------------------------------------------------------------------------

class Channel:
    """One authenticated connection: `send(type, *parts)` and `recv(deadline) -> (type, payload)`.

    Frames are built in and read into buffers allocated once per limit (`set_limit`), so the hot
    path (STEP/PARTIAL/SUM/LOGITS) allocates nothing but the 32-byte MAC digests. A payload returned
    by `recv` is a view of the receive buffer, valid until the next `recv`."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes):
        self.sock = sock
        self.send_key, self.recv_key = send_key, recv_key
        self.send_seq = self.recv_seq = 0
        self.limit = 0
        self.set_limit(CONTROL_LIMIT)
        self.sent_bytes = self.recv_bytes = 0

    def set_limit(self, limit: int) -> None:
        """Accept and send payloads up to `limit` bytes (buffers grow; never above HARD_LIMIT)."""
        limit = min(int(limit), HARD_LIMIT)
        if limit > self.limit:
            self.limit = limit
            self.out = bytearray(HEADER.size + limit + MAC_BYTES)
            self.inb = bytearray(HEADER.size + limit + MAC_BYTES)
            self.out_mv, self.in_mv = memoryview(self.out), memoryview(self.inb)

    def send(self, mtype: int, *parts, timeout: float | None = None) -> None:
        """Send one frame whose payload is the concatenation of `parts` (bytes or contiguous arrays)."""
        mv, off = self.out_mv, HEADER.size
        for p in parts:
            b = memoryview(np.ascontiguousarray(p).reshape(-1).view(np.uint8)) if isinstance(p, np.ndarray) \
                else memoryview(p)
            n = b.nbytes
            if off + n > HEADER.size + self.limit:
                raise ProtocolError(f"{NAMES.get(mtype, mtype)} payload exceeds the {self.limit:,}-byte limit")
            mv[off:off + n] = b
            off += n
        HEADER.pack_into(self.out, 0, mtype, 0, 0, off - HEADER.size, self.send_seq)
        mv[off:off + MAC_BYTES] = hmac.digest(self.send_key, mv[:off], "sha256")
        off += MAC_BYTES
        self.send_seq += 1
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(mv[:off])
        except socket.timeout:
            raise PeerGone(f"could not send {NAMES.get(mtype, mtype)} within the timeout") from None
        except OSError as e:
            raise PeerGone(f"connection lost while sending {NAMES.get(mtype, mtype)}: {e.strerror or e}") from None
        self.sent_bytes += off

    def recv(self, deadline: float | None, expect: tuple[int, ...] | None = None) -> tuple[int, memoryview]:
        hdr = self.in_mv[:HEADER.size]
        read_exact(self.sock, hdr, deadline, "a message")
        mtype, z1, z2, n, seq = HEADER.unpack_from(self.inb)
        if z1 or z2 or mtype not in NAMES:
            raise ProtocolError("malformed frame header")
        if n > self.limit:
            raise ProtocolError(f"frame of {n:,} bytes exceeds the {self.limit:,}-byte limit")
        body = self.in_mv[HEADER.size:HEADER.size + n + MAC_BYTES]
        read_exact(self.sock, body, deadline, NAMES[mtype])
        end = HEADER.size + n
        if not hmac.compare_digest(self.in_mv[end:end + MAC_BYTES],
                                   hmac.digest(self.recv_key, self.in_mv[:end], "sha256")):
            raise ProtocolError("message authentication failed")
        if seq != self.recv_seq:
            raise ProtocolError(f"sequence number {seq}, expected {self.recv_seq} (replayed or lost frame)")
        self.recv_seq += 1
        self.recv_bytes += end + MAC_BYTES
        payload = self.in_mv[HEADER.size:end]
        if mtype == ERROR:
            raise ClusterError(bytes(payload[:1024]).decode("utf-8", "replace"))
        if expect is not None and mtype not in expect:
            want = " or ".join(NAMES[e] for e in expect)
            raise ProtocolError(f"expected {want}, got {NAMES[mtype]}")
        return mtype, payload

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def array(payload: memoryview, dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """A received array at a shape the receiver expects; ProtocolError if the length differs."""
    dt = np.dtype(dtype).newbyteorder("<")
    count = int(np.prod(shape))
    if len(payload) - offset != count * dt.itemsize:
        raise ProtocolError(f"payload of {len(payload) - offset} bytes, expected {count * dt.itemsize} for {shape}")
    return np.frombuffer(payload, dt, count, offset).reshape(shape)


def unpack(st: struct.Struct, payload: memoryview) -> tuple:
    """The fixed header at the start of a payload; ProtocolError if the payload is shorter."""
    if len(payload) < st.size:
        raise ProtocolError(f"payload of {len(payload)} bytes is shorter than its {st.size}-byte header")
    return st.unpack_from(payload)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
