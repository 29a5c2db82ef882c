"""The pyOpenSSL listener: ``listen.client_ca: any`` (any issuer), and ``client_ca: pki`` with
``listen.tls_stack: openssl`` (the default; :func:`pki_context`, docs/performance.md "Two TLS
stacks"). Below: why ``any`` needs it.

RFC 8705 section 3 only needs the resource server to know *which* certificate the client
proved possession of in the handshake; the token's ``cnf`` thumbprint says which one it must
be. Python's ``ssl`` module cannot accept a certificate that does not chain to a loaded CA
(no verify callback), so this listener terminates TLS with pyOpenSSL on memory BIOs behind an
asyncio transport, and hands aiohttp the decrypted stream exactly as ``TCPSite`` would.

What still holds in this mode: the client signs the handshake transcript with the private key
of the certificate it sent (TLS 1.3 and 1.2 ``CertificateVerify``; OpenSSL checks it whatever
the verify callback says), so the thumbprint names a key the client holds. Validity dates
are still enforced unless ``listen.client_cert_validity: ignore``; keys too small for the
security level are refused. What no longer holds: the certificate says nothing about *who*
the client is, so config_load refuses routes that would trust it (binding optional or off).

The state machine follows asyncio's ``sslproto``: handshake -> data -> shutdown, with the
application protocol created only once the handshake has succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any, cast

from aiohttp import web
from cryptography import x509
from OpenSSL import SSL, crypto

from .config import ListenConfig
from .handshake import HandshakeFailures, reason_from_openssl

try:   # the raw OpenSSL calls pyOpenSSL makes, without its per-call checks (_FastIO)
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without them: the public API only
    _ffi = _lib = None
from .tls import PEER_CERTIFICATE, PeerCertificate, describe_certificate

__all__ = ["AnyCertSite", "TlsAnyConnection", "TlsAnyTransport", "any_cert_context",
           "openssl_context", "pki_context"]

log = logging.getLogger("mtls_gateway.tls_any")

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
# The cipher string CPython's ssl module uses, so both modes offer the same suites.
_CIPHERS = (b"@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:"
            b"!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM")
_READ_SIZE = 65536
#: Seconds a TLS 1.3 connection's session tickets may wait for its first response (see
#: TlsAnyConnection._handshake).
TICKET_HOLD = 0.5
_BIO_READ_SIZE = 65536

# X509_V_ERR_* codes still refused for the client's own certificate (depth 0).
_DATE_ERRORS = frozenset({
    9,    # CERT_NOT_YET_VALID
    10,   # CERT_HAS_EXPIRED
    13,   # ERROR_IN_CERT_NOT_BEFORE_FIELD
    14,   # ERROR_IN_CERT_NOT_AFTER_FIELD
})
_KEY_ERRORS = frozenset({66})   # EE_KEY_TOO_SMALL: too weak to prove possession


def _refused_errors(validity: str) -> frozenset[int]:
    return _KEY_ERRORS | (_DATE_ERRORS if validity == "enforce" else frozenset())


def _verify_callback(refused: frozenset[int]) -> Callable[..., bool]:
    """Accept any issuer (unknown CA, self-signed, chain errors) but not ``refused`` at the leaf."""

    def verify(conn: SSL.Connection, _cert: crypto.X509, errnum: int, depth: int,
               ok: int) -> bool:
        if ok or not (depth == 0 and errnum in refused):
            return True
        conn.set_app_data(errnum)       # why, for the handshake failure's reason label
        return False

    return verify


def _server_context(listen: ListenConfig) -> SSL.Context:
    """What both client_ca modes share: versions, ciphers, our certificate, resumption."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        ctx.set_min_proto_version(_VERSIONS[listen.min_tls_version])
        ctx.set_max_proto_version(_VERSIONS[listen.max_tls_version])
        ctx.set_options(SSL.OP_ALL | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
                        | SSL.OP_CIPHER_SERVER_PREFERENCE)
        # An idle connection keeps no 16 KiB record buffers (CPython's ssl sets it too).
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_cipher_list(_CIPHERS)
        ctx.use_certificate_chain_file(str(listen.cert_file))
        ctx.use_privatekey_file(str(listen.key_file))
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise ValueError(f"cannot use {listen.cert_file} / {listen.key_file}: {exc}") from exc
    # A server that asks for client certificates must name its session context, else OpenSSL
    # fails every resumption attempt (CPython's ssl sets one for the same reason). Session
    # cache and ticket keys belong to this context: a reload (a new context) ends every
    # earlier session, so no session outlives the CA bundle it was verified against.
    ctx.set_session_id(b"mtls-gateway")
    # Stateful resumption: sessions stay in this context's cache and a ticket only names one
    # (SSL_OP_NO_TICKET; TLS 1.2 resumes by session ID). Encrypting the whole session, peer
    # certificate included, into each of OpenSSL's two TLS 1.3 tickets cost ~60 us of a
    # full handshake. The cache holds at most OpenSSL's default 20,480 sessions (pyOpenSSL
    # has no setter), each expires after OpenSSL's default 300 s.
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    return ctx


