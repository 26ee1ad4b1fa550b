"""Node identities and the TLS 1.3 contexts the cluster's connections run over.

No protocol of our own: every connection is TLS 1.3 (Python's `ssl`, i.e. OpenSSL), mutually
authenticated by certificates, encrypted with AES-GCM or ChaCha20-Poly1305 as OpenSSL negotiates.

- `edgellm keygen FILE` makes a node identity: an Ed25519 private key and a self-signed certificate
  for it (the `cryptography` package), both in FILE (PEM, mode 0600), and the certificate alone in
  FILE.crt, which is public: it is what other nodes put on their allow-lists.
- `--key FILE` is this node's identity; `--allow FILE` a PEM file of the certificates it accepts
  (the peers' FILE.crt, concatenated). Without --allow a node accepts its own certificate only, so
  one key file copied to every node makes a cluster with one shared identity. A certificate
  removed from the allow-list is refused from the next connection on (workers re-read the file
  when it changes): that is revocation.
- Both sides verify: the worker refuses a coordinator whose certificate is not on its list during
  the TLS handshake, before any message is read; the coordinator refuses such a worker before it
  sends anything.
- No key (loopback only, enforced by the worker): the worker presents a throw-away certificate and
  the coordinator does not check it: encrypted, but unauthenticated, as on one machine.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .wire import ClusterError


def _cert_pem(private_key, name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=36500))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(private_key, None))
    return cert.public_bytes(serialization.Encoding.PEM)


def _new_identity(name: str) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM) of a fresh Ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    k = ed25519.Ed25519PrivateKey.generate()
    key_pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    return key_pem, _cert_pem(k, name)


def _write_new(p: Path, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(p, flags, mode)
    except FileExistsError:
        raise ClusterError(f"{p} exists; remove it first (or pass --force) to make a new key") from None
    except OSError as e:
        raise ClusterError(f"cannot write {p}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def cert_path(key_path: str | os.PathLike) -> Path:
    p = Path(key_path).expanduser()
    return p.with_name(p.name + ".crt")


def keygen(path: str | os.PathLike, force: bool = False) -> Path:
    """Write a new identity to `path` (key + certificate, 0600) and its certificate to path.crt."""
    p = Path(path).expanduser()
    crt = cert_path(p)
    if not force:
        for q in (p, crt):
            if q.exists():
                raise ClusterError(f"{q} exists; remove it first (or pass --force) to make a new key")
    key_pem, cert_pem = _new_identity(f"edgellm node {p.stem}")
    _write_new(p, key_pem + cert_pem, 0o600, force)
    _write_new(crt, cert_pem, 0o644, True)
    return p


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of a certificate (DER), the short form logs and `keygen` print."""
    return hashlib.sha256(cert_der).hexdigest()


def _certs_in(pem: str, what: Path) -> list[bytes]:
    """The DER certificates in PEM text; ClusterError naming `what` if there is none or one is broken."""
    out = []
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    at = 0
    while (i := pem.find(begin, at)) >= 0:
        j = pem.find(end, i)
        if j < 0:
            raise ClusterError(f"{what} holds a certificate that is cut off")
        try:
            out.append(ssl.PEM_cert_to_DER_cert(pem[i:j + len(end)]))
        except ValueError:
            raise ClusterError(f"{what} holds a certificate that is not valid PEM") from None
        at = j + len(end)
    if not out:
        raise ClusterError(f"{what} holds no certificate (make a key with `edgellm keygen FILE`; its "
                        "certificate is FILE.crt)")
    return out


def _read(p: Path, what: str) -> str:
    try:
        if p.stat().st_size > 1 << 20:
            raise ClusterError(f"{what} {p} is larger than 1 MB; it cannot be a key or a list of certificates")
        return p.read_text(encoding="ascii", errors="replace")
    except OSError as e:
        raise ClusterError(f"cannot read {what} {p}: {e.strerror}") from None


@dataclass
class Identity:
    """This node's key file and the certificates it accepts (None key: no identity, loopback only)."""

    key_file: Path | None
    allow_file: Path | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self._stamp = None
        self._ctx: dict[bool, ssl.SSLContext] = {}
        if self.key_file is not None:
            self.key_file = Path(self.key_file).expanduser()
            text = _read(self.key_file, "key file")
            if "PRIVATE KEY-----" not in text:
                raise ClusterError(f"key file {self.key_file} holds no private key (an old pre-shared key? make a "
                                f"new one with `edgellm keygen {self.key_file} --force`)")
            self.cert_der = _certs_in(text, self.key_file)[0]
        if self.allow_file is not None:
            if self.key_file is None:
                raise ClusterError("--allow needs --key: a node with no key of its own cannot be accepted by others")
            self.allow_file = Path(self.allow_file).expanduser()
        if self.secured:  # check the files now: a bad one is a clear error at start, not at first contact
            self.context(server=False)

    @property
    def secured(self) -> bool:
        return self.key_file is not None

    @property
    def name(self) -> str:
        return fingerprint(self.cert_der)[:16] if self.secured else "no key"

    def allowed(self) -> list[bytes]:
        """The DER certificates accepted now (the allow-list file as it is, or our own certificate)."""
        if not self.secured:
            return []
        if self.allow_file is None:
            return [self.cert_der]
        return _certs_in(_read(self.allow_file, "allow-list"), self.allow_file)

    def context(self, server: bool) -> ssl.SSLContext:
        """The TLS context for one side, rebuilt when the allow-list file changed."""
        stamp = None
        if self.allow_file is not None:
            try:
                st = self.allow_file.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError as e:
                raise ClusterError(f"cannot read allow-list {self.allow_file}: {e.strerror}") from None
        with self._lock:
            if stamp != self._stamp:
                self._ctx.clear()
                self._stamp = stamp
            ctx = self._ctx.get(server)
            if ctx is None:
                ctx = self._ctx[server] = self._make(server)
            return ctx

    def _make(self, server: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # peers are named by their certificates, not by host names
        if self.secured:
            try:
                ctx.load_cert_chain(str(self.key_file))
            except (ssl.SSLError, OSError) as e:
                raise ClusterError(f"key file {self.key_file} cannot be used ({e}); make a new one with "
                                   f"`edgellm keygen {self.key_file} --force`") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a listed self-signed certificate is a trust anchor
            try:
                ctx.load_verify_locations(cadata=b"".join(self.allowed()))
            except ssl.SSLError as e:
                raise ClusterError(f"allow-list {self.allow_file or self.key_file} holds a certificate that cannot "
                                   f"be used ({e})") from None
        else:
            ctx.verify_mode = ssl.CERT_NONE
            if server:
                _load_throwaway(ctx)
        return ctx


def _load_throwaway(ctx: ssl.SSLContext) -> None:
    """A fresh certificate for a worker without a key (ssl loads keys only from files)."""
    key_pem, cert_pem = _new_identity("edgellm node without a key")
    fd, name = tempfile.mkstemp(prefix="edgellm-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + cert_pem)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)


def load_identity(key: str | os.PathLike | None, allow: str | os.PathLike | None = None) -> Identity:
    return Identity(None if key is None else Path(key), None if allow is None else Path(allow))
