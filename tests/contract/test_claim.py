"""claim: which jobs a worker gets, and what a claim writes."""

from __future__ import annotations

import asyncio

from durably.job import Action, NewJob, Outcome, Status
from durably.store import Store
from durably.testing import FakeClock

from .conftest import WORKER, act, at, claim, claim_one, enqueue_one, finish, reach, same_time


async def test_claim_only_due_jobs(store: Store, clock: FakeClock) -> None:
    job = await enqueue_one(store, delay=60)
    assert await claim(store) == []
    clock.advance(59)
    assert await claim(store) == []
    clock.advance(1)
    [got] = await claim(store)
    assert got.id == job.id


async def test_claim_on_empty_store(store: Store) -> None:
    assert await claim(store) == []


async def test_claim_filters_by_queue(store: Store) -> None:
    a = await enqueue_one(store, queue="a")
    b = await enqueue_one(store, queue="b")
    await enqueue_one(store, queue="c")
    assert [j.id for j in await claim(store, ("a",))] == [a.id]
    assert [j.id for j in await claim(store, ("a",))] == []
    got = await claim(store, ("b", "zzz"))
    assert [j.id for j in got] == [b.id]


async def test_claim_from_several_queues(store: Store) -> None:
    a = await enqueue_one(store, queue="a")
    b = await enqueue_one(store, queue="b")
    got = await claim(store, ("a", "b"))
    assert {j.id for j in got} == {a.id, b.id}


async def test_claim_respects_limit(store: Store) -> None:
    await store.enqueue([NewJob(handler="h", payload={"i": i}) for i in range(5)])
    sizes = [len(await claim(store, limit=2)) for _ in range(4)]
    assert sizes == [2, 2, 1, 0]


async def test_claim_is_fifo_by_run_at_then_id(store: Store, clock: FakeClock) -> None:
    late = await enqueue_one(store, delay=10)
    first = await enqueue_one(store)
    second = await enqueue_one(store)
    clock.advance(5)
    third = await enqueue_one(store)  # run_at = t0+5, before `late` (t0+10)
    clock.advance(10)
    order = [(await claim_one(store)).id for _ in range(4)]
    assert order == [first.id, second.id, third.id, late.id]


async def test_due_retries_are_claimed_before_pending_jobs(store: Store, clock: FakeClock) -> None:
    # Work already started finishes first: a due retry jumps the backlog of fresh jobs, so retry
    # lateness does not grow with the queue's depth. Within each group: oldest run_at, then id.
    retry_b = await reach(store, Status.RUNNING)
    retry_a = await reach(store, Status.RUNNING)
    assert await finish(store, retry_b, Outcome.RETRY, retry_in=2)
    assert await finish(store, retry_a, Outcome.RETRY, retry_in=1)
    fresh = [await enqueue_one(store) for _ in range(3)]  # run_at t0: due before the retries
    future_retry = await reach(store, Status.RUNNING, queue="other")
    assert await finish(store, future_retry, Outcome.RETRY, retry_in=60)
    clock.advance(2)
    order = [j.id for j in await claim(store, ("default", "other"), limit=10)]
    assert order == [retry_a.id, retry_b.id, *(j.id for j in fresh)]


async def test_retry_first_respects_the_limit(store: Store, clock: FakeClock) -> None:
    running = await reach(store, Status.RUNNING)
    assert await finish(store, running, Outcome.RETRY, retry_in=1)
    fresh = [await enqueue_one(store) for _ in range(3)]
    clock.advance(1)
    assert [j.id for j in await claim(store, limit=2)] == [running.id, fresh[0].id]
    assert [j.id for j in await claim(store, limit=2)] == [fresh[1].id, fresh[2].id]


async def test_retries_not_yet_due_wait_behind_nothing(store: Store, clock: FakeClock) -> None:
    running = await reach(store, Status.RUNNING)
    assert await finish(store, running, Outcome.RETRY, retry_in=5)
    fresh = await enqueue_one(store)
    assert [j.id for j in await claim(store)] == [fresh.id]
    clock.advance(5)
    assert [j.id for j in await claim(store)] == [running.id]


