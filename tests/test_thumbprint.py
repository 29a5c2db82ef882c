from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtls_gateway.thumbprint import thumbprint_matches, x5t_s256, x5t_s256_of_pem_file

APPENDIX_A = Path(__file__).parent / "data" / "rfc8705-appendix-a.pem"


def test_rfc8705_appendix_a_vector() -> None:
    assert x5t_s256_of_pem_file(APPENDIX_A) == "A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0"


def test_der_file_and_bytes_agree(tmp_path: Path) -> None:
    cert = x509.load_pem_x509_certificate(APPENDIX_A.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    (tmp_path / "c.der").write_bytes(der)
    assert x5t_s256_of_pem_file(tmp_path / "c.der") == x5t_s256(der)
    assert "=" not in x5t_s256(der) and len(x5t_s256(der)) == 43


@pytest.mark.parametrize(("a", "b", "equal"), [
    ("A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0", "A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0",
     True),
    ("A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0", "a4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0",
     False),
    ("A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0", "A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0=",
     False),
    ("", "A", False),
])
def test_comparison_is_exact(a: str, b: str, equal: bool) -> None:
    assert thumbprint_matches(a, b) is equal
