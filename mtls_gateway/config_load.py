"""Build a :class:`GatewayConfig` from YAML, reporting *every* problem with its path.

A gateway that starts on a half-understood config is a security bug, so loading
never stops at the first mistake: each field is read through a :class:`_Section`
that records ``path: message`` for anything missing, mistyped, unknown or
inconsistent, and :func:`load_config` raises one :class:`ConfigError` listing
them all. Relative file paths are resolved against the config file's folder.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from .anchors import bundle_problems, can_issue, self_issued, spki
from .config import (
    ASYMMETRIC_ALGORITHMS,
    AdminConfig,
    AsMetadataRewrite,
    AuthMtlsClient,
    AuthNone,
    AuthPolicy,
    CacheConfig,
    ClientRegistration,
    ClientRegistryConfig,
    DpopConfig,
    GatewayConfig,
    HeaderCertificateSource,
    IdentityHeaders,
    IntrospectionProvider,
    JwtProvider,
    LimitsConfig,
    ListenConfig,
    LoggingConfig,
    MetadataConfig,
    PathMatch,
    Provider,
    Route,
    SenderConstraint,
    TrustedProxies,
    UpstreamConfig,
    UpstreamTls,
)
from .dn import parse_dn
from .dn_forms import from_openssl_form
from .errors import ConfigError
from .keyset import KeySet
from .registry_files import certificates_from_jwks

__all__ = [
    "KNOWN_FIELDS",
    "decode_utf8",
    "load_config",
    "load_config_text",
    "parse_duration",
    "unreadable_files",
    "yaml_load",
]

T = TypeVar("T")
_REQUIRED: Any = object()

#: Every field name the loader has ever asked for, for the "documented in gateway.yaml" test.
KNOWN_FIELDS: set[str] = set()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}


def parse_duration(value: object) -> float:
    """``30``, ``"30s"``, ``"500ms"``, ``"5m"``, ``"1h"`` -> seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration like 30s, 500ms, 5m (got {value!r})")


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "empty"}.get(type(value), "?")


class _Problems:
    def __init__(self, base_dir: Path) -> None:
        self.items: list[str] = []
        self.base_dir = base_dir
        self.files: list[tuple[str, Path]] = []     # (yaml path, file) of every file read

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


class _Section:
    """A YAML mapping being read; unknown keys are reported by :meth:`finish`."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: _Problems) -> None:
        self.data, self.path, self.problems = data, path, problems
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str, message: str) -> None:
        self.problems.add(self.at(key), message)

    def has(self, key: str) -> bool:
        self.seen.add(key)
        KNOWN_FIELDS.add(key)
        return self.data.get(key) is not None

    def _raw(self, key: str, default: Any) -> tuple[bool, Any]:
        """(present, value); a missing required key is reported here."""
        self.seen.add(key)
        KNOWN_FIELDS.add(key)
        if key in self.data and self.data[key] is not None:
            return True, self.data[key]
        if default is _REQUIRED:
            self.problem(key, "is required")
        return False, default

    def typed(self, key: str, kind: type[T] | tuple[type, ...], default: Any = _REQUIRED,
              what: str = "") -> Any:
        present, value = self._raw(key, default)
        if not present:
            return value
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            ok = False
        else:
            ok = isinstance(value, kind)
        if not ok:
            self.problem(key, f"expected {what or _type_name(kind())} (got {_type_name(value)})"
                         if isinstance(kind, type) else f"expected {what}")
            return None if default is _REQUIRED else default
        return value

    def string(self, key: str, default: Any = _REQUIRED, *, choices: tuple[str, ...] = ()) -> Any:
        value = self.typed(key, str, default)
        if isinstance(value, str) and choices and value not in choices:
            self.problem(key, f"must be one of {', '.join(choices)} (got {value!r})")
            return None
        if value == "" and default is _REQUIRED:
            self.problem(key, "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n"):
            self.seen.add(key)
            KNOWN_FIELDS.add(key)
            self.problem(key, f"expected true or false (got the string {value!r}: this file "
                         "is read as YAML 1.2, where only true and false are booleans)")
            return default
        return bool(self.typed(key, bool, default))

    def integer(self, key: str, default: Any = _REQUIRED, *, low: int = 0,
                high: int = 2**31) -> Any:
        value = self.typed(key, int, default, "a whole number")
        if isinstance(value, int) and not low <= value <= high:
            self.problem(key, f"must be between {low} and {high} (got {value})")
        return value

    def duration(self, key: str, default: float | None, *, positive: bool = True) -> float:
        present, value = self._raw(key, default)
        if not present:
            return cast(float, value)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return default or 0.0
        if positive and seconds <= 0:
            self.problem(key, "must be greater than zero")
        return seconds

    def strings(self, key: str, default: Any = _REQUIRED) -> Any:
        present, value = self._raw(key, default)
        if not present:
            return value
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(key, "expected a list of non-empty strings")
            return () if default is _REQUIRED else default
        return tuple(value)

    def section(self, key: str, *, required: bool = True) -> _Section | None:
        present, value = self._raw(key, _REQUIRED if required else None)
        if not present:
            return None
        if not isinstance(value, dict):
            self.problem(key, f"expected a mapping (got {_type_name(value)})")
            return None
        return _Section(value, self.at(key), self.problems)

    def file(self, key: str, default: Any = _REQUIRED,
             check: Callable[[bytes], None] | None = None) -> Path | None:
        value = self.string(key, default)
        if not isinstance(value, str) or not value:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.problems.base_dir / path
        self.problems.files.append((self.at(key), path))
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.problem(key, f"cannot read {path}: {exc.strerror or exc}")
            return path
        if check is not None:
            try:
                check(data)
            except ValueError as exc:
                self.problem(key, f"{path}: {exc}")
        return path

    def url(self, key: str, default: Any = _REQUIRED, *,
            schemes: tuple[str, ...] = ("https",)) -> Any:
        value = self.string(key, default)
        if isinstance(value, str) and value:
            parts = urlsplit(value)
            if parts.scheme not in schemes or not parts.hostname:
                self.problem(key, f"must be an absolute {' or '.join(schemes)} URL (got {value!r})")
        return value

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.problem(str(key), "unknown field")


# --- the YAML reader: YAML 1.2 scalars, no duplicate keys, bounded nesting -----------------
#
# PyYAML reads YAML 1.1, where an unquoted off/on/yes/no is a boolean, 0777 is octal and
# 1:30 is 90; and a key written twice silently keeps the last value. A security config must
# mean what it shows: scalars are resolved as in YAML 1.2's core schema (booleans are only
# true/false, in any of the cases True/TRUE; off/on/yes/no stay strings), and every duplicate
# key is an error with its YAML path.

_MAX_YAML_DEPTH = 64
_BOOL_TAG, _INT_TAG, _FLOAT_TAG = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                                   "tag:yaml.org,2002:float")
_YAML11_ONLY = {_BOOL_TAG, _INT_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp"}


class _TooDeep(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's scalars and a nesting bound."""

    yaml_implicit_resolvers = {  # noqa: RUF012 - PyYAML's own class-level table
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_ONLY]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > _MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _TooDeep(f"nested deeper than {_MAX_YAML_DEPTH} levels (line "
                               f"{mark.line + 1}); check the indentation")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_core_int(self, node: yaml.ScalarNode) -> int:
        value = str(self.construct_scalar(node))
        if value.startswith(("0x", "0o")):
            return int(value[2:], 16 if value[1] == "x" else 8)
        return int(value, 10)


_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT_TAG, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))
_Loader.add_constructor(_INT_TAG, _Loader.construct_core_int)


