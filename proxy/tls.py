"""TLS to upstreams: certificate files checked, an `ssl.SSLContext` built, and rebuilt on rotation.

A leaf module (it imports nothing of the sidecar's) because two layers need it: the
config validates the files at load, so a missing file, a key that does not belong
to its certificate or an expired certificate is a `file:line` error before
anything starts; and the client builds its `SSLContext` from the same files and
keeps it current while the sidecar runs.

Rotation: Kubernetes updates a mounted Secret by writing a new directory and
swapping a symlink, cert-manager renews certificates a while before they expire.
`ClientTls.context()` looks at the files (`os.stat`, symlinks followed: device,
inode, size, mtime) at most once per `check_every` seconds and builds a new
context when any changed. The client passes the context with each request, and
aiohttp keys its pooled connections by it, so new connections present the new
certificate while keep-alive connections opened with the old one finish the calls
they carry and then idle out. A half-written pair (a certificate whose key has not
arrived yet) fails to load: the old context stays and the next look tries again.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("proxy.tls")

MinVersion = Literal["1.2", "1.3"]
_TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

CHECK_EVERY = 1.0
"""Seconds between looks at the certificate files: a rotation takes effect within it."""


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """An upstream's TLS settings as plain data (from the config's `tls:` section)."""

    ca_file: str | None = None
    system_ca: bool = True
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    min_version: MinVersion = "1.2"
    insecure_skip_verify: bool = False

    @property
    def files(self) -> tuple[str, ...]:
        """The files the context is built from, watched for rotation."""
        return tuple(f for f in (self.ca_file, self.cert_file, self.key_file) if f)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsFileError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


def read_certificates(path: str, what: str = "certificate file") -> list[x509.Certificate]:
    """Every PEM certificate in `path` (a client chain or a CA bundle), at least one."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsFileError(f"{what} {path}: no PEM certificate in it")
    return certs


def not_after(cert: x509.Certificate) -> float:
    """When `cert` expires, as Unix time."""
    return cert.not_valid_after_utc.timestamp()


def check_not_expired(path: str, certs: list[x509.Certificate], what: str, now: float) -> None:
    """Refuse a file holding an expired certificate: TLS would fail on every connect."""
    for cert in certs:
        if not_after(cert) <= now:
            expired = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
            raise TlsFileError(
                f"{what} {path}: certificate {cert.subject.rfc4514_string()!r} expired on {expired}"
            )


def check_certificate_file(path: str, what: str, now: float | None = None) -> float:
    """Read `path`, refuse it if unreadable or expired; return its earliest expiry."""
    certs = read_certificates(path, what)
    check_not_expired(path, certs, what, time.time() if now is None else now)
    return min(not_after(c) for c in certs)


def check_key_file(path: str) -> None:
    """Refuse a key file that is unreadable, not a PEM private key, or encrypted."""
    _private_key(path)


def _private_key(path: str) -> object:
    data = _read(path, "key file")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsFileError(f"key file {path}: is encrypted (use an unencrypted key)") from None
    except Exception as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise TlsFileError(f"key file {path}: not a PEM private key ({exc})") from None


def check_key_matches(cert_file: str, key_file: str) -> None:
    """Refuse a key that does not belong to the (first) certificate of `cert_file`."""
    cert = read_certificates(cert_file)[0]
    key = _private_key(key_file)
    public = getattr(key, "public_key", None)
    if public is None:
        raise TlsFileError(f"key file {key_file}: not a private key")
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if public().public_bytes(der, fmt) != cert.public_key().public_bytes(der, fmt):
        raise TlsFileError(f"key file {key_file}: does not match the certificate in {cert_file}")


def build_context(options: TlsOptions) -> ssl.SSLContext:
    """An `SSLContext` for calling one upstream, from its options and files as they are now.

    Verification is on unless `insecure_skip_verify`; with a `ca_file` the system
    store is trusted only when `system_ca` says so.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _TLS_VERSIONS[options.min_version]
    if options.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        if options.system_ca or options.ca_file is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if options.ca_file is not None:
            try:
                context.load_verify_locations(cafile=options.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise TlsFileError(f"CA file {options.ca_file}: {exc}") from None
    if options.cert_file is not None and options.key_file is not None:
        try:
            context.load_cert_chain(options.cert_file, options.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(
                f"certificate file {options.cert_file} with key file {options.key_file}: {exc}"
            ) from None
    return context


FileStamp = tuple[tuple[int, int, int, int] | None, ...]


def stamp(paths: tuple[str, ...]) -> FileStamp:
    """What the files resolve to now (symlinks followed): changes when any is replaced."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CertExpiry:
    """When a configured certificate expires: `kind` is `client` or `ca`."""

    kind: Literal["client", "ca"]
    not_after: float


def _expiries(options: TlsOptions) -> tuple[CertExpiry, ...]:
    out: list[CertExpiry] = []
    if options.cert_file is not None:
        out.append(CertExpiry("client", not_after(read_certificates(options.cert_file)[0])))
    if options.ca_file is not None:
        certs = read_certificates(options.ca_file, "CA file")
        out.append(CertExpiry("ca", min(not_after(c) for c in certs)))
    return tuple(out)


class ClientTls:
    """One upstream's TLS: the current `SSLContext`, rebuilt when its files change.

    Built at config load (so it raises `TlsFileError` like the config check does);
    after that it never raises: a rotation that cannot be loaded is logged and the
    context in force stays, so calls go on with the certificate that still works.
    """

    def __init__(
        self,
        options: TlsOptions,
        *,
        check_every: float = CHECK_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.server_name = options.server_name
        self._check_every = check_every
        self._clock = clock
        self._stamp = stamp(options.files)
        self._context = build_context(options)
        self.expiries = _expiries(options)
        self._next_check = clock() + check_every
        self.reloads = 0  # contexts built after the first (rotations taken)

    def context(self) -> ssl.SSLContext:
        """The context for a new request; looks at the files at most every `check_every` s."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._check_every
            self.refresh()
        return self._context

    def refresh(self) -> bool:
        """Rebuild the context if a file changed; return whether a new one is in force."""
        current = stamp(self.options.files)
        if current == self._stamp:
            return False
        try:
            context = build_context(self.options)
            expiries = _expiries(self.options)
        except TlsFileError as exc:
            # keep the old stamp: the next look tries again (the rest may still be arriving)
            log.warning(
                "TLS files changed but cannot be loaded; keeping the certificates in force: %s",
                exc,
                extra={"event": "tls_reload_failed"},
            )
            return False
        self._stamp = current
        self._context = context
        self.expiries = expiries
        self.reloads += 1
        log.info(
            "TLS files changed: new connections use them",
            extra={"event": "tls_reloaded", "files": list(self.options.files)},
        )
        return True

    def seconds_left(self, now: float | None = None) -> list[tuple[str, float]]:
        """(kind, seconds until expiry) for each configured certificate, for the gauge."""
        wall = time.time() if now is None else now
        return [(e.kind, e.not_after - wall) for e in self.expiries]
