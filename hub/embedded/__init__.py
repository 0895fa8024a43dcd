"""Embedded services: a private PostgreSQL and an in-process MQTT broker.

Used by ``HubRuntime`` when no external database or broker is configured, by the demo,
and by integration tests. Nothing here runs at import time.
"""

from hub.embedded._common import free_port
from hub.embedded.broker import EmbeddedBroker, EmbeddedBrokerThread, OpenAuthPlugin
from hub.embedded.postgres import EmbeddedPostgres

__all__ = [
    "EmbeddedBroker",
    "EmbeddedBrokerThread",
    "EmbeddedPostgres",
    "OpenAuthPlugin",
    "free_port",
]