def _duplicates(node: yaml.Node, path: str, out: list[str], seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            at = f"{path}.{name}" if path else name
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, name) in first:
                    out.append(f"{at}: duplicate key (lines {first[(key.tag, name)]} and "
                               f"{line}); YAML would silently keep the last one: remove one")
                first.setdefault((key.tag, name), line)
            _duplicates(value, at, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicates(item, f"{path}[{i}]", out, seen)


def yaml_load(text: str, where: str = "(yaml)") -> Any:
    """Parse YAML text for the gateway; :class:`ConfigError` for bad YAML, duplicate keys
    and deep nesting (``where`` prefixes the syntax errors)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems: list[str] = []
        _duplicates(node, "", problems, set())
        if problems:
            raise ConfigError(problems)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:           # (_TooDeep included)
        raise ConfigError([f"{where}: {exc}"]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{where}: nested too deeply"]) from exc
    finally:
        loader.dispose()


def decode_utf8(data: bytes, path: Path) -> str:
    """File text as UTF-8, or ValueError naming the first bad byte and the fix."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line "
                         f"{line}); save it as UTF-8") from exc


# --- PEM checks: the gateway must not start with material it cannot use -------------------

def _check_certs(data: bytes) -> None:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate file ({exc})") from exc
    if not certs:
        raise ValueError("contains no certificate")


def _check_key(data: bytes) -> None:
    try:
        load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from exc


def _check_jwks(data: bytes) -> None:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWKS must be an object with a "keys" list')


def _ca_ders(path: Path | None) -> tuple[bytes, ...]:
    """DER of each certificate of a readable PEM bundle (problems are reported by its check)."""
    if path is None or not path.is_file():
        return ()
    try:
        return tuple(c.public_bytes(serialization.Encoding.DER)
                     for c in x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError):
        return ()
# --- checks of what would fail at run time (issue 20): CA bundles, key pairs, ports, files ---

def _check_client_ca(data: bytes) -> None:
    """A client CA bundle must hold a certificate that can issue (or pin) client certificates:
    CA:TRUE, or self-issued (a pinned self-signed client). Otherwise every handshake fails."""
    _check_certs(data)
    certs = x509.load_pem_x509_certificates(data)
    for cert in certs:
        try:
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                return
        except x509.ExtensionNotFound:
            pass
        if cert.issuer == cert.subject:
            return
    raise ValueError(f"holds no CA certificate ({len(certs)} certificate(s), none with "
                     "basicConstraints CA:TRUE nor self-signed): every client handshake would "
                     "fail; put the certificate of the CA that issues client certificates here")


def _check_key_pair(sec: _Section, key: str, cert_file: Path | None,
                    key_file: Path | None) -> None:
    """Report ``key`` when the private key does not belong to the certificate."""
    if cert_file is None or key_file is None or not (cert_file.is_file() and key_file.is_file()):
        return
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        sec.problem(key, f"{key_file} does not match the certificate {cert_file} ({exc}); use "
                    "the key the certificate was issued for")


def _check_ports(listen: ListenConfig | None, admin: AdminConfig, problems: _Problems) -> None:
    if listen is None or not admin.enabled or listen.port == 0 or admin.port != listen.port:
        return
    wildcard = ("0.0.0.0", "::", "")  # noqa: S104 - compared, not bound
    if listen.host == admin.host or listen.host in wildcard or admin.host in wildcard:
        problems.add("admin.port", f"is the same as listen.port ({admin.port}): the second "
                     "listener cannot bind; choose another port (the default is 9901)")


def unreadable_files(files: list[tuple[str, Path]], uid: int, gid: int) -> list[str]:
    """The files (``(yaml path, file)``, as :func:`load_config` lists them) that user
    ``uid``/``gid`` (no supplementary groups) could not read: owner, group and other
    permission bits of the file and the search bit of every folder on the way."""
    if uid == 0:
        return []
    out: list[str] = []
    for yaml_path, path in files:
        trouble = _read_trouble(path, uid, gid)
        if trouble:
            out.append(f"{yaml_path}: {trouble} for uid {uid} gid {gid}; make it readable "
                       "(chmod o+r, chgrp/chown to that user, or in Kubernetes "
                       "securityContext.fsGroup with the volume's defaultMode)")
    return out


def _read_trouble(path: Path, uid: int, gid: int) -> str | None:
    def allowed(st: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & bits[0])
        if st.st_gid == gid:
            return bool(st.st_mode & bits[1])
        return bool(st.st_mode & bits[2])

    search = (0o100, 0o010, 0o001)
    folders = {*path.parents, *Path(os.path.realpath(path)).parents}
    for folder in sorted(folders, key=lambda f: len(f.parts)):
        try:
            st = folder.stat()
        except OSError:
            continue
        if not allowed(st, search):
            return f"folder {folder} (mode {st.st_mode & 0o777:04o}) cannot be entered"
    try:
        st = path.stat()
    except OSError:
        return None     # reported by the loader already
    if not allowed(st, (0o400, 0o040, 0o004)):
        return (f"{path} (mode {st.st_mode & 0o777:04o}, owner {st.st_uid}:{st.st_gid}) "
                "cannot be read")
    return None


# --- sections --------------------------------------------------------------------------------

_CERT_HEADER_DEFAULTS = {"rfc9440": "Client-Cert", "xfcc": "X-Forwarded-Client-Cert",
                         "pem": "X-SSL-Client-Cert"}
_SAN_KINDS = ("dns", "uri", "ip", "email")


