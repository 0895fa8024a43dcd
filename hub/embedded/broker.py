"""MQTT broker
-----------
``EmbeddedBroker`` runs an amqtt broker in the caller's event loop;
``EmbeddedBrokerThread`` runs one in its own thread and loop.

Known limits
------------
Found by experiment with amqtt 0.12.1, aiomqtt 2.5.1 and paho-mqtt 2.2:

* **MQTT 5: no.** The broker is MQTT 3.1.1 only. A paho client with
  ``protocol=MQTTv5`` gets CONNACK "unacceptable protocol version" (aiomqtt raises
  ``MqttConnectError`` "[code:132] Unsupported protocol version"). Use 3.1.1 against it.
* **Shared subscriptions: no.** ``SUBSCRIBE $share/group/topic`` is granted (SUBACK QoS 1)
  but the filter is matched literally, so the subscriber silently receives nothing.
* **Redelivery of unacknowledged QoS 1: patched.** amqtt 0.12 itself waits 5 s for a
  PUBACK and then drops the message, and drops in-flight messages when the subscriber's
  connection ends. ``hub/embedded/amqtt_redelivery.py`` (installed by ``start()``) makes
  the broker keep an unacknowledged message in the session until its PUBACK and resend it
  when the session reconnects, as MQTT 3.1.1 requires. Sessions still live in memory only:
  when the broker's process dies, so does what it held (see "In-process broker" in
  docs/architecture.md).
* **Retained messages and the subscription table: patched.** amqtt 0.12 sent each new
  connection the retained messages matching *any* client's filters, and iterated its
  subscription table while awaiting; both are fixed in ``amqtt_redelivery.py``.
* **A silent client is never timed out**: its last will is published only when its
  connection is reset, not after the keep-alive (an edge test of the will by keep-alive
  is skipped on this broker). Sockets of connections closed before CONNECT leak
  (ResourceWarning in test runs).
* **In-flight window: unbounded.** With paho manual acknowledgement the broker keeps
  sending while earlier messages are unacked: all 2000 of 2000 published messages
  arrived with none acked. There is no receive-maximum or inflight limit (packet ids,
  65535, are the only bound).
* **Persistent sessions work only for non-anonymous sessions.** amqtt's own
  ``AnonymousAuthPlugin`` marks every session anonymous, and anonymous sessions are
  discarded on disconnect and never queue messages. We accept everyone through
  ``OpenAuthPlugin`` instead, which leaves sessions non-anonymous. A subscriber with
  ``clean_session=False`` and a fixed client id then keeps its subscriptions and gets
  the QoS 1 messages published while it was away, but they arrive with the
  **retain flag set**. Sessions live in memory only, so a broker restart loses them,
  as it loses retained messages.
* Ordering: the broker sends each message from its own task, so order is not
  guaranteed by design; 1000 concurrent QoS 1 publishes still arrived in order here.
"""


from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Any

import structlog
from amqtt.plugins.base import BaseAuthPlugin

from hub.embedded._common import LOOPBACK, SyncService

log = structlog.get_logger(__name__)


_NOISY_LOGGERS = ("amqtt", "transitions")





# --------------------------------------------------------------------------- MQTT broker


class OpenAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt authentication plugin that lets every client in.

    Unlike amqtt's ``AnonymousAuthPlugin`` it does not mark sessions anonymous, which
    would disable persistent sessions (see "Known limits"). Loaded by dotted path.
    """

    async def authenticate(self, *, session: Any) -> bool:
        """Accept the client."""
        return True


def _quiet_amqtt() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


class EmbeddedBroker:
    """An MQTT 3.1.1 broker (amqtt) in the running event loop.

    Anonymous clients are accepted; QoS 0/1/2 and retained messages work; a client
    with ``clean_session=False`` and a fixed client id keeps its session across
    reconnects for the broker's lifetime (or ``session_expiry_s`` after disconnecting).
    See the module's "Known limits" before relying on QoS 1 redelivery.
    """

    def __init__(
        self,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        session_expiry_s: int | None = 24 * 3600,
    ) -> None:
        """Describe a broker; ``port=0`` lets the OS pick. Nothing happens until ``start()``."""
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        self.host = host
        self._requested_port = port
        self._session_expiry_s = session_expiry_s
        self._broker: Any = None
        self._port: int | None = None

    @property
    def port(self) -> int | None:
        """The bound port while running, else ``None``."""
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port``; only valid while running."""
        if self._port is None:
            raise RuntimeError("embedded broker is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self._port}"

    def _config(self) -> dict[str, Any]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{host}:{self._requested_port}"},
            },
            "session_expiry_interval": self._session_expiry_s,
            # Only our auth plugin: the default set adds packet/event loggers and $SYS
            # publishing, whose deprecation warning would point at this module.
            "plugins": {f"{__name__}.{OpenAuthPlugin.__name__}": {}},
        }

    async def start(self) -> str:
        """Bind and start serving; return the broker URL. Idempotent while running."""
        if self._port is not None:
            return self.url
        from amqtt.broker import Broker

        from hub.embedded import amqtt_redelivery

        amqtt_redelivery.install()
        _quiet_amqtt()
        broker = Broker(self._config())
        await broker.start()
        try:
            # The actual port when bound to 0: there is no public accessor in amqtt 0.12.
            server = broker._servers["default"].instance
            self._port = int(server.sockets[0].getsockname()[1])
        except BaseException:
            await broker.shutdown()
            raise
        self._broker = broker
        log.info("embedded_broker_started", url=self.url)
        return self.url

    async def stop(self) -> None:
        """Disconnect every client and close the listener. Idempotent."""
        broker, self._broker, self._port = self._broker, None, None
        if broker is not None:
            await broker.shutdown()
            log.info("embedded_broker_stopped")

    async def __aenter__(self) -> str:
        """Start and return the URL."""
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop."""
        await self.stop()


class EmbeddedBrokerThread(SyncService):
    """An ``EmbeddedBroker`` running in a daemon thread with its own event loop.

    For synchronous code (pytest fixtures, scripts) and for processes whose main loop
    should not carry the broker's traffic. ``start()`` blocks until the broker listens.
    """

    def __init__(
        self,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        session_expiry_s: int | None = 24 * 3600,
        timeout_s: float = 15.0,
    ) -> None:
        """Describe a broker thread; nothing happens until ``start()``."""
        self._broker = EmbeddedBroker(host=host, port=port, session_expiry_s=session_expiry_s)
        self._timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port``; only valid while running."""
        return self._broker.url

    @property
    def port(self) -> int | None:
        """The bound port while running, else ``None``."""
        return self._broker.port

    def start(self) -> str:
        """Start the thread and the broker; return the broker URL."""
        if self._thread is not None:
            return self.url
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run, args=(loop,), name="embedded-mqtt-broker", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            return asyncio.run_coroutine_threadsafe(self._broker.start(), loop).result(
                self._timeout_s
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the broker, the loop and the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self._broker.stop(), loop).result(self._timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self._timeout_s)
            if thread.is_alive():
                log.warning("embedded_broker_thread_still_running")

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __repr__(self) -> str:
        """Show the URL or that it is stopped."""
        state = self._broker.url if self._broker.port is not None else "stopped"
        return f"EmbeddedBrokerThread({state})"
