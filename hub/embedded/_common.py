"""What the embedded services share: the loopback address and free ports."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that the OS reports free right now.

    Another process may take it before the caller binds it; callers that can bind to
    port 0 themselves should do that instead.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