def _trusted_proxies(sec: _Section | None, path: str, problems: _Problems) -> TrustedProxies:
    sec = sec or _Section({}, path, problems)
    cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in sec.strings("cidrs", ()):
        try:
            cidrs.append(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            sec.problem("cidrs", f"{value!r} is not a network in CIDR notation ({exc})")
    subjects = sec.strings("subjects", ())
    for value in subjects:
        try:
            x509.Name.from_rfc4514_string(value)
        except ValueError as exc:
            sec.problem("subjects", f"{value!r} is not an RFC 4514 distinguished name ({exc})")
    sans = sec.strings("sans", ())
    for value in sans:
        kind, sep, rest = value.partition(":")
        if not sep or kind.lower() not in _SAN_KINDS or not rest:
            sec.problem("sans", f"{value!r} must be one of dns:, uri:, ip:, email: and a value")
        elif kind.lower() == "ip":
            try:
                ipaddress.ip_address(rest)
            except ValueError:
                sec.problem("sans", f"{value!r} is not an IP address")
    ca_file = sec.file("ca_file", None, check=_check_certs)
    if (subjects or sans) and ca_file is None:
        sec.problem("ca_file", "is required with subjects or sans: a name counts only on a "
                    "certificate that the front proxies' own CA issued, never merely because "
                    "the listener accepted it (anyone holding a trusted self-signed "
                    "certificate could issue itself the proxy's name)")
    elif ca_file is not None and not (subjects or sans):
        sec.problem("ca_file", "is only used with subjects or sans")
    sec.finish()
    if any(n.prefixlen == 0 for n in cidrs):
        sec.problem("cidrs", "a /0 network trusts every address; list your front proxies")
    return TrustedProxies(tuple(cidrs), subjects, sans, ca_file=ca_file,
                          ca_certs=_ca_ders(ca_file))


def _client_certificate(sec: _Section | None, problems: _Problems,
                        path: str) -> HeaderCertificateSource | None:
    """``listen.client_certificate``: None means the certificate of our own handshake."""
    if sec is None:
        return None
    source = sec.string("source", "tls", choices=("tls", "header"))
    fmt = sec.string("format", "rfc9440", choices=("rfc9440", "xfcc", "pem"))
    header = sec.string("header", _CERT_HEADER_DEFAULTS.get(fmt or "", "Client-Cert"))
    chain_header = sec.string("chain_header", "Client-Cert-Chain" if fmt == "rfc9440" else "")
    for key, name in (("header", header), ("chain_header", chain_header)):
        if name and not _HEADER_NAME.match(name):
            sec.problem(key, f"{name!r} is not a valid header name")
        elif name and name.lower() in ("authorization", "host", "connection", "cookie"):
            sec.problem(key, f"{name!r} cannot carry a certificate")
    if chain_header and fmt != "rfc9440":
        sec.problem("chain_header", "only the rfc9440 format has a separate chain header")
    trusted = _trusted_proxies(sec.section("trusted_proxies", required=False),
                               sec.at("trusted_proxies"), problems)
    sec.finish()
    if source != "header":
        for key in ("format", "header", "chain_header", "trusted_proxies"):
            if key in sec.data:
                sec.problem(key, "only applies with source: header")
        return None
    if not (trusted.cidrs or trusted.subjects or trusted.sans):
        sec.problem("trusted_proxies", "source: header needs at least one trust rule (cidrs, "
                    "subjects or sans): a header from anyone is a forgery waiting to happen")
    return HeaderCertificateSource(format=fmt, header=header, chain_header=chain_header or None,
                                   trusted=trusted)


def _listen(sec: _Section) -> ListenConfig:
    tls = sec.boolean("tls", True)
    need = _REQUIRED if tls else None
    client_ca = sec.string("client_ca", "pki", choices=("pki", "any"))
    validity = sec.string("client_cert_validity", "enforce", choices=("enforce", "ignore"))
    stack = sec.string("tls_stack", "openssl", choices=("openssl", "python"))
    if stack == "python" and client_ca == "any":
        sec.problem("tls_stack", "python cannot serve client_ca: any (Python's ssl module "
                    "has no verify callback); use tls_stack: openssl")
    if client_ca == "any":
        if sec.has("client_ca_file"):
            sec.problem("client_ca_file", "is not used with client_ca: any (every issuer is "
                        "accepted); remove it, or use client_ca: pki")
        if not tls:
            sec.problem("client_ca", "any needs tls: true (a plain-HTTP listener performs no "
                        "TLS handshake of its own)")
        ca_file = None
    else:
        # An unknown client_ca is reported already: do not add "client_ca_file is required".
        ca_file = sec.file("client_ca_file", need if client_ca else None,
                           check=_check_client_ca)
        if validity == "ignore" and sec.has("client_cert_validity"):
            sec.problem("client_cert_validity", "ignore needs client_ca: any (with client_ca: "
                        "pki the TLS library always enforces validity dates)")
    listen = ListenConfig(
        host=sec.string("host", "0.0.0.0"),  # noqa: S104 - a sidecar serves the pod IP
        port=sec.integer("port", 8443, low=0, high=65535),
        cert_file=sec.file("cert_file", need, check=_check_certs),
        key_file=sec.file("key_file", need, check=_check_key),
        client_ca_file=ca_file,
        client_cert=sec.string("client_cert", "required", choices=("required", "optional")),
        min_tls_version=sec.string("min_tls_version", "1.2", choices=("1.2", "1.3")),
        max_tls_version=sec.string("max_tls_version", "1.3", choices=("1.2", "1.3")),
        tls=tls,
        client_certificate=_client_certificate(
            sec.section("client_certificate", required=False), sec.problems,
            sec.at("client_certificate")),
        client_ca=client_ca or "pki",
        client_cert_validity=validity or "enforce",
        tls_stack=stack or "openssl",
    )
    if listen.min_tls_version == "1.3" and listen.max_tls_version == "1.2":
        sec.problem("min_tls_version", "is higher than max_tls_version")
    header = listen.client_certificate
    if not tls:
        if header is None:
            sec.problem("tls", "a plain-HTTP listener has no client certificate of its own; it "
                        "needs client_certificate.source: header")
        elif header.trusted.subjects or header.trusted.sans:
            sec.problem("tls", "trusted_proxies subjects/sans need the front proxy's mutual "
                        "TLS: keep tls: true, or trust by cidrs only")
    elif header is not None and listen.client_ca == "any" and (
            header.trusted.subjects or header.trusted.sans):
        # Under client_ca: any nobody vouches for a subject: anyone can self-sign "CN=proxy".
        sec.problem("client_ca", "any cannot identify a front proxy by subject or SAN (a "
                    "self-signed certificate can claim any name); use client_ca: pki with the "
                    "proxy's CA, or trust by cidrs only")
    if listen.cert_file and listen.key_file and not sec.problems.items:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(listen.cert_file, listen.key_file)
        except (ssl.SSLError, OSError) as exc:
            sec.problem("key_file", f"does not match cert_file ({exc})")
    sec.finish()
    return listen


def _admin(sec: _Section | None, problems: _Problems) -> AdminConfig:
    sec = sec or _Section({}, "admin", problems)
    admin = AdminConfig(
        enabled=sec.boolean("enabled", True),
        host=sec.string("host", "127.0.0.1"),
        port=sec.integer("port", 9901, low=0, high=65535),
    )
    sec.finish()
    return admin


def _algorithms(sec: _Section,
                default: tuple[str, ...] = ("RS256", "PS256", "ES256")) -> tuple[str, ...]:
    """An allowlist of signature algorithms: asymmetric only, never empty (providers, DPoP)."""
    algorithms = sec.strings("algorithms", default)
    for alg in algorithms:
        if alg not in ASYMMETRIC_ALGORITHMS:
            sec.problem("algorithms", f"{alg!r} is not allowed; choose from "
                        f"{', '.join(ASYMMETRIC_ALGORITHMS)} (never none or HMAC)")
    if not algorithms:
        sec.problem("algorithms", "must list at least one algorithm")
    return cast(tuple[str, ...], algorithms)


def _jwt_provider(name: str, sec: _Section) -> JwtProvider:
    jwks_uri = sec.url("jwks_uri", None)
    jwks: dict[str, Any] | None = sec.typed("jwks", dict, None)
    jwks_file = sec.file("jwks_file", None, check=_check_jwks)
    if jwks is not None:
        try:
            _check_jwks(json.dumps(jwks).encode())
        except ValueError as exc:
            sec.problem("jwks", str(exc))
    if jwks_file is not None and jwks_file.is_file():
        try:
            jwks = json.loads(jwks_file.read_text())
        except (OSError, ValueError):
            jwks = None  # reported by the file check
    algorithms = _algorithms(sec)
    if jwks is not None and not sec.problems.items:
        try:
            KeySet.from_document(jwks, algorithms)
        except ValueError as exc:
            sec.problem("jwks_file" if jwks_file else "jwks", str(exc))
    sources = [k for k, v in (("jwks_uri", jwks_uri), ("jwks", sec.data.get("jwks")),
                               ("jwks_file", jwks_file)) if v]
    if len(sources) != 1:
        sec.problem("jwks_uri", "set exactly one of jwks_uri, jwks, jwks_file"
                    + (f" (got {', '.join(sources)})" if sources else ""))
    audiences = sec.strings("audiences")
    if audiences == ():
        sec.problem("audiences", "must list at least one audience")
    provider = JwtProvider(
        name=name,
        issuer=sec.string("issuer"),
        audiences=audiences,
        algorithms=algorithms,
        jwks_uri=jwks_uri,
        jwks=jwks,
        jwks_ca_file=sec.file("jwks_ca_file", None, check=_check_certs),
        jwks_refresh_interval=sec.duration("jwks_refresh_interval", 300.0),
        jwks_refetch_cooldown=sec.duration("jwks_refetch_cooldown", 30.0, positive=False),
        jwks_timeout=sec.duration("jwks_timeout", 5.0),
        leeway=sec.duration("leeway", 30.0, positive=False),
        required_claims=sec.strings("required_claims", ()),
        require_typ_at_jwt=sec.boolean("require_typ_at_jwt", False),
        verify_cache_size=sec.integer("verify_cache_size", 10000, low=0, high=10_000_000),
    )
    sec.string("type")
    sec.finish()
    return provider


def _secret(sec: _Section) -> str | None:
    """The client secret from ``client_secret_file`` or ``client_secret_env`` (UTF-8 text),
    never inline."""
    raw = _secret_bytes(sec, "client_secret")
    if raw is None:
        return None
    try:        # (only a file can hold bytes that are not UTF-8: the environment is text)
        return decode_utf8(raw, Path(str(sec.data.get("client_secret_file")))).strip() or None
    except ValueError as exc:
        sec.problem("client_secret_file", str(exc))
        return None


def _introspection_provider(name: str, sec: _Section, problems: _Problems) -> IntrospectionProvider:
    method = sec.string("auth_method", "client_secret_basic",
                        choices=("client_secret_basic", "client_secret_post", "tls_client_auth"))
    secret = _secret(sec)
    cert = sec.file("client_cert_file", None, check=_check_certs)
    key = sec.file("client_key_file", None, check=_check_key)
    if method in ("client_secret_basic", "client_secret_post") and secret is None \
            and not sec.has("client_secret_file") and not sec.has("client_secret_env"):
        sec.problem("auth_method", f"{method} needs client_secret_file or client_secret_env")
    if method == "tls_client_auth" and not (cert and key):
        sec.problem("auth_method", "tls_client_auth needs client_cert_file and client_key_file")
    _check_key_pair(sec, "client_key_file", cert, key)
    cache_sec = sec.section("cache", required=False) or _Section({}, sec.at("cache"), problems)
    cache = CacheConfig(
        maxsize=cache_sec.integer("maxsize", 10000, low=1, high=10_000_000),
        ttl=cache_sec.duration("ttl", 60.0),
        negative_ttl=cache_sec.duration("negative_ttl", 10.0),
    )
    cache_sec.finish()
    provider = IntrospectionProvider(
        name=name,
        endpoint=sec.url("endpoint"),
        client_id=sec.string("client_id"),
        auth_method=method,
        client_secret=secret,
        client_cert_file=cert,
        client_key_file=key,
        ca_file=sec.file("ca_file", None, check=_check_certs),
        timeout=sec.duration("timeout", 2.0),
        issuer=sec.string("issuer", None),
        audiences=_introspection_audiences(sec),
        leeway=sec.duration("leeway", 30.0, positive=False),
        cache=cache,
        failure_threshold=sec.integer("failure_threshold", 5, low=1, high=1000),
        failure_cooldown=sec.duration("failure_cooldown", 5.0),
        **_introspection_pool(sec),
    )
    sec.string("type")
    sec.finish()
    return provider


def _introspection_audiences(sec: _Section) -> tuple[str, ...]:
    """Required: the resource identifiers accepted, or ``any`` (() after loading).

    Opaque tokens carry no audience the gateway can see without asking; an endpoint that
    answers for every resource of the authorization server would otherwise make a token
    meant for another API good here.
    """
    if sec.data.get("audiences") == "any":
        sec.has("audiences")
        return ()
    if sec.data.get("audiences") is None:
        sec.has("audiences")
        sec.problem("audiences", "is required: list the resource identifiers (aud values) "
                    "this gateway accepts, or write audiences: any to accept tokens meant "
                    "for any resource of the authorization server")
        return ()
    audiences: tuple[str, ...] = sec.strings("audiences")
    if audiences == () and isinstance(sec.data.get("audiences"), list):
        sec.problem("audiences", "must list at least one audience (or be: any)")
    return audiences


def _route_resource(sec: _Section) -> str | None:
    """``routes[].resource``: this route's RFC 9728 resource identifier (its own metadata)."""
    resource = sec.url("resource", None)
    if isinstance(resource, str) and (urlsplit(resource).query or urlsplit(resource).fragment):
        sec.problem("resource", "must have no query or fragment (RFC 9728 section 1.2)")
    if isinstance(resource, str) and urlsplit(resource).path.rstrip("/") == "":
        sec.problem("resource", "needs a path (its metadata is served at "
                    "/.well-known/oauth-protected-resource/<path>); the host's root is "
                    "metadata.resource")
    return resource if isinstance(resource, str) else None


def _check_route_resources(routes: tuple[Route, ...], metadata: MetadataConfig | None,
                           problems: _Problems) -> None:
    for i, route in enumerate(routes):
        if route.resource is None:
            continue
        if metadata is None:
            problems.add(f"routes[{i}].resource", "needs the metadata section (RFC 9728 "
                         "documents are served only with metadata.resource set)")
        elif route.resource.rstrip("/") == metadata.resource.rstrip("/"):
            problems.add(f"routes[{i}].resource", "equals metadata.resource; leave it out "
                         "(routes without resource use metadata.resource)")
        if not isinstance(route.auth, AuthPolicy):
            problems.add(f"routes[{i}].resource", "only a route with token auth (provider) "
                         "is a protected resource")
def _introspection_pool(sec: _Section) -> dict[str, Any]:
    """The gateway's own connection pool for an introspection endpoint (see introspection.py)."""
    return {"max_connections": sec.integer("max_connections", 100, low=1, high=10_000),
            "max_waiting": sec.integer("max_waiting", 1000, low=0, high=1_000_000),
            "queue_timeout": sec.duration("queue_timeout", 5.0)}


def _providers(sec: _Section | None) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    if sec is None:
        return providers
    for name, body in sec.data.items():
        sec.seen.add(name)
        path = sec.at(str(name))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            sec.problems.add(path, "provider names use letters, digits, _ . -")
            continue
        if not isinstance(body, dict):
            sec.problems.add(path, f"expected a mapping (got {_type_name(body)})")
            continue
        psec = _Section(body, path, sec.problems)
        kind = psec.string("type", choices=("jwt", "introspection"))
        if kind == "jwt":
            providers[name] = _jwt_provider(name, psec)
        elif kind == "introspection":
            providers[name] = _introspection_provider(name, psec, sec.problems)
    return providers


def _identity_headers(sec: _Section | None, problems: _Problems, path: str) -> IdentityHeaders:
    sec = sec or _Section({}, path, problems)

    def name(key: str, default: str | None) -> str | None:
        value = sec.string(key, default)
        if value is None or value == "":
            return None
        if not _HEADER_NAME.match(value):
            sec.problem(key, f"{value!r} is not a valid header name")
        elif value.lower() in ("authorization", "host", "cookie", "content-length"):
            sec.problem(key, f"{value!r} cannot carry identity")
        return cast(str, value)

    headers = IdentityHeaders(
        subject=name("subject", "X-Auth-Subject"),
        client_id=name("client_id", "X-Auth-Client-Id"),
        scope=name("scope", "X-Auth-Scope"),
        thumbprint=name("thumbprint", "X-Client-Cert-Thumbprint"),
        provider=name("provider", None),
    )
    lowered = [n.lower() for n in headers.names()]
    if len(set(lowered)) != len(lowered):
        sec.problems.add(path, "two identity fields use the same header name")
    sec.finish()
    return headers


def _upstream(sec: _Section) -> UpstreamConfig:
    upstream = UpstreamConfig(
        url=sec.url("url", schemes=("http", "https")),
        connect_timeout=sec.duration("connect_timeout", 5.0),
        read_timeout=sec.duration("read_timeout", 30.0),
        max_connections=sec.integer("max_connections", 100, low=1, high=100_000),
        pass_authorization=sec.boolean("pass_authorization", True),
        identity_headers=_identity_headers(sec.section("identity_headers", required=False),
                                           sec.problems, sec.at("identity_headers")),
        strip_headers=_strip_headers(sec),
        tls=_upstream_tls(sec),
    )
    _check_upstream_tls_scheme(sec, upstream.url)
    sec.finish()
    return upstream


def _strip_headers(sec: _Section) -> tuple[str, ...]:
    """``upstream.strip_headers``: exact header names the gateway needs are refused."""
    names: list[str] = []
    for name in sec.strings("strip_headers", ()):
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            sec.problem("strip_headers", f"{name!r} is not a valid header name")
        elif name.lower() in ("host", "content-length", "transfer-encoding", "content-type",
                              "connection", "authorization"):
            sec.problem("strip_headers", f"{name!r} cannot be stripped (authorization: use "
                        "pass_authorization: false)")
        else:
            names.append(name.lower())
    return tuple(names)
# --- TLS to the upstream (docs/upstream-tls.md) ---------------------------------------------

_SERVER_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?"
                          r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)*\.?$")


