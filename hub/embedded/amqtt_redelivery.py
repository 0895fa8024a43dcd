"""QoS 1 redelivery for the embedded amqtt broker.

amqtt 0.12 sends a QoS 1 message to a subscriber, waits 5 s for the PUBACK and then
drops it; when the subscriber's connection goes, the message is dropped at once. A
persistent-session subscriber that crashes before acknowledging (the hub acknowledges
only after COMMIT) therefore never gets those messages again, which breaks the hub's
at-least-once guarantee on the embedded defaults.

MQTT 3.1.1 [MQTT-4.4.0-1] says what a broker must do instead: keep an unacknowledged
QoS 1 message in the session and resend it, with DUP set, when a client with
``clean_session=False`` reconnects. amqtt already keeps ``session.inflight_out`` and
already resends it from ``ProtocolHandler.start()``; only its message flow throws the
message away. ``install()`` replaces two methods of amqtt's ``BrokerProtocolHandler``
(the broker side only; no client of ours uses amqtt's client) so that:

* an outgoing QoS 1 message leaves ``inflight_out`` only when its PUBACK arrives: no
  5-second drop while the subscriber is connected and busy;
* when the connection ends first, the message stays in the session, and the next
  connection of that session receives it again, in the original order, before anything
  queued while it was away;
* the resend on reconnect does not block the new connection (amqtt awaited every resend
  for up to 10 s inside ``start()`` and then dropped the rest).

Two more faults of amqtt 0.12's ``Broker`` are patched here, found when the demo ran
twenty edge daemons against it:

* on every (re)connection it sent the retained messages matching *every* client's topic
  filters to the new client (``for topic in self._subscriptions``), so an edge received
  other gateways' retained statuses on its commands subscription; now a connecting
  session gets the retained messages of its own filters only;
* it iterated its subscription table while awaiting (a connect, a broadcast) and deleted
  from it while iterating, so a client subscribing at the same moment crashed another
  client's connection with "dictionary changed size during iteration"; the table now
  iterates over a snapshot.

The patch is tied to amqtt 0.12 (pinned in pyproject.toml); ``install()`` refuses to
patch another version rather than guess. tests/integration/test_crash.py proves the
redelivery (the SIGKILL test runs on the embedded broker and fails without it);
tests/integration/test_embedded_services.py the other two.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from typing import Any

import structlog

log = structlog.get_logger(__name__)

SUPPORTED = "0.12."
_installed = False


def install() -> None:
    """Patch amqtt's broker handler once per process (idempotent)."""
    global _installed  # noqa: PLW0603 - a process-wide, one-time patch
    if _installed:
        return
    found = version("amqtt")
    if not found.startswith(SUPPORTED):
        raise RuntimeError(
            f"hub/embedded/amqtt_redelivery.py patches amqtt {SUPPORTED}x, found {found}:"
            " check the patched methods against the new release before changing the pin"
        )
    from amqtt.mqtt.constants import QOS_1
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import OUTGOING

    original_flow = BrokerProtocolHandler._handle_qos1_message_flow

    async def qos1_flow(self: Any, app_message: Any) -> None:
        if app_message.direction != OUTGOING or app_message.qos != QOS_1:
            await original_flow(self, app_message)
            return
        await _deliver_qos1(self, app_message)

    async def retry_deliveries(self: Any) -> None:
        # Resend in the session's order, without holding up the new connection.
        pending = [m for m in self.session.inflight_out.values() if m.direction == OUTGOING]
        if not pending:
            return
        log.info("embedded_broker_redelivering", client_id=self.session.client_id,
                 messages=len(pending))
        tasks: set[asyncio.Task[None]] = getattr(self, "_telecare_redeliveries", set())
        self._telecare_redeliveries = tasks
        for message in pending:
            task = asyncio.create_task(self._handle_message_flow(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    BrokerProtocolHandler._handle_qos1_message_flow = qos1_flow
    BrokerProtocolHandler._retry_deliveries = retry_deliveries
    _patch_subscription_table()
    _installed = True


class SnapshotDict(dict[str, Any]):
    """A dict whose iteration works on a copy: safe to change while a loop awaits."""

    def __iter__(self) -> Any:
        return iter(list(super().keys()))

    def items(self) -> Any:
        return list(super().items())

    def keys(self) -> Any:
        return list(super().keys())

    def values(self) -> Any:
        return list(super().values())


def _patch_subscription_table() -> None:
    from amqtt.broker import Broker

    original_init = Broker.__init__
    original_retained = Broker._publish_retained_messages_for_subscription

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._subscriptions = SnapshotDict(self._subscriptions)

    async def retained_for_own_filters(
        self: Any, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter = subscription[0]
        subscribers = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _qos in subscribers):
            return  # another client's filter: not for this session
        await original_retained(self, subscription, session)

    Broker.__init__ = init
    Broker._publish_retained_messages_for_subscription = retained_for_own_filters


async def _deliver_qos1(handler: Any, message: Any) -> None:
    """Send one QoS 1 message to a subscriber; forget it only on its PUBACK."""
    session = handler.session
    if session is None or handler.writer is None:
        return  # detached: the message stays wherever it is for the next connection
    packet_id = message.packet_id
    session.inflight_out.setdefault(packet_id, message)
    packet = message.build_publish_packet(dup=message.publish_packet is not None)
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    handler._puback_waiters[packet_id] = waiter  # before sending: a PUBACK may be quick
    try:
        await handler._send_packet(packet)
        message.publish_packet = packet
        message.puback_packet = await waiter
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the broker itself is stopping
        return  # the connection ended (its waiters were cancelled): keep it for the next
    except OSError:
        return  # the connection broke while sending: keep it for the next
    finally:
        if handler._puback_waiters.get(packet_id) is waiter:
            del handler._puback_waiters[packet_id]
    if session.inflight_out.get(packet_id) is message:
        del session.inflight_out[packet_id]
