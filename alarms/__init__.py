"""Alarm rules, the alarm state machine and escalation (pure logic, no IO)."""