def _upstream_tls(sec: _Section, inherit: UpstreamTls | None = None) -> UpstreamTls:
    """``ca_file``, ``client_cert_file``/``client_key_file`` and ``server_name`` of an upstream;
    what ``inherit`` gives is used where the section says nothing (not ``server_name``)."""
    base = inherit or UpstreamTls()
    ca_file = sec.file("ca_file", None, check=_check_certs)
    cert = sec.file("client_cert_file", None, check=_check_certs)
    key = sec.file("client_key_file", None, check=_check_key)
    if (cert is None) != (key is None):
        missing = "client_key_file" if key is None else "client_cert_file"
        sec.problem(missing, "mutual TLS to the upstream needs both client_cert_file and "
                    "client_key_file")
    else:
        _check_key_pair(sec, "client_key_file", cert, key)
    server_name = sec.string("server_name", None)
    if isinstance(server_name, str) and not _SERVER_NAME.match(server_name):
        sec.problem("server_name", f"{server_name!r} is not a DNS name (no scheme, port or "
                    "path; an IP address needs no server_name)")
    if cert is None and key is None:
        cert, key = base.client_cert_file, base.client_key_file
    return UpstreamTls(ca_file=ca_file or base.ca_file, client_cert_file=cert,
                       client_key_file=key, server_name=server_name)