async def test_claim_writes_lease_attempt_and_version(store: Store, clock: FakeClock) -> None:
    job = await enqueue_one(store)
    clock.advance(7)
    [got] = await claim(store, worker="w-ü", lease=45)
    assert got.id == job.id
    assert got.status == Status.RUNNING
    assert got.attempts == 1
    assert got.worker_id == "w-ü"
    assert isinstance(got.lease_token, str)
    assert len(got.lease_token) >= 16
    assert same_time(got.lease_expires_at, at(clock, 45))
    assert same_time(got.first_attempt_at, at(clock))
    assert same_time(got.updated_at, at(clock))
    assert got.version == job.version + 1
    assert got.run_at == job.run_at
    assert got.payload == job.payload
    assert await store.get(job.id) == got
    [attempt] = await store.attempts(job.id)
    assert attempt.job_id == job.id
    assert attempt.number == 1
    assert attempt.worker_id == "w-ü"
    assert same_time(attempt.started_at, at(clock))
    assert attempt.finished_at is None
    assert attempt.outcome is None


async def test_lease_tokens_are_unique(store: Store) -> None:
    await store.enqueue([NewJob(handler="h", payload={}) for _ in range(5)])
    got = await claim(store)
    assert len({j.lease_token for j in got}) == 5


async def test_claimed_jobs_are_not_claimed_again(store: Store) -> None:
    await store.enqueue([NewJob(handler="h", payload={}) for _ in range(3)])
    first = await claim(store, worker="w1")
    assert len(first) == 3
    assert await claim(store, worker="w2") == []


async def test_retrying_job_is_claimed_when_due(store: Store, clock: FakeClock) -> None:
    running = await reach(store, Status.RUNNING)
    first_start = running.first_attempt_at
    assert await finish(store, running, Outcome.RETRY, retry_in=30)
    assert await claim(store) == []
    clock.advance(30)
    again = await claim_one(store, worker="w2")
    assert again.id == running.id
    assert again.attempts == 2
    assert again.worker_id == "w2"
    assert again.first_attempt_at == first_start
    assert again.lease_token != running.lease_token
    attempts = await store.attempts(running.id)
    assert [a.number for a in attempts] == [1, 2]
    assert [a.worker_id for a in attempts] == [WORKER, "w2"]
    assert attempts[1].finished_at is None


async def test_attempt_numbers_never_restart_after_reset(store: Store, clock: FakeClock) -> None:
    dead = await reach(store, Status.DEAD_LETTER)
    requeued = await act(store, dead.id, Action.REQUEUE, reset_attempts=True)
    assert requeued.attempts == 0
    clock.advance(1)
    again = await claim_one(store)
    assert again.attempts == 1
    assert same_time(again.first_attempt_at, at(clock))
    assert [a.number for a in await store.attempts(dead.id)] == [1, 2]


async def test_claim_by_batch_ignoring_run_at(store: Store) -> None:
    b1 = await store.enqueue(
        [NewJob(handler="h", payload={}, batch_id="b1", item_index=i, delay=3600) for i in range(3)]
    )
    await store.enqueue([NewJob(handler="h", payload={}, batch_id="b2", delay=3600)])
    await enqueue_one(store)  # due, but not in the batch
    got = await claim(store, batch_id="b1", due_only=False)
    assert sorted(j.id for j in got) == sorted(r.job.id for r in b1)
    assert all(j.status == Status.RUNNING for j in got)
    assert await claim(store, batch_id="b1", due_only=False) == []


async def test_claim_by_batch_due_only(store: Store, clock: FakeClock) -> None:
    due = await enqueue_one(store, batch_id="b1")
    await enqueue_one(store, batch_id="b1", delay=60)
    await enqueue_one(store, batch_id="b2")
    got = await claim(store, batch_id="b1")
    assert [j.id for j in got] == [due.id]


async def test_claim_by_batch_takes_retries_first(store: Store, clock: FakeClock) -> None:
    first = await enqueue_one(store, batch_id="b1")
    retried = await claim_one(store)
    assert retried.id == first.id
    assert await finish(store, retried, Outcome.RETRY, retry_in=30)
    later = await store.enqueue(
        [NewJob(handler="h", payload={}, batch_id="b1", item_index=i) for i in range(2)]
    )
    got = await claim(store, batch_id="b1", due_only=False)
    assert [j.id for j in got] == [first.id, *(r.job.id for r in later)]


async def test_claim_never_takes_non_waiting_jobs(store: Store) -> None:
    for status in (Status.SUCCEEDED, Status.DEAD_LETTER, Status.CANCELLED):
        await reach(store, status)
    await reach(store, Status.RUNNING)
    assert await claim(store, due_only=True) == []


async def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    await store.enqueue([NewJob(handler="h", payload={"i": i}) for i in range(20)])
    batches = await asyncio.gather(*(claim(store, worker=f"w{n}", limit=3) for n in range(10)))
    ids = [j.id for batch in batches for j in batch]
    assert len(ids) == 20
    assert len(set(ids)) == 20
    for batch in batches:
        for job in batch:
            assert [a.number for a in await store.attempts(job.id)] == [1]
