"""What the embedded services share: the loopback address and free ports."""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from types import TracebackType

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


class SyncService(ABC):
    """A service started and stopped from synchronous code; ``with`` gives its URL."""

    @abstractmethod
    def start(self) -> str:
        """Start and return the URL."""

    @abstractmethod
    def stop(self) -> None:
        """Stop; safe to call when not running."""

    def __enter__(self) -> str:
        """Start and return the URL."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop."""
        self.stop()
