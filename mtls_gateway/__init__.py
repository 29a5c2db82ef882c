"""mtls-gateway: a reverse-proxy sidecar enforcing RFC 8705 certificate-bound access tokens."""

__version__ = "0.1.0"
