"""Distinguished names written the way integrators copy them, and the RFC 4514 form meant.

RFC 8705 ``tls_client_auth_subject_dn`` is an RFC 4514 string: the most specific RDN first
(``CN=client,O=Example,C=US``). Two other spellings are common and never match:

* OpenSSL's ``/C=US/O=Example/CN=client`` (``openssl x509 -subject`` with the old default
  name options), which is not RFC 4514 at all;
* the same RDNs comma-separated in certificate (DER) order, ``C=US,O=Example,CN=client``:
  valid RFC 4514, but the reverse of what the certificate says.

Pure string work, no network: config_load and ``check`` call it.
"""

from __future__ import annotations

import re

__all__ = ["from_openssl_form", "reversed_form"]

_SPECIAL = re.compile(r'([,+"\\<>;=])')
# The most general RDN types (a certificate's first RDNs) and the most specific (its last).
_GENERAL = frozenset({"C", "DC", "COUNTRYNAME", "DOMAINCOMPONENT"})
_SPECIFIC = frozenset({"CN", "COMMONNAME", "UID", "USERID", "EMAILADDRESS", "SERIALNUMBER"})


def _escape(value: str) -> str:
    out = _SPECIAL.sub(r"\\\1", value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            current += char
            escaped = True
        elif char == sep:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def from_openssl_form(text: str) -> str | None:
    """``/C=US/O=Example/CN=client`` -> ``CN=client,O=Example,C=US``; None: not that form."""
    if not text.startswith("/") or "=" not in text:
        return None
    rdns = [p for p in _split_unescaped(text[1:], "/") if p]
    out = []
    for rdn in rdns:
        avas = []
        for ava in rdn.split("+"):
            kind, sep, value = ava.partition("=")
            if not sep or not kind.strip():
                return None
            avas.append(f"{kind.strip()}={_escape(value.replace(chr(92) + '/', '/'))}")
        out.append("+".join(avas))
    return ",".join(reversed(out)) if out else None


def _kind(rdn: str) -> str:
    return rdn.partition("=")[0].strip().upper()


def reversed_form(text: str) -> str | None:
    """The RFC 4514 order if ``text`` is written general-first (``C=..,...,CN=..``); None: it
    reads the right way round (or cannot be told)."""
    rdns = [r.strip() for r in _split_unescaped(text, ",")]
    if len(rdns) < 2:
        return None
    first, last = _kind(rdns[0]), _kind(rdns[-1])
    if first in _GENERAL and last not in _GENERAL and (
            last in _SPECIFIC or first in ("C", "COUNTRYNAME")):
        return ",".join(reversed(rdns))
    return None