def _check_upstream_tls_scheme(sec: _Section, url: object) -> None:
    if isinstance(url, str) and urlsplit(url).scheme == "http":
        for key in ("ca_file", "client_cert_file", "client_key_file", "server_name"):
            if key in sec.data:
                sec.problem(key, "only applies to an https:// upstream")


def _route_upstream(sec: _Section, inherit: UpstreamTls | None
                    ) -> tuple[str | None, UpstreamTls | None]:
    """``routes[].upstream``: a URL (TLS settings from ``upstream``, but not its
    server_name), or a mapping with ``url`` and its own TLS settings."""
    value = sec.data.get("upstream")
    if not isinstance(value, dict):
        url = sec.url("upstream", None, schemes=("http", "https"))
        if not isinstance(url, str) or inherit is None:
            return url, None
        return url, UpstreamTls(inherit.ca_file, inherit.client_cert_file,
                                inherit.client_key_file)
    sec.has("upstream")
    usec = _Section(value, sec.at("upstream"), sec.problems)
    url = usec.url("url", schemes=("http", "https"))
    tls = _upstream_tls(usec, inherit)
    _check_upstream_tls_scheme(usec, url)
    usec.finish()
    return url, tls


def _match(sec: _Section) -> PathMatch | None:
    given = [k for k in ("path_prefix", "path", "path_regex") if sec.has(k)]
    if len(given) != 1:
        sec.problem("path_prefix", "set exactly one of path_prefix, path, path_regex")
        return None
    key = given[0]
    value = sec.string(key)
    if not isinstance(value, str):
        return None
    if key == "path_regex":
        try:
            return PathMatch("regex", value, re.compile(value))
        except re.error as exc:
            sec.problem(key, f"invalid regular expression: {exc}")
            return None
    if not value.startswith("/"):
        sec.problem(key, "must start with /")
    return PathMatch("prefix" if key == "path_prefix" else "exact", value)


def _auth(sec: _Section, providers: Mapping[str, Provider],
          registries: Mapping[str, ClientRegistryConfig] | None = None, *,
          binding_only: bool = False) -> AuthNone | AuthPolicy | AuthMtlsClient | None:
    present, value = sec._raw("auth", _REQUIRED)
    if not present:
        return None
    if value == "none":
        return AuthNone()
    if value == "mtls_client" or (isinstance(value, dict) and "mtls_client" in value):
        return _auth_mtls_client(sec, value, registries or {})
    if not isinstance(value, dict):
        sec.problem("auth", 'expected "none", "mtls_client" or a mapping with provider, '
                    "binding, scopes")
        return None
    asec = _Section(value, sec.at("auth"), sec.problems)
    names = asec.strings("provider")
    for name in names:
        if name not in providers:
            asec.problem("provider", f'unknown provider "{name}"')
    _check_chain(asec, [providers[n] for n in names if n in providers])
    binding = asec.string("binding", "required", choices=("required", "optional", "off"))
    constraint, dpop_nonce = _auth_sender_constraint(asec, binding)
    policy = AuthPolicy(
        providers=names,
        binding=binding,
        scopes=asec.strings("scopes", ()),
        sender_constraint=constraint,
        dpop_nonce=dpop_nonce,
    )
    if binding_only and policy.binding in ("optional", "off"):
        # Under client_ca: any a certificate proves key possession, not identity: only a
        # route that requires the token to be bound to it may rely on it.
        asec.problem("binding", f"{policy.binding} is refused with listen.client_ca: any "
                     "(a certificate from any issuer proves nothing without a token bound to "
                     "it); use binding: required, auth: none, or client_ca: pki")
    asec.finish()
    return policy


def _auth_mtls_client(sec: _Section, value: Any,
                      registries: Mapping[str, ClientRegistryConfig]) -> AuthMtlsClient | None:
    """``auth: mtls_client`` (the only registry) or ``auth: {mtls_client: {registry: ...}}``."""
    KNOWN_FIELDS.add("mtls_client")
    if value == "mtls_client":
        if len(registries) != 1:
            sec.problem("auth", "mtls_client without options needs exactly one entry in "
                        f"client_registries (found {len(registries)}); name it with "
                        "mtls_client.registry")
            return None
        return AuthMtlsClient(next(iter(registries)), "X-Auth-Client-Id", 65536)
    asec = _Section(value, sec.at("auth"), sec.problems)
    msec = asec.section("mtls_client", required=False) or _Section(
        {}, asec.at("mtls_client"), sec.problems)
    default_registry = next(iter(registries)) if len(registries) == 1 else _REQUIRED
    registry = msec.string("registry", default_registry)
    if isinstance(registry, str) and registry and registry not in registries:
        msec.problem("registry", f'unknown client registry "{registry}"')
    header = msec.string("client_header", "X-Auth-Client-Id")
    if isinstance(header, str) and header:
        if not _HEADER_NAME.match(header):
            msec.problem("client_header", f"{header!r} is not a valid header name")
        elif header.lower() in ("authorization", "host", "cookie", "content-length",
                                "content-type", "client-cert", "client-cert-chain"):
            msec.problem("client_header", f"{header!r} cannot name the client")
    policy = AuthMtlsClient(
        registry=registry,
        client_header=header or None,
        max_body_bytes=msec.integer("max_body_bytes", 65536, low=1024, high=16 * 1024 * 1024),
    )
    msec.finish()
    asec.finish()
    return policy


