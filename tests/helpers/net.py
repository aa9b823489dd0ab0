"""Network helpers for tests that start servers (Ray, PostgreSQL, process groups)."""

from __future__ import annotations

import secrets
import socket

# `ray start` with token authentication refuses to start unless the token already exists (only
# ray.init generates one), so a fresh machine without ~/.ray/auth_token failed the Ray tests.
# The test process makes its own, given to the head and to every driver that joins it; Ray's
# token file in the home folder is neither needed nor written.
RAY_TOKEN_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