def any_cert_context(listen: ListenConfig) -> SSL.Context:
    """The pyOpenSSL server context for ``client_ca: any`` (blocking file reads: build once).

    Raises ValueError when the certificate or key cannot be used.
    """
    ctx = _server_context(listen)
    mode = SSL.VERIFY_PEER
    if listen.client_cert == "required":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode, _verify_callback(_refused_errors(listen.client_cert_validity)))
    return ctx


def _verify_result(tls: SSL.Connection) -> int | None:
    """The X509_V_ERR of a failed chain verification (``SSL_get_verify_result``), or None.

    The pki context has no Python verify callback (OpenSSL decides alone: ~15 us less per
    handshake than a callback that builds two X509 objects), so a failed handshake's reason
    label asks OpenSSL afterwards, through the bindings pyOpenSSL uses (_FastIO's caveat)."""
    if _lib is None or not hasattr(_lib, "SSL_get_verify_result"):
        return None
    try:
        code = int(_lib.SSL_get_verify_result(tls._ssl))
    except (AttributeError, TypeError):
        return None
    return code or None     # X509_V_OK: not a verification failure


def pki_context(listen: ListenConfig) -> SSL.Context:
    """The pyOpenSSL server context for ``client_ca: pki``: the client's chain is verified by
    OpenSSL, inside the handshake, against ``client_ca_file``; the registered self-signed
    certificates (``pinned_client_certs``) are accepted as exactly themselves.

    The pins go into the same store as the CA bundle, as with CPython's ``ssl``: config load
    admits only pins OpenSSL will not take as issuers (``anchors.can_issue`` is false), so a
    pin verifies itself and nothing else. Blocking file reads: build in a thread.
    Raises ValueError when a file cannot be used.
    """
    if listen.cert_file is None or listen.key_file is None or listen.client_ca_file is None:
        raise ValueError("the TLS listener needs cert_file, key_file and client_ca_file")
    ctx = _server_context(listen)
    try:
        ctx.load_verify_locations(str(listen.client_ca_file))
        store = ctx.get_cert_store()
        assert store is not None
        for der in listen.pinned_client_certs:
            store.add_cert(crypto.X509.from_cryptography(x509.load_der_x509_certificate(der)))
    except (SSL.Error, crypto.Error) as exc:
        raise ValueError(f"cannot use {listen.client_ca_file}: {exc}") from exc
    mode = SSL.VERIFY_PEER
    if listen.client_cert == "required":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode)        # OpenSSL's own verdict; see _verify_result
    return ctx


def openssl_context(listen: ListenConfig) -> SSL.Context:
    """The listener's pyOpenSSL context for its ``client_ca`` mode (:class:`AnyCertSite`)."""
    return any_cert_context(listen) if listen.client_ca == "any" else pki_context(listen)


