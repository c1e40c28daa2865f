"""A retention run that fails (the database down or locked at that moment) is tried again soon,
not a whole interval (an hour by default) later; a purge refused because rows do not verify
waits for the interval."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import gateway.plugins.audit as audit_plugin
import gateway.plugins.conversations.state as conversation_state
from gateway.plugins.audit.store import PurgeRefused
from gateway.plugins.conversations.store import ConversationStore

from .test_audit import wait_for
from .test_audit_chain_key import audit
from .test_conversations import start


def failing_once(error: Exception, calls: list[float], result: Any) -> Any:
    """A purge that fails the first time it runs (``error``), then works."""
    async def purge(*args: Any, **kw: Any) -> Any:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise error
        return result
    return purge


async def test_a_failed_conversation_retention_run_is_tried_again_soon(make_gateway: Any, tmp_path: Any,
                                                                       monkeypatch: Any) -> None:
    calls: list[float] = []
    monkeypatch.setattr(conversation_state, "PURGE_RETRY", 0.3)
    monkeypatch.setattr(ConversationStore, "purge", failing_once(OSError("database is locked"), calls, []))
    await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"},
                {"retention_days": 30, "retention_interval": 3600})
    await wait_for(lambda: len(calls) >= 2, timeout=15, what="the run after the failed one")  # not an hour later
    assert calls[1] - calls[0] >= 0.25


async def test_a_failed_audit_purge_is_tried_again_soon(make_gateway: Any, monkeypatch: Any) -> None:
    calls: list[float] = []
    monkeypatch.setattr(audit_plugin, "FIRST_PURGE_DELAY", 0.2)
    monkeypatch.setattr(audit_plugin, "PURGE_RETRY", 0.3)
    monkeypatch.setattr(audit_plugin.Audit, "purge_once", failing_once(OSError("database is locked"), calls, {}))
    await make_gateway(audit(retention_days=30, purge_interval=3600))
    await wait_for(lambda: len(calls) >= 2, timeout=10, what="the purge after the failed one")
    assert calls[1] - calls[0] >= 0.25


async def test_a_refused_audit_purge_waits_for_the_interval(make_gateway: Any, monkeypatch: Any) -> None:
    calls: list[float] = []
    monkeypatch.setattr(audit_plugin, "FIRST_PURGE_DELAY", 0.2)
    monkeypatch.setattr(audit_plugin, "PURGE_RETRY", 0.1)
    monkeypatch.setattr(audit_plugin.Audit, "purge_once",
                        failing_once(PurgeRefused("rows that do not verify"), calls, {}))
    await make_gateway(audit(retention_days=30, purge_interval=3600))
    await wait_for(lambda: len(calls) >= 1, timeout=10, what="the first purge")
    await asyncio.sleep(1.0)
    assert len(calls) == 1  # (tampered rows stay refused: not retried every PURGE_RETRY)