def _registered_self_signed(registries: Mapping[str, ClientRegistryConfig],
                            ) -> dict[str, list[tuple[str, x509.Certificate]]]:
    """Per registry: (client id, certificate) of every inline self_signed_tls_client_auth key."""
    found: dict[str, list[tuple[str, x509.Certificate]]] = {}
    for name, registry in registries.items():
        for client in registry.clients:
            if client.jwks is None:
                continue
            try:
                ders = certificates_from_jwks(client.jwks)
            except ValueError:
                continue                                  # reported where the client is read
            found.setdefault(name, []).extend(
                (client.client_id, x509.load_der_x509_certificate(d)) for d in sorted(ders))
    return found


def _check_trust(listen: ListenConfig, registries: Mapping[str, ClientRegistryConfig],
                 problems: _Problems) -> ListenConfig:
    """Nothing a client can make for itself may vouch for another certificate (anchors.py).

    Every CA bundle holds real CAs and no registered self-signed client; the ``pki``
    listener accepts registered self-signed certificates as exactly themselves, which needs
    certificates that cannot issue. Returns ``listen`` with those pinned certificates.
    """
    registered = _registered_self_signed(registries)
    keys = {spki(cert): client for certs in registered.values() for client, cert in certs}
    bundles: list[tuple[str, Path | None]] = [("listen.client_ca_file", listen.client_ca_file)]
    if listen.client_certificate is not None:
        bundles.append(("listen.client_certificate.trusted_proxies.ca_file",
                        listen.client_certificate.trusted.ca_file))
    bundles += [(f"client_registries.{n}.ca_file", r.ca_file) for n, r in registries.items()]
    for path, file in bundles:
        ders = _ca_ders(file)
        entries = [x509.load_der_x509_certificate(d) for d in ders]
        for problem in bundle_problems(entries, keys, pins=path == "listen.client_ca_file"):
            problems.add(path, problem)
    if not listen.tls or listen.client_ca != "pki" or listen.client_certificate is not None:
        return listen
    pins: list[bytes] = []
    for name, clients in registered.items():
        for client, cert in clients:
            if not self_issued(cert):
                continue            # issued by a CA: it passes the handshake if that CA is trusted
            if can_issue(cert):
                problems.add(
                    f"client_registries.{name}.clients",
                    f"client {client!r}: its certificate ({cert.subject.rfc4514_string()}) "
                    "can issue certificates (basicConstraints CA:TRUE, as openssl req -x509 "
                    "makes it, or no basicConstraints): the client_ca: pki listener could "
                    "accept it only as a trust anchor for any name. Have the client re-issue it "
                    "with basicConstraints CA:FALSE (openssl req -x509 -addext "
                    "basicConstraints=critical,CA:FALSE), or use listen.client_ca: any")
                continue
            pins.append(cert.public_bytes(serialization.Encoding.DER))
    return replace(listen, pinned_client_certs=tuple(dict.fromkeys(pins)))


def _check_chain(sec: _Section, chain: list[Provider]) -> None:
    """Refuse provider lists with members that could never be asked (see providers.py)."""
    seen_issuers: dict[str, str] = {}
    for i, provider in enumerate(chain):
        if isinstance(provider, IntrospectionProvider) and i != len(chain) - 1:
            sec.problem("provider", f'"{provider.name}" (introspection) takes every token, so '
                        "it must come last")
        if isinstance(provider, JwtProvider):
            if provider.issuer in seen_issuers:
                sec.problem("provider", f'"{provider.name}" can never be reached: '
                            f'"{seen_issuers[provider.issuer]}" claims every JWT of issuer '
                            f"{provider.issuer}")
            seen_issuers.setdefault(provider.issuer, provider.name)


def _routes(top: _Section, providers: Mapping[str, Provider],
            registries: Mapping[str, ClientRegistryConfig] | None = None, *,
            binding_only: bool = False,
            upstream_tls: UpstreamTls | None = None) -> tuple[Route, ...]:
    present, value = top._raw("routes", _REQUIRED)
    if not present:
        return ()
    if not isinstance(value, list) or not value:
        top.problem("routes", "expected a non-empty list of routes")
        return ()
    routes: list[Route] = []
    for i, body in enumerate(value):
        path = f"routes[{i}]"
        if not isinstance(body, dict):
            top.problems.add(path, f"expected a mapping (got {_type_name(body)})")
            continue
        sec = _Section(body, path, top.problems)
        name = sec.string("name", path)
        match = _match(sec)
        methods = sec.strings("methods", None)
        if methods is not None:
            methods = frozenset(m.upper() for m in methods)
            for m in sorted(methods - _HTTP_METHODS):
                sec.problem("methods", f"unknown HTTP method {m!r}")
        auth = _auth(sec, providers, registries, binding_only=binding_only)
        upstream_url, route_tls = _route_upstream(sec, upstream_tls)
        forward_cert = sec.boolean("forward_client_cert", False)
        resource = _route_resource(sec)
        sec.finish()
        if match is not None and auth is not None:
            routes.append(Route(name, match, methods, auth, upstream_url,
                                forward_client_cert=forward_cert, upstream_tls=route_tls,
                                resource=resource))
    return tuple(routes)


def _limits(sec: _Section | None, problems: _Problems) -> LimitsConfig:
    sec = sec or _Section({}, "limits", problems)
    d = LimitsConfig()
    limits = LimitsConfig(
        max_body_size=sec.integer("max_body_size", d.max_body_size, low=1, high=2**40),
        max_header_size=sec.integer("max_header_size", d.max_header_size, low=1024,
                                    high=1024 * 1024),
        max_headers=sec.integer("max_headers", d.max_headers, low=8, high=10_000),
        header_timeout=sec.duration("header_timeout", d.header_timeout),
        body_timeout=sec.duration("body_timeout", d.body_timeout),
        idle_timeout=sec.duration("idle_timeout", d.idle_timeout),
        max_requests_per_connection=sec.integer(
            "max_requests_per_connection", d.max_requests_per_connection, low=1, high=2**31),
        max_connections=sec.integer("max_connections", d.max_connections, low=1,
                                    high=1_000_000),
    )
    sec.finish()
    return limits


# --- token endpoint client registries and metadata (RFC 8705 section 2, RFC 9728) ---------

_SUBJECT_KEYS = {"tls_client_auth_subject_dn": "subject_dn", "tls_client_auth_san_dns": "san_dns",
                 "tls_client_auth_san_uri": "san_uri", "tls_client_auth_san_ip": "san_ip",
                 "tls_client_auth_san_email": "san_email"}


def _subject_dn_form(value: str) -> str | None:
    """A problem for a subject DN in OpenSSL's slash form, naming the RFC 4514 form meant."""
    meant = from_openssl_form(value)
    if meant is None:
        return None
    return (f"{value!r} is OpenSSL's /C=../O=../CN=.. form, not RFC 4514 (it would never "
            f'match); you meant: "{meant}"')


def _check_subject_value(sec: _Section, key: str, value: str) -> None:
    try:
        if key == "tls_client_auth_subject_dn":
            if (form := _subject_dn_form(value)) is not None:
                raise ValueError(form)
            parse_dn(value)
        elif key == "tls_client_auth_san_ip":
            ipaddress.ip_address(value)
        elif key == "tls_client_auth_san_uri" and not urlsplit(value).scheme:
            raise ValueError("must be an absolute URI")
        elif key == "tls_client_auth_san_email" and "@" not in value:
            raise ValueError("must be an e-mail address")
    except ValueError as exc:
        sec.problem(key, str(exc))