class _FastIO:
    """The data phase of one connection without pyOpenSSL's per-call overhead.

    ``Connection.recv``/``sendall``/``bio_read`` allocate a buffer, check three helpers and
    raise an exception to say "no more data" (two or three per request): about 5 us of a
    keep-alive request's ~10 us of TLS work. Established connections call the same OpenSSL
    functions directly (``SSL_read``, ``SSL_write``, ``BIO_read``, and ``BIO_get_mem_data``
    to see how much ciphertext is waiting) through the ``cffi`` bindings pyOpenSSL itself
    uses, on the ``SSL``/``BIO`` pointers of its ``Connection``. Anything but success or
    "want read" is handed back to the public API, which raises pyOpenSSL's own exception;
    the handshake always uses the public API. :func:`fast_io` returns None (the public API
    is used throughout) when an installed pyOpenSSL lacks any of it.
    """

    __slots__ = ("_from", "_into", "_ssl")

    def __init__(self, tls: SSL.Connection) -> None:
        # pyOpenSSL's own pointers (private attributes: fast_io checks they exist)
        self._ssl = tls._ssl
        self._into = tls._into_ssl
        self._from = tls._from_ssl

    def feed(self, data: bytes) -> None:
        """Ciphertext from the socket into OpenSSL (a memory BIO always takes all of it)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        _lib.BIO_write(self._into, data, len(data))

    def read(self, buf: Any) -> bytes | None:
        """Plaintext, or None: no complete record left (an error: -> the public API)."""
        n = _lib.SSL_read(self._ssl, buf, _READ_SIZE)
        if n > 0:
            return _ffi.buffer(buf, n)[:]       # type: ignore[no-any-return]
        if _lib.SSL_get_error(self._ssl, n) == _lib.SSL_ERROR_WANT_READ:
            return None
        raise _PublicApi

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt all of ``data``; an error -> the public API (``sendall``) for the rest."""
        with _ffi.from_buffer(data) as cdata:
            done, size = 0, len(cdata)
            while done < size:
                n = _lib.SSL_write(self._ssl, cdata + done, size - done)
                if n <= 0:
                    raise _PublicApi(done)
                done += n

    def drain(self, buf: Any, pointer: Any) -> bytes:
        """The ciphertext OpenSSL produced (b"" if none), without an exception when empty."""
        pending = _lib.BIO_get_mem_data(self._from, pointer)
        if pending <= 0:
            return b""
        if pending <= _BIO_READ_SIZE:
            n = _lib.BIO_read(self._from, buf, pending)
            return _ffi.buffer(buf, n)[:] if n > 0 else b""
        chunks = []
        while pending > 0:
            n = _lib.BIO_read(self._from, buf, min(pending, _BIO_READ_SIZE))
            if n <= 0:
                break
            chunks.append(_ffi.buffer(buf, n)[:])
            pending -= n
        return b"".join(chunks)


class _PublicApi(Exception):
    """A _FastIO call met something other than data or "want read": redo it publicly."""


_FAST_IO_NAMES = ("SSL_read", "SSL_write", "SSL_get_error", "SSL_ERROR_WANT_READ", "BIO_read",
                  "BIO_write", "BIO_get_mem_data")


_FAST_IO_BOUND = (_lib is not None and _ffi is not None
                  and all(hasattr(_lib, n) for n in _FAST_IO_NAMES))


def fast_io(tls: SSL.Connection) -> _FastIO | None:
    """The fast data path for ``tls`` (established), or None if this pyOpenSSL lacks it."""
    if not _FAST_IO_BOUND:
        return None
    try:
        return _FastIO(tls)
    except AttributeError:
        return None


