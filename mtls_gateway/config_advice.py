"""What ``mtls-gateway check`` warns about: a valid configuration that will not do what the
integrator meant. Pure: reads a loaded :class:`GatewayConfig`, imports no network code.

* an RFC 9728 resource the gateway advertises that is not among the audiences of a provider
  guarding it: a spec-following client gets a token for that resource, and the route
  refuses it (``wrong_audience``);
* a ``tls_client_auth_subject_dn`` written most general first (``C=..,O=..,CN=..``, the
  certificate's order): valid RFC 4514, but never equal to the certificate's subject.
"""

from __future__ import annotations

from .config import AuthPolicy, GatewayConfig, Route
from .dn_forms import reversed_form

__all__ = ["config_warnings"]


def config_warnings(config: GatewayConfig) -> list[str]:
    """Every warning, each ``path: message``."""
    return [*_audience_warnings(config), *_subject_dn_warnings(config)]


def _advertised(config: GatewayConfig) -> list[tuple[str, str, list[Route]]]:
    """(YAML path, resource, the token routes its document speaks for)."""
    meta = config.metadata
    if meta is None:
        return []
    out = [("metadata.resource", meta.resource,
            [r for r in config.routes if r.resource is None])]
    seen = {meta.resource}
    for i, route in enumerate(config.routes):
        if route.resource is not None and route.resource not in seen:
            seen.add(route.resource)
            out.append((f"routes[{i}].resource", route.resource,
                        [r for r in config.routes if r.resource == route.resource]))
    return out


def _audience_warnings(config: GatewayConfig) -> list[str]:
    warnings: list[str] = []
    for path, resource, routes in _advertised(config):
        told: set[str] = set()
        for route in routes:
            if not isinstance(route.auth, AuthPolicy):
                continue
            for name in route.auth.providers:
                provider = config.providers.get(name)
                if provider is None or name in told or not provider.audiences:
                    continue        # no audiences: introspection with "audiences: any"
                if resource in provider.audiences:
                    continue
                told.add(name)
                near = [a for a in provider.audiences if a.rstrip("/") == resource.rstrip("/")]
                hint = (f" (it lists {near[0]!r}: aud values are compared exactly)" if near
                        else "")
                warnings.append(
                    f"{path}: {resource!r} is not among the audiences of provider "
                    f'"{name}" ({", ".join(provider.audiences)}) that guards route '
                    f'"{route.name}"{hint}: a client following RFC 9728 asks for a token for '
                    f"{resource!r} and the route refuses it (wrong_audience)")
    return warnings


def _subject_dn_warnings(config: GatewayConfig) -> list[str]:
    warnings: list[str] = []
    for name, registry in config.client_registries.items():
        for client in registry.clients:
            if client.subject_dn is None:
                continue
            meant = reversed_form(client.subject_dn)
            if meant is not None:
                warnings.append(
                    f'client_registries.{name}: client "{client.client_id}": '
                    f"tls_client_auth_subject_dn {client.subject_dn!r} is written most general "
                    "first (the certificate's order); RFC 4514, which the gateway compares "
                    f'with, writes the most specific first: "{meant}"')
    return warnings
