"""The cluster's transport: TLS 1.3 connections (keys.py) carrying framed messages over TCP.

Connection (coordinator C connects to worker W):
    TLS 1.3 handshake, both certificates checked against the other side's allow-list (keys.py)
    C -> W  HELLO  "EGLM" | u16 version | u16 role=1
    W -> C  HELLO  "EGLM" | u16 version | u16 role=2        (PINGS times: the least is `Channel.rtt`)
The coordinator sends nothing else before the worker's HELLO: a worker that refused its key in
the handshake has said so by then, so no message leaves for a node that does not accept us. The
repeated hellos time the application-level round trip (the link and both processes' wake-ups,
as an all-reduce sees it) for the speed-weighted split.

Frames after the hellos (both directions, inside TLS records: encrypted and authenticated there,
in order, never replayed):
    u8 type | u8 0 | u16 0 | u32 payload length || payload
Lengths above the channel's current limit are refused before anything is allocated. Payloads are
fixed little-endian structs and float32/int64 arrays read with numpy.frombuffer at shapes the
receiver already knows: nothing received is unpickled or evaluated.
"""
from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import struct
import time
from pathlib import Path

import numpy as np

from ...errors import EdgeLLMError
from .messages import ERROR, NAMES

VERSION = 3  # 2: OPEN carries the KV cache type; 3: TLS, INFO carries speed and free memory
MAGIC = b"EGLM"
HELLO = struct.Struct("<4sHH")  # magic, version, role
PINGS = 3  # hello round trips per handshake
ROLE_COORDINATOR, ROLE_WORKER = 1, 2
HEADER = struct.Struct("<BBHI")  # type, 0, 0, payload length
DEFAULT_PORT = 7370
CONTROL_LIMIT = 1 << 20  # payload limit before a plan fixes the session's shapes
HARD_LIMIT = 64 << 20  # no frame is ever larger


class ClusterError(EdgeLLMError):
    """A cluster could not be set up or lost too much to go on; the message says which node and why."""


class ProtocolError(ClusterError):
    """A peer broke the protocol (bad magic, type or length, a failed TLS handshake) or timed out."""


class PeerGone(ProtocolError):
    """The peer closed the connection or stopped answering within the deadline."""


# ---- addresses ----------------------------------------------------------------------------------

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

def _tls_error(e: Exception, side: str) -> ProtocolError:
    """A TLS failure as one line: whose key was refused, or what else went wrong."""
    text = str(getattr(e, "verify_message", "") or getattr(e, "reason", "") or e)
    if "did_not_return_a_certificate" in text.lower() or "peer did not return a certificate" in text.lower():
        return ProtocolError(f"authentication failed: the {side} presented no key (it needs --key)")
    if isinstance(e, ssl.SSLCertVerificationError):
        return ProtocolError(f"authentication failed: the {side}'s key is not on this node's allow-list ({text})")
    if isinstance(e, ssl.SSLError) and any(w in text.lower() for w in ("unknown_ca", "unknown ca", "certificate",
                                                                       "bad_certificate", "access_denied")):
        return ProtocolError(f"authentication failed: the {side} refused this node's key (it is not on its "
                             f"allow-list, or it needs one) ({text})")
    if isinstance(e, ssl.SSLEOFError):  # TLS 1.3: a peer that refuses our key may close before its alert is read
        return ProtocolError(f"authentication failed: the {side} closed the connection during the TLS handshake "
                             f"(it refuses this node's key, or it is not an edgellm node) ({text})")
    return ProtocolError(f"TLS handshake with the {side} failed: {text}")


def _hello_of(data: bytes, role: int, side: str) -> None:
    magic, version, got = HELLO.unpack(data)
    if magic != MAGIC or got != role:
        raise ProtocolError(f"the peer is not an edgellm {side}")
    if version != VERSION:
        raise ProtocolError(f"protocol version mismatch: this node speaks {VERSION}, the {side} {version}")


