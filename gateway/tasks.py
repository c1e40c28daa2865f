"""Background task helpers shared by the core and the plugins."""
from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: "asyncio.Task[Any] | None") -> None:
    """Cancel a background task and wait until it has ended; its cancellation or failure is not
    raised here (a task that fails logs for itself)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
