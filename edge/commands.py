"""The hub's commands on the edge: deciding, executing, and answering them.

``decide_command`` validates one message from the commands topic and checks its expiry
(pure: the time is passed in). ``CommandWorker`` takes received messages, drops
duplicates, and executes commands one at a time, outside any MQTT session, so a lost
connection never cancels a command. Every answer goes to the ``ResultsOutbox``, which
keeps results until the uplink has published them (at most ``RESULTS_KEPT``: beyond
that the oldest is dropped).

Both count into the uplink's ``counters`` dict, which they share with it.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import UUID7, TypeAdapter, ValidationError
from structlog.typing import FilteringBoundLogger

from devices.events import describe_validation_error
from devices.gateway import CommandResult, GatewayCommand

RESULTS_KEPT = 1_000
"""Command results waiting for a connection; beyond this the oldest is dropped."""
COMMANDS_WAITING = 64
SEEN_COMMANDS = 1_024

_UUID7: TypeAdapter[Any] = TypeAdapter(UUID7)


@dataclass(frozen=True, slots=True)
class CommandDecision:
    """What to do with one message on the commands topic."""

    command: GatewayCommand | None = None
    """Set if the command is to be executed."""
    result: CommandResult | None = None
    """Set if the edge answers at once (invalid or expired)."""
    reason: Literal["invalid", "expired"] | None = None
    error: str | None = None


def decide_command(raw: bytes, *, now: datetime) -> CommandDecision:
    """Validate a command and check its expiry. Pure: ``now`` is the gateway's clock."""
    try:
        command = GatewayCommand.model_validate_json(raw)
    except ValidationError as exc:
        error = describe_validation_error(exc)[:500]
        command_id = _readable_command_id(raw)
        result = None
        if command_id is not None:
            result = CommandResult(command_id=command_id, ok=False, error=error, time=now)
        return CommandDecision(result=result, reason="invalid", error=error)
    if command.expires_at <= now:
        result = CommandResult(command_id=command.command_id, ok=False, error="expired", time=now)
        return CommandDecision(result=result, reason="expired", error="expired")
    return CommandDecision(command=command)


def _readable_command_id(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
        return _UUID7.validate_python(data.get("command_id")) if isinstance(data, dict) else None
    except (ValueError, RecursionError):  # ValidationError is a ValueError
        return None


class ResultsOutbox:
    """Command results waiting to be published, oldest first, one per command id."""

    def __init__(
        self, *, counters: dict[str, int], log: FilteringBoundLogger, limit: int = RESULTS_KEPT
    ) -> None:
        self._counters = counters
        self._log = log
        self._limit = limit
        self._results: OrderedDict[Any, CommandResult] = OrderedDict()
        self._ready = asyncio.Event()

    def add(self, result: CommandResult) -> None:
        """Keep ``result`` for publishing (replacing an older one for the same command)."""
        self._results[result.command_id] = result
        if len(self._results) > self._limit:
            dropped, _ = self._results.popitem(last=False)
            self._counters["results_dropped"] += 1
            self._log.warning("command_result_dropped", command_id=str(dropped))
        self._ready.set()

    def pending(self) -> list[tuple[Any, CommandResult]]:
        """The results kept now, oldest first; ``wait`` then waits for newer ones."""
        self._ready.clear()
        return list(self._results.items())

    def sent(self, command_id: Any, result: CommandResult) -> None:
        """Forget a published result, unless a newer one for its command replaced it."""
        if self._results.get(command_id) is result:
            del self._results[command_id]

    async def wait(self) -> None:
        """Return at once if results are kept, else when one is added."""
        if not self._results:
            await self._ready.wait()


class CommandWorker:
    """Takes messages from the commands topic and executes them one at a time."""

    def __init__(
        self,
        *,
        on_command: Callable[[GatewayCommand], Awaitable[CommandResult]],
        outbox: ResultsOutbox,
        counters: dict[str, int],
        log: FilteringBoundLogger,
        waiting: int = COMMANDS_WAITING,
        remembered: int = SEEN_COMMANDS,
    ) -> None:
        self._on_command = on_command
        self._outbox = outbox
        self._counters = counters
        self._log = log
        self._remembered = remembered
        self._seen: OrderedDict[Any, None] = OrderedDict()
        self._queue: asyncio.Queue[GatewayCommand] = asyncio.Queue(waiting)

    def received(self, raw: bytes) -> None:
        """Decide one message: answer it at once, drop it as a duplicate, or queue it."""
        self._counters["commands_received"] += 1
        decision = decide_command(raw, now=datetime.now(UTC))
        if decision.reason is not None:
            key = "invalid_commands" if decision.reason == "invalid" else "commands_expired"
            self._counters[key] += 1
            command_id = decision.result.command_id if decision.result else None
            self._log.warning(
                f"command_{decision.reason}", command_id=str(command_id), error=decision.error
            )
        if decision.result is not None:
            self._outbox.add(decision.result)
        command = decision.command
        if command is None:
            return
        if command.command_id in self._seen:
            self._counters["duplicate_commands"] += 1
            return
        self._seen[command.command_id] = None
        if len(self._seen) > self._remembered:
            self._seen.popitem(last=False)
        try:
            self._queue.put_nowait(command)
        except asyncio.QueueFull:
            self._counters["commands_busy"] += 1
            self._refuse(command, "busy")

    async def run(self) -> None:
        """One at a time, outside any session: a lost connection never cancels a command."""
        while True:
            command = await self._queue.get()
            if command.expires_at <= datetime.now(UTC):  # it waited behind others
                self._counters["commands_expired"] += 1
                self._refuse(command, "expired")
                continue
            log = self._log.bind(command_id=str(command.command_id), kind=command.kind)
            try:
                result = await self._on_command(command)
            except Exception as exc:  # a failing handler is answered, not fatal
                self._counters["commands_failed"] += 1
                log.error("command_failed", error_type=type(exc).__name__, exc_info=exc)
                self._refuse(command, f"{type(exc).__name__}: {exc}")
            else:
                self._counters["commands_executed"] += 1
                log.info("command_executed", ok=result.ok)
                self._outbox.add(result)

    def _refuse(self, command: GatewayCommand, error: str) -> None:
        self._outbox.add(
            CommandResult(
                command_id=command.command_id, ok=False, error=error[:500], time=datetime.now(UTC)
            )
        )