def _client(sec: _Section) -> ClientRegistration | None:
    client_id = sec.string("client_id")
    method = sec.string("token_endpoint_auth_method",
                        choices=("tls_client_auth", "self_signed_tls_client_auth"))
    subjects = {k: sec.string(k, None) for k in _SUBJECT_KEYS}
    given = [k for k, v in subjects.items() if v]
    for key in given:
        _check_subject_value(sec, key, subjects[key])
    jwks: dict[str, Any] | None = sec.typed("jwks", dict, None)
    jwks_uri = sec.url("jwks_uri", None)
    if jwks is not None:
        try:
            certificates_from_jwks(jwks)
        except ValueError as exc:
            sec.problem("jwks", str(exc))
    if method == "tls_client_auth":
        if len(given) != 1:
            got = f" (got {', '.join(given)})" if given else ""
            sec.problem("token_endpoint_auth_method",
                        f"tls_client_auth needs exactly one of {', '.join(_SUBJECT_KEYS)}{got}")
        if jwks is not None or jwks_uri:
            sec.problem("jwks", "jwks and jwks_uri are for self_signed_tls_client_auth")
    elif method == "self_signed_tls_client_auth":
        if (jwks is not None) == bool(jwks_uri):
            sec.problem("token_endpoint_auth_method",
                        "self_signed_tls_client_auth needs exactly one of jwks, jwks_uri")
        if given:
            sec.problem(given[0], "tls_client_auth_* values are for tls_client_auth")
    sec.finish()
    if not isinstance(client_id, str) or not client_id or method is None:
        return None
    return ClientRegistration(client_id=client_id, method=method, jwks=jwks, jwks_uri=jwks_uri,
                              **{_SUBJECT_KEYS[k]: v for k, v in subjects.items() if v})


def _clients(value: Any, path: str, problems: _Problems) -> list[ClientRegistration]:
    if not isinstance(value, list):
        problems.add(path, "expected a list of client registrations")
        return []
    clients: list[ClientRegistration] = []
    seen: set[str] = set()
    for i, body in enumerate(value):
        at = f"{path}[{i}]"
        if not isinstance(body, dict):
            problems.add(at, f"expected a mapping (got {_type_name(body)})")
            continue
        client = _client(_Section(body, at, problems))
        if client is None:
            continue
        if client.client_id in seen:
            problems.add(f"{at}.client_id", f'client "{client.client_id}" is registered twice')
        seen.add(client.client_id)
        clients.append(client)
    return clients


def _client_registry(name: str, sec: _Section) -> ClientRegistryConfig:
    inline = sec.data.get("clients")
    sec.has("clients")
    path = sec.file("file", None)
    clients: list[ClientRegistration] = []
    if (inline is not None) == (path is not None):
        sec.problem("clients", "set exactly one of clients (inline) and file")
    elif inline is not None:
        clients = _clients(inline, sec.at("clients"), sec.problems)
    elif path is not None and path.is_file():
        try:
            doc = yaml_load(decode_utf8(path.read_bytes(), path), f"{path}")
        except (OSError, ValueError) as exc:
            sec.problem("file", f"{path}: not readable YAML ({exc})")
            doc = None
        except ConfigError as exc:
            for problem in exc.problems:
                sec.problem("file", f"{path}: {problem}")
            doc = None
        if doc is not None:
            if not isinstance(doc, dict) or set(doc) != {"clients"}:
                sec.problem("file", f'{path}: expected a mapping with one key, "clients"')
            else:
                clients = _clients(doc["clients"], f"{path.name}:clients", sec.problems)
    ca_file = sec.file("ca_file", None, check=_check_certs)
    pki = [c.client_id for c in clients if c.method == "tls_client_auth"]
    if pki and ca_file is None:
        sec.problem("ca_file", f"is required when the registry has tls_client_auth clients "
                    f"({', '.join(pki[:3])}{', ...' if len(pki) > 3 else ''}): a registered "
                    "subject/SAN counts only on a certificate this CA bundle issued, never "
                    "merely because the listener accepted it")
    registry = ClientRegistryConfig(
        name=name,
        clients=tuple(clients),
        file=path,
        ca_file=ca_file,
        jwks_ca_file=sec.file("jwks_ca_file", None, check=_check_certs),
        jwks_refresh_interval=sec.duration("jwks_refresh_interval", 300.0),
        jwks_max_age=sec.duration("jwks_max_age", 3600.0),
        jwks_timeout=sec.duration("jwks_timeout", 5.0),
        ca_certs=_ca_ders(ca_file),
    )
    if registry.jwks_max_age < registry.jwks_refresh_interval:
        sec.problem("jwks_max_age", "must not be shorter than jwks_refresh_interval")
    sec.finish()
    return registry


def _client_registries(sec: _Section | None) -> dict[str, ClientRegistryConfig]:
    registries: dict[str, ClientRegistryConfig] = {}
    if sec is None:
        return registries
    for name, body in sec.data.items():
        sec.seen.add(name)
        path = sec.at(str(name))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            sec.problems.add(path, "registry names use letters, digits, _ . -")
            continue
        if not isinstance(body, dict):
            sec.problems.add(path, f"expected a mapping (got {_type_name(body)})")
            continue
        registries[name] = _client_registry(name, _Section(body, path, sec.problems))
    return registries


def _as_metadata(sec: _Section | None) -> AsMetadataRewrite | None:
    if sec is None:
        return None
    paths = sec.strings("paths", ("/.well-known/oauth-authorization-server",
                                  "/.well-known/openid-configuration"))
    for p in paths:
        if not p.startswith("/"):
            sec.problem("paths", f"{p!r} must start with /")
    aliases: dict[str, str] = {}
    present, value = sec._raw("mtls_endpoint_aliases", {})
    if present and not isinstance(value, dict):
        sec.problem("mtls_endpoint_aliases", "expected a mapping of endpoint name to URL")
    elif present:
        asec = _Section(value, sec.at("mtls_endpoint_aliases"), sec.problems)
        for key in value:
            url = asec.url(str(key))
            if isinstance(url, str):
                aliases[str(key)] = url
    sec.finish()
    return AsMetadataRewrite(paths=tuple(paths), mtls_endpoint_aliases=aliases)


def _metadata(sec: _Section | None, providers: Mapping[str, Provider],
              routes: tuple[Route, ...]) -> MetadataConfig | None:
    if sec is None:
        return None
    resource = sec.url("resource")
    if isinstance(resource, str) and (urlsplit(resource).query or urlsplit(resource).fragment):
        sec.problem("resource", "must have no query or fragment (RFC 9728 section 1.2)")
    issuers: list[str] = []
    for p in providers.values():
        if p.issuer and p.issuer not in issuers:
            issuers.append(p.issuer)
    scopes = sorted({s for r in routes if isinstance(r.auth, AuthPolicy) for s in r.auth.scopes})
    servers = sec.strings("authorization_servers", tuple(issuers))
    for i, server in enumerate(servers):
        parts = urlsplit(server)
        if parts.scheme != "https" or not parts.hostname:
            sec.problem(f"authorization_servers[{i}]", f"must be an https URL (got {server!r})")
    metadata = MetadataConfig(
        resource=resource,
        authorization_servers=servers,
        scopes_supported=sec.strings("scopes_supported", tuple(scopes)),
        resource_name=sec.string("resource_name", None),
        resource_documentation=sec.url("resource_documentation", None),
        as_metadata=_as_metadata(sec.section("authorization_server_metadata", required=False)),
    )
    sec.finish()
    return metadata


# --- DPoP (RFC 9449, issue 19): route fields and the top-level dpop section ----------------

def _auth_sender_constraint(asec: _Section, binding: Any) -> tuple[SenderConstraint, bool]:
    """``auth.sender_constraint`` and ``auth.dpop_nonce`` of one route."""
    constraint = asec.string("sender_constraint", "mtls",
                             choices=("mtls", "dpop", "mtls_or_dpop")) or "mtls"
    nonce = asec.boolean("dpop_nonce", False)
    if constraint != "mtls" and binding in ("optional", "off"):
        asec.problem("binding", f"{binding} is refused with sender_constraint: {constraint} "
                     "(a DPoP route accepts only tokens bound to the proof's key)")
    if nonce and constraint == "mtls":
        asec.problem("dpop_nonce", "needs sender_constraint: dpop or mtls_or_dpop")
    return cast(SenderConstraint, constraint), nonce


