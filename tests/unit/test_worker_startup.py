"""A worker whose store is unreachable at start-up backs off and keeps trying; it never exits."""

from __future__ import annotations

import asyncio
from pathlib import Path

from durably import Durably, Status, StoreUnavailable
from durably.store import Store
from durably.store.sqlite import SQLiteStore


class FlakyOpen(SQLiteStore):
    """Refuses the first ``failures`` opens, like a database that is restarting."""

    opens = 0

    def __init__(self, path: str, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    async def open(self) -> None:
        type(self).opens += 1
        if type(self).opens <= self.failures:
            raise StoreUnavailable("the server closed the connection unexpectedly")
        await super().open()


async def test_worker_retries_opening_an_unreachable_store(tmp_path: Path) -> None:
    db = str(tmp_path / "w.db")
    producer = Durably(f"sqlite:///{db}", strict=False)
    job = await producer.enqueue_async("op", {"n": 1})
    await producer.close_async()

    FlakyOpen.opens = 0

    def factory() -> Store:
        return FlakyOpen(db, failures=2)

    app = Durably(store=factory)
    app.register("op", lambda payload: payload["n"])
    worker = app.worker(burst=True, poll_interval=0.05, rand=lambda: 0.0)
    await worker.run()
    assert FlakyOpen.opens == 3
    done = await app.get_async(job.id)
    assert (done.status, done.result) == (Status.SUCCEEDED, 1)
    await app.close_async()


async def test_a_stop_while_the_store_is_down_ends_the_worker_cleanly(tmp_path: Path) -> None:
    FlakyOpen.opens = 0

    def factory() -> Store:
        return FlakyOpen(str(tmp_path / "w.db"), failures=10**6)

    app = Durably(store=factory)
    app.register("op", lambda payload: payload)
    worker = app.worker(poll_interval=0.05, rand=lambda: 0.0)
    running = asyncio.create_task(worker.run())
    while FlakyOpen.opens < 2:  # bounded by the test timeout; each try is a real open call
        await asyncio.sleep(0)
    worker.stop()
    await asyncio.wait_for(running, timeout=10)
    assert worker.stats["claimed"] == 0
