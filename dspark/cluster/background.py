"""A private asyncio loop on a daemon thread, for periodic Redis work in sync-driven processes.

Serve replicas and the engine thread are not the place for Redis round trips; heartbeats,
discovery and demand reports run here and hand results over through plain attributes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


class BackgroundLoop:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._tasks: list[asyncio.Future] = []

    def every(self, seconds: float, fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``fn`` now and then every ``seconds``; failures are logged, never fatal."""

        async def loop() -> None:
            while True:
                try:
                    await fn()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("%s failed: %s", name, exc)
                await asyncio.sleep(seconds)

        self._tasks.append(asyncio.run_coroutine_threadsafe(loop(), self.loop))

    def run(self, coro: Awaitable, timeout: float = 10.0):
        """Run a coroutine on this loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
