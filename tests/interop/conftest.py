"""Fixtures for the interop tests: real PKI and a real authorization server (node-oidc-provider).

``interop_pki`` and ``oidc_provider`` are session-scoped and synchronous (the AS is a
subprocess; nothing here needs an event loop), so async tests of any loop scope can use them.
``start_oidc_provider`` starts extra, dedicated instances for tests that change AS state
(key rotation), so they do not disturb the shared one.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]
# tests/ is not a package: make `from oidc_server import ...`, `from gwtest import ...` (the
# recording upstream) and `import mtls_gateway` work however pytest is started (plain `pytest`
# does not put the repository root on sys.path).
for _path in (_HERE, _HERE.parent, _REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from oidc_server import (  # noqa: E402
    RESERVED_SECRET_CHARACTERS,
    InteropPKI,
    OidcProvider,
    make_interop_pki,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/interop carries the ``interop`` marker (``-m "not interop"``)."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.interop)


def require_node() -> None:
    """Skip, loudly, when Node.js is missing; every other setup failure is an error."""
    if shutil.which("node") is None:
        pytest.skip(
            "Node.js not found: `node` is not on PATH, so the interop tests cannot run "
            "node-oidc-provider (tests/interop/server.mjs). Install Node.js >= 20 and npm."
        )


@pytest.fixture(scope="session")
def interop_pki(tmp_path_factory: pytest.TempPathFactory) -> InteropPKI:
    """CA, server certificate, client A/B, a self-signed client and an unbound client."""
    return make_interop_pki(tmp_path_factory.mktemp("interop-pki"))


@pytest.fixture(scope="session")
def oidc_provider(interop_pki: InteropPKI,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """The shared AS, started once per session. Do not rotate its keys: use start_oidc_provider.

    The gateway client's secret carries characters that client_secret_basic must
    form-urlencode (RFC 6749 section 2.3.1), so every introspection call exercises that.
    """
    require_node()
    secret = secrets.token_urlsafe(24) + RESERVED_SECRET_CHARACTERS
    with OidcProvider(interop_pki, tmp_path_factory.mktemp("oidc-provider"),
                      gateway_client_secret=secret) as provider:
        yield provider


@pytest.fixture
def start_oidc_provider(
    interop_pki: InteropPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., OidcProvider]]:
    """Factory: ``start_oidc_provider(**OidcProvider kwargs)`` -> a running, dedicated AS.

    Every instance it started is stopped when the test ends.
    """
    require_node()
    started: list[OidcProvider] = []

    def start(**kwargs: Any) -> OidcProvider:
        provider = OidcProvider(interop_pki, tmp_path_factory.mktemp("oidc-provider"), **kwargs)
        started.append(provider.start())
        return provider

    yield start
    for provider in reversed(started):
        provider.stop()
