"""What can go wrong on an upstream connection, and the outcome kind each one is."""

from __future__ import annotations

import errno
import ssl

from proxy.resilience.outcome import Kind, Outcome


class ConnectError(OSError):
    """Opening a connection failed; `os_error` says how (refused, TLS, timeout)."""

    def __init__(self, os_error: BaseException) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ServerDisconnected(ConnectionError):
    """The upstream closed the connection before the answer's head arrived."""


class BodyBrokenOff(ConnectionError):
    """The upstream closed or reset the connection in the middle of a body."""


class BadResponse(Exception):
    """The upstream's answer is not valid HTTP/1.1 (llhttp said why)."""


def classify_error(exc: BaseException, *, tls: bool = False) -> Outcome:
    """Map a client error to the outcome kind that retry and breaker reason about.

    `tls` says the request was to an `https://` URL: a connection reset while
    connecting then happened in the TLS handshake (a TCP connect is refused, not
    reset), typically a server that drops a client without the certificate it
    requires instead of sending an alert.
    """
    if isinstance(exc, ConnectError):
        cause = exc.os_error
        if isinstance(cause, ssl.SSLCertVerificationError):
            return Outcome(Kind.TLS_VERIFY_FAILED, detail=_verify_detail(cause))
        if isinstance(cause, ssl.SSLError):
            # while connecting, so the request was never sent. A bare ssl.SSLError later
            # (a broken record mid-body) is a reset: the upstream may have acted.
            reason = getattr(cause, "reason", None)
            return Outcome(
                Kind.TLS_HANDSHAKE_FAILED,
                detail=str(reason) if reason else str(cause) or type(cause).__name__,
            )
        if isinstance(cause, TimeoutError):
            return Outcome(Kind.CONNECT_FAILURE, detail="connect timeout")
        if tls and isinstance(cause, ConnectionResetError | ConnectionAbortedError):
            return Outcome(
                Kind.TLS_HANDSHAKE_FAILED,
                detail="the upstream closed the connection during the TLS handshake",
            )
        strerror = cause.strerror if isinstance(cause, OSError) else None
        return Outcome(Kind.CONNECT_FAILURE, detail=str(strerror or cause))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Outcome(Kind.TLS_VERIFY_FAILED, detail=_verify_detail(exc))
    if isinstance(exc, ServerDisconnected):
        return Outcome(Kind.RESET, detail="server closed the connection without a response")
    if isinstance(exc, BodyBrokenOff):
        return Outcome(Kind.RESET, detail="response body broken off")
    if isinstance(exc, BadResponse):
        return Outcome(Kind.RESET, detail=f"invalid response: {exc}")
    if isinstance(exc, OSError) and exc.errno in (
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    ):
        return Outcome(Kind.CONNECT_FAILURE, detail=exc.strerror or str(exc))
    if isinstance(exc, ConnectionError):
        return Outcome(Kind.RESET, detail=exc.strerror or str(exc) or type(exc).__name__)
    return Outcome(Kind.RESET, detail=f"{type(exc).__name__}: {exc}")


def _verify_detail(exc: ssl.SSLCertVerificationError) -> str:
    message = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
    return f"certificate verify failed: {message or exc}"
