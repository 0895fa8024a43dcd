"""A loopback TCP proxy that tests can cut and restore, to simulate an uplink outage.

Three states:

- forwarding: bytes flow both ways;
- ``cut()``: every connection is reset and the listening socket is closed, so a new
  connection is refused at once (a router that is down, a cable pulled at the edge);
- ``blackhole()``: connections stay open but every byte is thrown away and no close is
  passed on, in either direction (a path that fails somewhere in the middle: each side
  finds out only through its own keepalive).

``hold_replies()`` keeps every byte from the target until ``release_replies()`` (a broker
whose PUBACKs are late).
``restore()`` listens again on the same port and forwards new connections; connections
that were blackholed are reset (their bytes are gone, as they would be).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Literal, Self

_State = Literal["forwarding", "cut", "blackhole"]


class TcpProxy:
    """``async with TcpProxy(host, port) as proxy:`` then connect to ``proxy.url``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.state: _State = "forwarding"
        self.accepted = 0
        self._replies = asyncio.Event()
        self._replies.set()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def open_links(self) -> int:
        return len(self._links)

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        """Reset every connection and refuse new ones until ``restore()``."""
        self.state = "cut"
        await self._stop_listening()
        self._reset_all()

    def blackhole(self) -> None:
        """Keep connections open, drop every byte, pass on no close."""
        self.state = "blackhole"

    def hold_replies(self) -> None:
        """Keep what the target sends (PUBACKs, PINGRESPs) until ``release_replies()``."""
        self._replies.clear()

    def release_replies(self) -> None:
        self._replies.set()

    async def restore(self) -> None:
        if self.state == "blackhole":
            self._reset_all()
        self.state = "forwarding"
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        """Stop listening, reset every connection and wait for their handlers to end."""
        await self._stop_listening()
        self._reset_all()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _reset_all(self) -> None:
        for link in list(self._links):
            link.reset()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.state == "cut":
            writer.transport.abort()
            return
        if self.state == "blackhole":  # the path is dead: nothing reaches the target
            link = _Link(self, writer, None)
            self._links.add(link)
            try:
                await link.swallow(reader)
            finally:
                link.reset()
                self._links.discard(link)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(self, writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                link.pump(reader, up_writer), link.pump(up_reader, writer, gate=self._replies)
            )
        finally:
            link.reset()
            self._links.discard(link)


class _Link:
    """One client connection and its connection to the target."""

    def __init__(
        self, proxy: TcpProxy, down: asyncio.StreamWriter, up: asyncio.StreamWriter | None
    ) -> None:
        self._proxy = proxy
        self._writers = (down,) if up is None else (down, up)
        self._reset = asyncio.Event()

    async def pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        gate: asyncio.Event | None = None,
    ) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await source.read(65536)
                if self._proxy.state == "blackhole":
                    if not data:  # a close, not passed on: wait to be reset
                        await self._reset.wait()
                        break
                    continue
                if not data:
                    break
                if gate is not None:
                    await gate.wait()
                sink.write(data)
                await sink.drain()
        # One side closed while forwarding: close the other, as a real path would.
        self.reset()

    async def swallow(self, source: asyncio.StreamReader) -> None:
        """Read and drop everything, pass on no close, and wait to be reset."""
        with contextlib.suppress(OSError):
            while await source.read(65536):
                pass
        await self._reset.wait()

    def reset(self) -> None:
        self._reset.set()
        for writer in self._writers:
            writer.transport.abort()