def _secret_bytes(sec: _Section, name: str) -> bytes | None:
    """``<name>_file`` or ``<name>_env`` (one of them), as bytes with surrounding whitespace
    cut; an inline ``<name>`` is refused: a secret is never written into the config."""
    if name in sec.data:
        sec.seen.add(name)
        sec.problem(name, f"inline secrets are refused; use {name}_file or {name}_env")
    path = sec.file(f"{name}_file", None)
    env = sec.string(f"{name}_env", None)
    if path and env:
        sec.problem(f"{name}_file", f"set only one of {name}_file, {name}_env")
    if path and path.is_file():
        try:
            return path.read_bytes().strip() or None
        except OSError as exc:
            sec.problem(f"{name}_file", str(exc))
            return None
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            sec.problem(f"{name}_env", f"environment variable {env} is not set or empty")
        return value.encode() or None
    return None


def _dpop_replay_store(sec: _Section) -> str:
    store = sec.string("replay_store", "memory")
    if not isinstance(store, str) or store == "memory":
        return "memory"
    parts = urlsplit(store)
    if parts.scheme not in ("redis", "rediss", "unix") or (
            parts.scheme != "unix" and not parts.hostname):
        sec.problem("replay_store", 'must be "memory" or a redis://, rediss:// or unix:// URL '
                    f"(got {store!r})")
    elif parts.password is not None:
        sec.problem("replay_store", "must not contain a password; use "
                    "replay_store_password_file or replay_store_password_env")
    return store


def _dpop_origins(sec: _Section) -> tuple[str, ...]:
    origins = sec.strings("external_origins", ())
    for i, origin in enumerate(origins):
        parts = urlsplit(origin)
        if parts.scheme not in ("https", "http") or not parts.hostname or \
                parts.path not in ("", "/") or parts.query or parts.fragment or \
                parts.username is not None:
            sec.problems.add(f"{sec.at('external_origins')}[{i}]",
                             "must be scheme://host[:port] with nothing else "
                             f"(got {origin!r})")
    return tuple(origins)


def _dpop(sec: _Section | None, problems: _Problems, routes: tuple[Route, ...]) -> DpopConfig:
    """The ``dpop:`` section (every field optional); checked against the routes using it."""
    nonce_routes = [r.name for r in routes
                    if isinstance(r.auth, AuthPolicy) and r.auth.dpop_nonce]
    if sec is None:
        if nonce_routes:
            problems.add("dpop.nonce_secret_file", "is required: routes "
                         f"{', '.join(nonce_routes[:3])} set dpop_nonce (or nonce_secret_env)")
        return DpopConfig()
    algorithms = _algorithms(sec, ASYMMETRIC_ALGORITHMS)
    store = _dpop_replay_store(sec)
    password = _secret_bytes(sec, "replay_store_password")
    if password and store == "memory":
        sec.problem("replay_store_password_file", "is only used with a redis replay_store")
    secret = _secret_bytes(sec, "nonce_secret")
    if secret is not None and len(secret) < 32:
        sec.problem("nonce_secret_file", "the nonce secret must be at least 32 bytes")
    if nonce_routes and secret is None and not any(
            k in sec.data for k in ("nonce_secret_file", "nonce_secret_env")):
        sec.problem("nonce_secret_file", "is required: routes "
                    f"{', '.join(nonce_routes[:3])} set dpop_nonce (or nonce_secret_env)")
    config = DpopConfig(
        algorithms=tuple(algorithms),
        iat_max_age=sec.duration("iat_max_age", 60.0),
        iat_max_skew=sec.duration("iat_max_skew", 5.0, positive=False),
        replay_store=store,
        replay_cache_size=sec.integer("replay_cache_size", 100_000, low=1000,
                                      high=10_000_000),
        replay_store_timeout=sec.duration("replay_store_timeout", 0.5),
        replay_store_password=password.decode() if password else None,
        nonce_secret=secret,
        nonce_lifetime=sec.duration("nonce_lifetime", 300.0),
        external_origins=_dpop_origins(sec),
        max_proof_size=sec.integer("max_proof_size", 8192, low=1024, high=65536),
    )
    sec.finish()
    return config


def _logging(sec: _Section | None, problems: _Problems) -> LoggingConfig:
    sec = sec or _Section({}, "logging", problems)
    cfg = LoggingConfig(level=sec.string("level", "INFO",
                                         choices=("DEBUG", "INFO", "WARNING", "ERROR")))
    sec.finish()
    return cfg


def load_config_text(text: str, *, base_dir: Path, source: Path | None = None,
                     read_files: list[tuple[str, Path]] | None = None) -> GatewayConfig:
    """Parse and validate YAML text; raise :class:`ConfigError` listing every problem.
    ``read_files`` receives ``(yaml path, file)`` for every file the config names."""
    data = yaml_load(text)
    if not isinstance(data, dict):
        raise ConfigError(["(top): expected a mapping of sections"])
    problems = _Problems(base_dir)
    if read_files is not None:
        problems.files = read_files
    top = _Section(data, "", problems)
    listen_sec = top.section("listen")
    listen = _listen(listen_sec) if listen_sec else None
    admin = _admin(top.section("admin", required=False), problems)
    providers = _providers(top.section("providers", required=False))
    upstream_sec = top.section("upstream")
    upstream = _upstream(upstream_sec) if upstream_sec else None
    registries = _client_registries(top.section("client_registries", required=False))
    any_ca = listen is not None and listen.client_ca == "any"
    routes = _routes(top, providers, registries, binding_only=any_ca,
                     upstream_tls=upstream.tls if upstream is not None else None)
    if listen is not None:
        listen = _check_trust(listen, registries, problems)
    metadata = _metadata(top.section("metadata", required=False), providers, routes)
    _check_route_resources(routes, metadata, problems)
    logging_cfg = _logging(top.section("logging", required=False), problems)
    dpop = _dpop(top.section("dpop", required=False), problems, routes)
    limits = _limits(top.section("limits", required=False), problems)
    realm = top.string("realm", "mtls-gateway")
    if isinstance(realm, str) and ('"' in realm or "\\" in realm):
        top.problem("realm", "must not contain quotes or backslashes")
    grace = top.duration("shutdown_grace", 20.0, positive=False)
    delay = top.duration("shutdown_delay", 0.0, positive=False)
    reload_interval = top.duration("reload_interval", 2.0, positive=False)
    fast_lane = top.boolean("fast_lane", True)
    top.finish()
    _check_ports(listen, admin, problems)
    if problems.items or listen is None or upstream is None:
        raise ConfigError(problems.items or ["(top): incomplete configuration"])
    return GatewayConfig(source=source, realm=realm, listen=listen, admin=admin,
                         providers=providers, upstream=upstream, routes=routes,
                         logging=logging_cfg, shutdown_grace=grace, shutdown_delay=delay,
                         reload_interval=reload_interval, client_registries=registries,
                         metadata=metadata, limits=limits, fast_lane=fast_lane, dpop=dpop)


def load_config(path: Path, *, read_files: list[tuple[str, Path]] | None = None
                ) -> GatewayConfig:
    """Read ``path`` (blocking; only at start-up or reload) and validate it."""
    try:
        text = decode_utf8(path.read_bytes(), path)
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {path}: {exc.strerror or exc}"]) from exc
    except ValueError as exc:
        raise ConfigError([f"(file): {exc}"]) from exc
    return load_config_text(text, base_dir=path.resolve().parent, source=path.resolve(),
                            read_files=read_files)
