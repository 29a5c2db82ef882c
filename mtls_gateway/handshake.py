"""Failed TLS handshakes: the alert reaches the client, the operator sees why.

CPython's ``ssl`` on asyncio's or uvloop's ``SSLProtocol`` drops a connection whose
handshake failed without sending the alert OpenSSL wrote: ``do_handshake()`` raises, the
protocol's ``_on_handshake_complete`` calls ``_fatal_error`` which ``_force_close``\\ s the
transport, and the alert left in the outgoing memory BIO is never written (both loops have the
same code). A client then sees "connection reset" (TLS 1.2) or a bare EOF after its own
handshake finished (TLS 1.3), never "certificate required" or "unknown CA".

:class:`AlertingSSLObject` (``SSLContext.sslobject_class``, so nothing in the loops is
patched) keeps the failure and answers the protocol as if OpenSSL only wanted more data: the
protocol then flushes the outgoing BIO, that is the alert, through the transport's ordinary
write path. Any later call raises the real error, so the connection is closed as before when
the client sends anything more, closes (it does, on reading the alert), or when the loop's
handshake timeout fires.

Every failure is counted (``mtls_gateway_tls_handshake_failures_total{reason}``) and logged at
WARNING, at most once per reason per :data:`LOG_INTERVAL` (the rest at DEBUG, their number in
the next WARNING line). The pyOpenSSL listener (:mod:`mtls_gateway.tls_any`: ``tls_stack:
openssl``, the default, and every ``client_ca: any``) reports its failures here too, with the
peer address; the ``ssl`` object of the ``tls_stack: python`` listener never sees the socket,
so its lines say ``from unknown`` (see docs/upstream-tls.md).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "HANDSHAKE_REASONS",
    "LOG_INTERVAL",
    "AlertingSSLObject",
    "HandshakeFailures",
    "alerting_class",
    "reason_from_openssl",
    "reason_from_ssl_error",
]

log = logging.getLogger("mtls_gateway.tls")

#: Reason label values, documented in docs/upstream-tls.md.
HANDSHAKE_REASONS = ("no_certificate", "unknown_ca", "expired", "not_yet_valid",
                     "bad_certificate", "protocol", "client_alert", "timeout", "other")

#: Seconds between two WARNING lines for the same reason.
LOG_INTERVAL = 60.0

# X509_V_ERR_* codes (OpenSSL x509_vfy.h).
_UNKNOWN_CA = frozenset({2, 3, 18, 19, 20, 21})   # issuer not found / self-signed / untrusted
_EXPIRED = frozenset({10, 14})
_NOT_YET_VALID = frozenset({9, 13})
_PROTOCOL_WORDS = ("version", "protocol", "cipher", "http request", "wrong", "record",
                   "no shared", "unexpected message", "length", "decode", "sigalg")


def reason_from_verify_code(code: int | None) -> str:
    if code in _UNKNOWN_CA:
        return "unknown_ca"
    if code in _EXPIRED:
        return "expired"
    if code in _NOT_YET_VALID:
        return "not_yet_valid"
    return "bad_certificate"


def _reason_from_text(text: str, verify_code: int | None) -> str:
    text = text.lower().replace("_", " ")
    if "did not return a certificate" in text:
        return "no_certificate"
    if "certificate verify failed" in text:
        return reason_from_verify_code(verify_code)
    if "alert" in text:
        return "client_alert"       # the client refused us (our certificate, its policy)
    if any(word in text for word in _PROTOCOL_WORDS):
        return "protocol"
    return "other"


def reason_from_ssl_error(exc: ssl.SSLError) -> str:
    """The reason label for a handshake error raised by CPython's ``ssl``."""
    return _reason_from_text(str(exc.reason or exc), getattr(exc, "verify_code", None))


def reason_from_openssl(exc: Exception, verify_code: int | None) -> str:
    """The reason label for a pyOpenSSL ``SSL.Error`` (args: a list of (lib, func, reason));
    ``verify_code``: the X509_V_ERR the verify callback refused, if any."""
    parts = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    text = " ".join(str(p[-1]) for p in parts if isinstance(p, tuple) and p) or str(exc)
    return _reason_from_text(text, verify_code)


class HandshakeFailures:
    """Counts and logs failed handshakes (rate-limited per reason)."""

    def __init__(self, count: Callable[[str], None] | None = None, *,
                 interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self._interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def failed(self, reason: str, peer: Any, detail: str) -> None:
        if self._count is not None:
            self._count(reason)
        host = peer[0] if isinstance(peer, tuple) and peer else "unknown"
        now = self._clock()
        if now < self._next.get(reason, float("-inf")):
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            log.debug("TLS handshake failed (%s) from %s: %s", reason, host, detail)
            return
        self._next[reason] = now + self._interval
        quiet = self._quiet.pop(reason, 0)
        log.warning("TLS handshake failed (%s) from %s: %s%s", reason, host, detail,
                    f" ({quiet} more like it in the last {self._interval:.0f}s)" if quiet
                    else "")


class AlertingSSLObject(ssl.SSLObject):
    """An ``SSLObject`` whose failed handshake lets the alert out first (module docstring)."""

    failures: HandshakeFailures | None = None
    _failed: ssl.SSLError | None = None
    _outgoing: ssl.MemoryBIO | None = None

    @classmethod
    def _create(cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                server_side: bool = False, server_hostname: str | None = None,
                session: ssl.SSLSession | None = None,
                context: ssl.SSLContext | None = None) -> AlertingSSLObject:
        obj: AlertingSSLObject = super()._create(  # type: ignore[misc]
            incoming, outgoing, server_side, server_hostname, session, context)
        obj._outgoing = outgoing
        return obj

    def do_handshake(self) -> None:
        if self._failed is not None:
            raise self._failed
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self._failed = exc
            if self.failures is not None:
                self.failures.failed(reason_from_ssl_error(exc), None,
                                     str(getattr(exc, "verify_message", "") or exc.reason
                                         or exc))
            if self._outgoing is None or not self._outgoing.pending:
                raise           # no alert to send (plain HTTP, say): close at once
            # "more data, please": the protocol writes out what OpenSSL queued, the alert
            raise ssl.SSLWantReadError("handshake failed; sending the alert") from exc


def alerting_class(failures: HandshakeFailures | None) -> type[AlertingSSLObject]:
    """An :class:`AlertingSSLObject` subclass reporting to ``failures``."""
    return type("GatewaySSLObject", (AlertingSSLObject,), {"failures": failures})