class TlsAnyTransport(asyncio.Transport):
    """What aiohttp's request handler writes to and reads from: the decrypted stream."""

    __slots__ = ("_connection", "_info", "_protocol")    # one per idle connection: no dict

    def __init__(self, connection: TlsAnyConnection, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._info = extra
        self._connection = connection
        self._protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._info:
            return self._info[name]
        if name in ("cipher", "tls_version"):
            cipher = self._connection.cipher()
            return default if cipher is None else cipher if name == "cipher" else cipher[1]
        raw = self._connection.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._connection.closing

    def close(self) -> None:
        self._connection.close()

    def abort(self) -> None:
        self._connection.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._connection.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._connection.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False   # TLS has no half-close that HTTP/1.1 clients rely on

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot half-close")

    def is_reading(self) -> bool:
        return not self._connection.reading_paused

    def pause_reading(self) -> None:
        self._connection.pause_reading()

    def resume_reading(self) -> None:
        self._connection.resume_reading()

    def get_write_buffer_size(self) -> int:
        raw = self._connection.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._connection.raw
        return raw.get_write_buffer_limits() if raw is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._connection.raw is not None:
            self._connection.raw.set_write_buffer_limits(high, low)


class TlsAnyConnection(asyncio.Protocol):
    """One accepted TCP connection: TLS handshake on memory BIOs, then the app protocol.

    The application protocol (aiohttp's request handler) is created only after a successful
    handshake, so it never sees a connection whose client failed the handshake. Write-side
    flow control is the TCP transport's (its pause/resume is passed on); read-side pausing
    stops both the socket and the delivery of already decrypted records.
    """

    __slots__ = ("_app", "_app_factory", "_held", "_io", "_loop", "_site", "_timer", "_tls",
                 "_transport", "closing", "raw", "reading_paused")

    def __init__(self, site: AnyCertSite, app_factory: Callable[[], asyncio.Protocol],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._site = site
        self._app_factory = app_factory
        # (passed in by the site: asking for the running loop costs a getpid system call)
        self._loop = loop or asyncio.get_running_loop()
        self.raw: asyncio.Transport | None = None
        self._tls: SSL.Connection | None = None
        self._io: _FastIO | None = None        # once established (and available)
        self._app: asyncio.Protocol | None = None
        self._transport: TlsAnyTransport | None = None
        self._timer: asyncio.Handle | None = None
        self._held = False          # TLS 1.3 session tickets waiting for the first response
        self.closing = False
        self.reading_paused = False

    # --- the TCP side --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport; uvloop's does not inherit from asyncio.Transport, so no isinstance.
        self.raw = cast(asyncio.Transport, transport)
        self._tls = SSL.Connection(self._site.context, None)
        self._tls.set_accept_state()
        self._site.handshaking.add(self)
        self._timer = self._loop.call_later(self._site.handshake_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        tls = self._tls
        if tls is None or self.closing:
            return
        io = self._io
        if io is not None:
            io.feed(data)
        else:
            tls.bio_write(data)
            if self._app is None and not self._handshake(tls):
                return
        self._read()

    def eof_received(self) -> bool:
        # TCP FIN without close_notify: end of requests (a truncation attack cannot matter to
        # HTTP/1.1 framing, which aiohttp checks itself). Returning False closes the socket.
        if self._app is not None:
            self._app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._site.handshaking.discard(self)
        self.closing = True
        app, self._app = self._app, None
        if app is not None and self._tls is not None:
            # An established connection that ended without our close_notify (the client
            # just closed): its session stays resumable (RFC 5246 section 7.2.1), else
            # OpenSSL would drop it from the cache when the SSL object goes. A session
            # that ended in a fatal alert was removed by OpenSSL already.
            self._tls.set_shutdown(self._tls.get_shutdown() | SSL.SENT_SHUTDOWN)
        self._tls = self._io = None
        if app is not None:
            app.connection_lost(exc)
        self.raw = None

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # --- handshake -----------------------------------------------------------------------------

    def _handshake(self, tls: SSL.Connection) -> bool:
        try:
            tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return False
        except SSL.Error as exc:
            self._handshake_failed(tls, exc)
            self._fail("TLS handshake failed", exc)
            return False
        self._cancel_timer()
        if tls.get_protocol_version() == SSL.TLS1_3_VERSION:
            # All that is left to send is the session tickets, which the client does not
            # wait for: they leave with the first response (or after TICKET_HOLD), one
            # write instead of two. TLS 1.2: our Finished, which the client waits for.
            self._held = True
            self._timer = self._loop.call_later(TICKET_HOLD, self._release)
        else:
            self._flush()
        self._site.handshaking.discard(self)
        # The session's certificate: on a resumed session, the one of its full handshake.
        # DER straight from OpenSSL (no parse; describe_certificate caches by DER).
        cert = tls.get_peer_certificate()
        peer = (describe_certificate(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert))
                if cert is not None else None)
        assert self.raw is not None
        self._io = fast_io(tls)
        self._transport = TlsAnyTransport(self, self._extra(tls, peer))
        app = self._app_factory()
        self._transport.set_protocol(app)
        self._app = app
        app.connection_made(self._transport)
        return True

    def _handshake_failed(self, tls: SSL.Connection, exc: SSL.Error) -> None:
        failures = self._site.failures
        if failures is None:
            return
        code = tls.get_app_data()       # client_ca: any's verify callback says why
        reason = reason_from_openssl(exc, code if isinstance(code, int) else _verify_result(tls))
        peer = self.raw.get_extra_info("peername") if self.raw is not None else None
        failures.failed(reason, peer, str(exc))

    def _extra(self, tls: SSL.Connection, peer: PeerCertificate | None) -> dict[str, Any]:
        """What ``get_extra_info`` answers itself; the rest ("sockname", "socket", ...) is
        asked of the TCP transport when someone wants it (most never do)."""
        raw = self.raw
        assert raw is not None
        return {
            PEER_CERTIFICATE: peer,
            "peername": raw.get_extra_info("peername"),   # kept for logs after the close
            "sslcontext": self._site.context,   # aiohttp: request.scheme == "https"
            "ssl_object": None,                 # not a CPython SSLObject; see PEER_CERTIFICATE
            "peercert": None,                   # no dict: the DER is in PEER_CERTIFICATE
            # The TCP socket stays the TLS layer's: TCP_NODELAY is the event loop's and
            # SO_KEEPALIVE the listening socket's (accepted sockets inherit it), so aiohttp
            # does not make a socket object and two system calls per connection to set them.
            "socket": None,
        }

    def cipher(self) -> tuple[str | None, str, int | None] | None:
        """``get_extra_info("cipher")``: (name, protocol, secret bits), like ``ssl``."""
        tls = self._tls
        if tls is None:
            return None
        return (tls.get_cipher_name(), tls.get_protocol_version_name(), tls.get_cipher_bits())

    def _timed_out(self) -> None:  # the handshake's timer
        self._timer = None
        if self._app is None and self.raw is not None:
            peer = self.raw.get_extra_info("peername")
            log.debug("TLS handshake timed out from %s", peer)
            if self._site.failures is not None:
                self._site.failures.failed("timeout", peer, "handshake not finished in "
                                           f"{self._site.handshake_timeout:g}s")
            self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- data ------------------------------------------------------------------------------------

    def _read(self) -> None:
        """Deliver decrypted data until the BIO is empty, reading is paused or the peer closed."""
        io = self._io
        if io is not None:
            buf = self._site.buffer
            try:
                while self._app is not None and not self.reading_paused and not self.closing:
                    data = io.read(buf)
                    if data is None:
                        break
                    self._app.data_received(data)
            except _PublicApi:
                self._read_public()     # close_notify, an error: pyOpenSSL names it
                return
            if not self._held:
                self._flush()   # TLS 1.3 key updates and alerts the reads produced
            return
        self._read_public()

    def _read_public(self) -> None:
        tls = self._tls
        while tls is not None and self._app is not None and not self.reading_paused \
                and not self.closing:
            try:
                data = tls.recv(_READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:       # close_notify: the client is done
                self._app.eof_received()
                self.close()
                return
            except SSL.Error as exc:
                self._fail("TLS error", exc)
                return
            self._app.data_received(data)
        if not self._held:
            self._flush()   # TLS 1.3 key updates and alerts the reads produced

    def write(self, data: bytes | bytearray | memoryview) -> None:
        tls = self._tls
        if tls is None or self.closing or not data:
            return
        io = self._io
        try:
            if io is not None:
                try:
                    io.write(data)
                except _PublicApi as rest:
                    tls.sendall(memoryview(data)[rest.args[0]:])
            else:
                tls.sendall(data)
        except SSL.Error as exc:
            self._fail("TLS write failed", exc)
            return
        if self._held:
            # The first response: it leaves with the tickets at the end of this turn of the
            # loop, with whatever else is written by then (a close_notify after
            # "Connection: close": then one write per new connection instead of three).
            self._cancel_timer()
            self._timer = self._loop.call_soon(self._release)
            return
        self._flush()

    def _release(self) -> None:
        """The held tickets (and the first response) go out."""
        self._timer = None
        if self._held:
            self._held = False
            self._flush()

    def _flush(self) -> None:
        """Move the ciphertext OpenSSL produced into the TCP transport."""
        tls, raw = self._tls, self.raw
        if tls is None or raw is None:
            return
        io = self._io
        if io is not None:
            data = io.drain(self._site.buffer, self._site.pointer)
            if data:
                raw.write(data)
            return
        chunks: list[bytes] = []
        while True:
            try:
                chunk = tls.bio_read(_BIO_READ_SIZE)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _BIO_READ_SIZE:
                break
        if chunks:
            raw.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def pause_reading(self) -> None:
        if not self.reading_paused and self.raw is not None:
            self.reading_paused = True
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.raw is not None:
            self.reading_paused = False
            self.raw.resume_reading()
            self._loop.call_soon(self._read)   # records decrypted before the pause

    # --- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Send close_notify, let the TCP transport flush, then close (connection_lost follows).

        A peer that stops reading would keep the socket open while the TCP transport waits
        to flush; like asyncio's ``ssl_shutdown_timeout`` it is aborted after a while.
        """
        if self.closing:
            return
        self.closing = True
        self._held = False
        tls = self._tls
        if tls is not None:
            with contextlib.suppress(SSL.Error):
                tls.shutdown()
            self._flush()
        self._close_raw()

    def _close_raw(self) -> None:
        if self.raw is not None:
            self.raw.close()
            self._cancel_timer()
            self._timer = self._loop.call_later(self._site.shutdown_timeout, self.abort)

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def _fail(self, what: str, exc: SSL.Error) -> None:
        peer = self.raw.get_extra_info("peername") if self.raw is not None else None
        log.debug("%s from %s: %s", what, peer, exc)
        self._held = False
        self._flush()    # the alert OpenSSL queued tells the client why
        self.closing = True
        self._close_raw()


class AnyCertSite(web.BaseSite):
    """Like aiohttp's ``TCPSite`` with TLS, but terminating TLS in :class:`TlsAnyConnection`.

    :meth:`update` swaps the context for new handshakes (reload); established connections
    keep theirs. :meth:`stop` also drops connections still in their handshake (aiohttp does
    not know them yet, so it cannot close them).
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, context: SSL.Context,
                 reuse_port: bool | None = None, backlog: int = 128,
                 handshake_timeout: float = 60.0, shutdown_timeout: float = 30.0,
                 failures: HandshakeFailures | None = None) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self.context = context
        self.handshake_timeout = handshake_timeout     # asyncio's defaults for TLS
        self.shutdown_timeout = shutdown_timeout
        self.handshaking: set[TlsAnyConnection] = set()
        self.failures = failures
        # Scratch space of this loop's connections' _FastIO calls (copied out at once).
        self.buffer = _ffi.new("char[]", max(_READ_SIZE, _BIO_READ_SIZE)) if _ffi else None
        self.pointer = _ffi.new("char **") if _ffi else None

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    def update(self, context: SSL.Context) -> None:
        self.context = context

    async def start(self) -> None:
        await super().start()
        factory = self._runner.server
        assert factory is not None
        loop = asyncio.get_running_loop()

        def connection() -> TlsAnyConnection:
            return TlsAnyConnection(self, factory, loop)

        self._server = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog,
            reuse_port=self._reuse_port, family=socket.AF_UNSPEC)
        for listening in self._server.sockets:      # inherited by every accepted socket
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    async def stop(self) -> None:
        await super().stop()
        for conn in list(self.handshaking):
            conn.abort()
