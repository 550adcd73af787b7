"""expired, next_due_in and wait: the time-driven reads."""

from __future__ import annotations

import asyncio

import pytest

from durably.job import Completion, Outcome, Status
from durably.store import Store
from durably.testing import FakeClock

from .conftest import LEASE, at, claim, claim_one, enqueue_one, finish, reach, same_time


async def test_expired_lists_only_passed_leases(store: Store, clock: FakeClock) -> None:
    short = await enqueue_one(store)
    await claim_one(store, lease=10)
    await enqueue_one(store)
    await claim_one(store, lease=100)
    await reach(store, Status.PENDING, queue="other")
    await reach(store, Status.RETRYING, queue="other2")
    assert await store.expired(10) == []
    clock.advance(10.5)
    got = await store.expired(10)
    assert [j.id for j in got] == [short.id]
    assert got[0].status == Status.RUNNING
    assert got[0] == await store.get(short.id)


async def test_expired_oldest_expiry_first_and_limit(store: Store, clock: FakeClock) -> None:
    a = await enqueue_one(store)
    await claim_one(store, lease=20)
    b = await enqueue_one(store)
    await claim_one(store, lease=10)
    c = await enqueue_one(store)
    await claim_one(store, lease=15)
    clock.advance(30)
    assert [j.id for j in await store.expired(10)] == [b.id, c.id, a.id]
    assert [j.id for j in await store.expired(2)] == [b.id, c.id]


async def test_expired_excludes_finished(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    assert await finish(store, job, Outcome.SUCCEEDED)
    clock.advance(1000)
    assert await store.expired(10) == []


async def test_next_due_in_empty(store: Store) -> None:
    assert await store.next_due_in(["default"]) is None


async def test_next_due_in_due_now(store: Store) -> None:
    await enqueue_one(store, delay=50)
    await enqueue_one(store)
    assert await store.next_due_in(["default"]) == pytest.approx(0, abs=0.01)


async def test_next_due_in_overdue_is_zero(store: Store, clock: FakeClock) -> None:
    await enqueue_one(store, delay=5)
    clock.advance(60)
    assert await store.next_due_in(["default"]) == pytest.approx(0, abs=0.01)


async def test_next_due_in_counts_down(store: Store, clock: FakeClock) -> None:
    await enqueue_one(store, delay=30)
    await enqueue_one(store, delay=90)
    assert await store.next_due_in(["default"]) == pytest.approx(30, abs=0.01)
    clock.advance(12)
    assert await store.next_due_in(["default"]) == pytest.approx(18, abs=0.01)


async def test_next_due_in_filters_queue(store: Store) -> None:
    await enqueue_one(store, queue="other")
    assert await store.next_due_in(["default"]) is None
    await enqueue_one(store, queue="q2", delay=7)
    assert await store.next_due_in(["default", "q2"]) == pytest.approx(7, abs=0.01)


async def test_next_due_in_sees_retries_not_running_jobs(store: Store) -> None:
    job = await reach(store, Status.RUNNING)
    assert await store.next_due_in(["default"]) is None
    assert await finish(store, job, Outcome.RETRY, retry_in=15)
    assert await store.next_due_in(["default"]) == pytest.approx(15, abs=0.01)
    await reach(store, Status.SUCCEEDED, queue="default2")
    assert await store.next_due_in(["default2"]) is None


async def test_wait_times_out(store: Store) -> None:
    assert await store.wait(["default"], 0.05) is False


async def test_wait_wakes_on_enqueue(store: Store) -> None:
    waiter = asyncio.ensure_future(store.wait(["default"], 10.0))

    async def produce() -> None:
        # Keep producing until the waiter wakes: a notify sent before it was listening may be
        # lost (allowed), so one enqueue alone could race the subscription.
        for _ in range(100):
            await enqueue_one(store)
            done, _ = await asyncio.wait({waiter}, timeout=0.05)
            if done:
                return

    woke, _ = await asyncio.gather(waiter, produce())
    assert woke is True
    assert len(await claim(store, limit=1000)) >= 1


async def test_now_is_the_store_clock(store: Store, clock: FakeClock) -> None:
    assert same_time(await store.now(), clock.now())
    clock.advance(3600.5)
    assert same_time(await store.now(), clock.now())


async def test_rescuer_can_dead_letter_an_expired_lease(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING, max_attempts=1)
    clock.advance(LEASE + 1)
    [stale] = await store.expired(10)
    applied = await store.complete(
        [
            Completion(
                job_id=stale.id,
                lease_token=stale.lease_token or "",
                attempt=stale.attempts,
                outcome=Outcome.DEAD_LETTER,
                classification="lease_expired",
                attempt_outcome="lease_expired",
                require_expired=True,
            )
        ]
    )
    assert applied == [True]
    dead = await store.get(job.id)
    assert dead.status == Status.DEAD_LETTER
    assert dead.classification == "lease_expired"
    assert same_time(dead.finished_at, at(clock))
    assert await store.expired(10) == []
    [attempt] = await store.attempts(job.id)
    assert attempt.outcome == "lease_expired"
