"""Waiting for a condition of this process's own state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], *, wait_seconds: float = 5) -> None:
    """Until ``condition()`` holds, looking again each time the event loop comes
    round: for state this loop's own tasks change where the code under test
    offers no event to await (a request reaching a queue). However many turns
    it takes, the test goes on only once it holds, or fails at the timeout.
    State another process writes: support.service.poll_until."""
    async with asyncio.timeout(wait_seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)  # a turn of the loop, not a guess of time