def handshake_coordinator(sock: socket.socket, identity, timeout: float) -> "Channel":
    """TLS as the client, then the hellos; `identity` is a keys.Identity. Closes `sock` on failure."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        tls = identity.context(server=False).wrap_socket(sock)
    except (ssl.SSLError, ssl.CertificateError) as e:
        sock.close()
        raise _tls_error(e, "worker") from None
    except (socket.timeout, OSError) as e:
        sock.close()
        raise PeerGone(f"connection lost during the TLS handshake: {e}") from None
    rtt = float("inf")
    try:
        for _ in range(PINGS):
            t0 = time.perf_counter()
            _send_raw(tls, HELLO.pack(MAGIC, VERSION, ROLE_COORDINATOR), deadline)
            reply = bytearray(HELLO.size)
            read_exact(tls, memoryview(reply), deadline, "the worker's hello")
            rtt = min(rtt, time.perf_counter() - t0)
            _hello_of(bytes(reply), ROLE_WORKER, "worker")
    except PeerGone as e:
        tls.close()
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ssl.SSLError):
            raise _tls_error(cause, "worker") from None
        raise PeerGone(f"{e} (a worker that refuses this node's key closes the connection here)") from None
    except ProtocolError:
        tls.close()
        raise
    ch = Channel(tls)
    ch.rtt = rtt
    return ch


def handshake_worker(sock: socket.socket, identity, timeout: float) -> "Channel":
    """TLS as the server (the coordinator's certificate checked there), then the hellos."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        tls = identity.context(server=True).wrap_socket(sock, server_side=True)
    except (ssl.SSLError, ssl.CertificateError) as e:
        raise _tls_error(e, "coordinator") from None
    except (socket.timeout, OSError) as e:
        raise PeerGone(f"no TLS handshake within the timeout: {e}") from None
    hello = bytearray(HELLO.size)
    for _ in range(PINGS):
        read_exact(tls, memoryview(hello), deadline, "the coordinator's hello")
        _hello_of(bytes(hello), ROLE_COORDINATOR, "coordinator")
        _send_raw(tls, HELLO.pack(MAGIC, VERSION, ROLE_WORKER), deadline)
    return Channel(tls)


def _send_raw(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        sock.sendall(data)
    except (socket.timeout, OSError) as e:
        raise PeerGone(f"connection lost during the handshake: {e}") from None


# ---- frames -------------------------------------------------------------------------------------

class Channel:
    """One TLS connection: `send(type, *parts)` and `recv(deadline) -> (type, payload)`.

    Frames are built in and read into buffers allocated once per limit (`set_limit`), so the hot
    path (STEP/PARTIAL/SUM/LOGITS) allocates nothing. A payload returned by `recv` is a view of the
    receive buffer, valid until the next `recv`."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.limit = 0
        self.set_limit(CONTROL_LIMIT)
        self.sent_bytes = self.recv_bytes = 0
        self.rtt = 0.0  # seconds: the least hello round trip (coordinator side)

    def set_limit(self, limit: int) -> None:
        """Accept and send payloads up to `limit` bytes (buffers grow; never above HARD_LIMIT)."""
        limit = min(int(limit), HARD_LIMIT)
        if limit > self.limit:
            self.limit = limit
            self.out = bytearray(HEADER.size + limit)
            self.inb = bytearray(HEADER.size + limit)
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
        HEADER.pack_into(self.out, 0, mtype, 0, 0, off - HEADER.size)
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
        mtype, z1, z2, n = HEADER.unpack_from(self.inb)
        if z1 or z2 or mtype not in NAMES:
            raise ProtocolError("malformed frame header")
        if n > self.limit:
            raise ProtocolError(f"frame of {n:,} bytes exceeds the {self.limit:,}-byte limit")
        end = HEADER.size + n
        read_exact(self.sock, self.in_mv[HEADER.size:end], deadline, NAMES[mtype])
        self.recv_bytes += end
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
