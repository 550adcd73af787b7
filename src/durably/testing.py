"""Test doubles for code that uses durably (and for durably's own tests).

>>> clock = FakeClock()
>>> store = durably.store.from_url("sqlite:///:memory:", clock=clock.now)  # doctest: +SKIP
>>> clock.advance(30)  # leases and retries see 30 seconds pass, nobody waits
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]


class FakeClock:
    """A wall clock that only moves when told to. ``sleep`` advances it instead of waiting.

    ``now()`` is timezone-aware UTC; pass ``clock.now`` wherever durably takes a clock and
    ``clock.sleep`` (or ``clock.async_sleep``) wherever it takes a sleep function.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        """The current fake time."""
        return self._now

    def monotonic(self) -> float:
        """Seconds since the epoch of the fake time, as a monotonic source."""
        return self._now.timestamp()

    def advance(self, seconds: float) -> datetime:
        """Move time forward by ``seconds`` and return the new now."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._now += timedelta(seconds=seconds)
        return self._now

    def sleep(self, seconds: float) -> None:
        """Record the sleep and advance the clock by it, at once."""
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))

    async def async_sleep(self, seconds: float) -> None:
        """Like :meth:`sleep`, but yields to the event loop once, as a real sleep would."""
        self.sleep(seconds)
        await asyncio.sleep(0)
