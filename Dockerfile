# mtls-gateway container image.
#
#   docker build -t ghcr.io/example/mtls-gateway:0.1.0 .
#   docker run --read-only -v "$PWD/conf:/etc/mtls-gateway:ro" -p 8443:8443 \
#       ghcr.io/example/mtls-gateway:0.1.0
#
# Two stages on the same pinned base (the venv's interpreter symlink points into it):
#   builder: builds the project's wheel and installs it with its dependencies into
#            /opt/venv (a venv made without pip);
#   final:   the base image plus /opt/venv, no compilers, no pip, non-root, and no writes
#            needed at run time (works with a read-only root filesystem).
# tests/test_dockerfile.py lints this file with hadolint and runs the builder's RUN step and
# the ENTRYPOINT/CMD below in a fresh virtual environment.
# For fully reproducible builds, pin the base by digest as well: python:3.11-slim-trixie@sha256:...

FROM python:3.11-slim-trixie AS builder

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mtls_gateway/ ./mtls_gateway/

# Network is used here (build time) only: the build backend and the dependencies' wheels.
# The "fast" extra adds uvloop, the faster event loop the gateway uses when it is installed.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir "$(echo /dist/*.whl)[fast]" \
    && /opt/venv/bin/mtls-gateway --help > /dev/null


FROM python:3.11-slim-trixie

LABEL org.opencontainers.image.title="mtls-gateway" \
      org.opencontainers.image.description="Reverse-proxy sidecar that enforces RFC 8705 certificate-bound OAuth access tokens" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/mtls-gateway" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-trixie"

# No package manager for Python at run time: the gateway never installs anything.
RUN python -m pip uninstall --no-cache-dir --yes pip setuptools wheel

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MTLS_GATEWAY_CONFIG=/etc/mtls-gateway/gateway.yaml

WORKDIR /
USER 65532:65532

# 8443: the mutual-TLS listener (listen.port); 9901: plain-HTTP probes and metrics
# (admin.port; set admin.host: 0.0.0.0 so that kubelet probes can reach it).
EXPOSE 8443 9901

ENTRYPOINT ["mtls-gateway"]
CMD ["run"]
