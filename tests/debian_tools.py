"""Real programs from Debian that tests start (nginx, HAProxy), installed when missing.

A fresh CI machine runs as root with apt: the package is installed there on first
use. Elsewhere a missing program skips its tests with the command to install it,
except under ``CI``, where a missing program is a failure, never a silent skip.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

__all__ = ["debian_program"]


@functools.cache
def _install(package: str) -> str:
    """apt-get install ``package``; '' on success, else what went wrong."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:   # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return "" if result.returncode == 0 else (result.stderr or result.stdout)[-2000:]


def debian_program(name: str, package: str) -> str:
    """Path of program ``name``, installing Debian ``package`` when possible."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    why = f"{name} is not installed (Debian: apt-get install {package})"
    if shutil.which("apt-get") and os.geteuid() == 0:
        error = _install(package)
        if not error:
            return debian_program(name, package)
        why += f"; installing it failed: {error}"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)
