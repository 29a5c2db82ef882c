"""Subject DNs as integrators copy them (mtls_gateway/dn_forms.py)."""

from __future__ import annotations

import pytest
from cryptography import x509

from mtls_gateway.client_registry import dn_matches, parse_dn
from mtls_gateway.dn_forms import from_openssl_form, reversed_form


@pytest.mark.parametrize(("text", "meant"), [
    ("/C=US/O=Example/CN=client", "CN=client,O=Example,C=US"),
    ("/C=US/O=Example, Inc./CN=a+UID=7", "CN=a+UID=7,O=Example\\, Inc.,C=US"),
    ("/CN=a\\/b", "CN=a/b"),
    ("CN=client,O=Example,C=US", None),
    ("/", None),
    ("/C", None),
])
def test_from_openssl_form(text: str, meant: str | None) -> None:
    assert from_openssl_form(text) == meant


def test_the_meant_form_matches_the_certificate() -> None:
    """What the message tells the integrator to write does match the certificate."""
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "US"),
                         x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Example, Inc."),
                         x509.NameAttribute(x509.NameOID.COMMON_NAME, "client")])
    meant = from_openssl_form("/C=US/O=Example, Inc./CN=client")
    assert meant is not None and dn_matches(parse_dn(meant), subject)
    reversed_text = "C=US,O=Example\\, Inc.,CN=client"
    assert not dn_matches(parse_dn(reversed_text), subject)     # why it is worth a warning
    fixed = reversed_form(reversed_text)
    assert fixed is not None and dn_matches(parse_dn(fixed), subject)


@pytest.mark.parametrize(("text", "meant"), [
    ("C=US,O=Example,CN=client", "CN=client,O=Example,C=US"),
    ("C=US, O=Example, OU=Payments", "OU=Payments,O=Example,C=US"),
    ("DC=org,DC=example,CN=svc", "CN=svc,DC=example,DC=org"),
    ("CN=client,O=Example,C=US", None),
    ("O=Example,CN=client", None),      # cannot be told without C or DC first
    ("DC=org,DC=example", None),
    ("CN=client", None),
])
def test_reversed_form(text: str, meant: str | None) -> None:
    assert reversed_form(text) == meant
