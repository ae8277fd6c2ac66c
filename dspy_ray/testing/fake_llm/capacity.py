"""The fake endpoint's capacity: at most ``limit`` requests worked on at once, the rest waiting in FIFO order.

Pure asyncio (no aiohttp), so it is testable on its own::

    >>> async def two_at_once():
    ...     capacity = Capacity(1)
    ...     async with capacity.slot():
    ...         return capacity.in_flight, capacity.full(reject_over=0), capacity.peak
    >>> asyncio.run(two_at_once())
    (1, True, 1)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Capacity:
    """Slots for ``limit`` requests (``None`` = unlimited) and the gauges the stats report."""

    def __init__(self, limit: int | None) -> None:
        self.slots = self._make_slots(limit)
        self.in_flight = 0  # requests holding a slot now
        self.queued = 0  # requests waiting for one
        self.peak = 0  # most in flight at once since the last reset_peak()

    @staticmethod
    def _make_slots(limit: int | None) -> asyncio.Semaphore | None:
        return asyncio.Semaphore(limit) if limit else None

    def resize(self, limit: int | None) -> None:
        """A new number of slots from now on; requests holding an old slot release that one."""
        self.slots = self._make_slots(limit)

    def reset_peak(self) -> None:
        """Start a new peak from what is in flight now (the live gauge is not reset)."""
        self.peak = self.in_flight

    def full(self, reject_over: int | None) -> bool:
        """Every slot busy and ``reject_over`` requests already waiting (never with ``reject_over=None``)."""
        return (reject_over is not None and self.slots is not None and self.slots.locked()
                and self.queued >= reject_over)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one processing slot (FIFO queue while none is free)."""
        slots = self.slots  # a capacity change swaps the semaphore; release the one acquired
        if slots is not None:
            self.queued += 1
            try:
                await slots.acquire()
            finally:
                self.queued -= 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            if slots is not None:
                slots.release()
