"""enqueue and upsert: what a producer gets back, and how idempotency keys behave."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from durably.errors import ConfigError
from durably.job import LIVE, JobFilter, NewJob, Outcome, Status
from durably.store import Store
from durably.testing import FakeClock

from .conftest import at, claim_one, enqueue_one, finish, reach, same_time

NESTED = {
    "name": "Zoë Ångström ✓ 日本語 🚀",
    "list": [1, 2.5, None, True, False, "x", {"deep": [[], {}]}],
    "empty": {},
    "big": 2**53,
    "quote": 'he said "hi"\n\t\\',
}


@pytest.mark.parametrize(
    "payload",
    [NESTED, [1, "two", {"3": None}], "just a string", 42, 1.5, True, None, "", []],
    ids=["nested", "list", "str", "int", "float", "bool", "null", "empty-str", "empty-list"],
)
async def test_enqueue_round_trips_payload(store: Store, payload: Any) -> None:
    [res] = await store.enqueue([NewJob(handler="h", payload=payload)])
    assert res.created
    assert res.job.payload == payload
    assert (await store.get(res.job.id)).payload == payload


async def test_enqueue_returns_a_fresh_pending_job(store: Store, clock: FakeClock) -> None:
    new = NewJob(
        handler="send_email",
        payload=NESTED,
        queue="mail",
        key="order-7",
        max_attempts=5,
        policy={"base": 1.5, "cap": 60, "retry_on": ["transient", "timeout"], "ü": {"x": None}},
        timeout=12.5,
        batch_id="batch-1",
        item_index=3,
        event_scope="tenant-ä",
        meta={"request_id": "r-1", "trace": {"id": "ça", "sampled": True}},
    )
    [res] = await store.enqueue([new])
    job = res.job
    assert res.created
    assert isinstance(job.id, int)
    assert job.status == Status.PENDING
    assert isinstance(job.status, Status)
    assert job.attempts == 0
    assert job.version == 1
    assert (job.queue, job.handler, job.key) == ("mail", "send_email", "order-7")
    assert job.payload == NESTED
    assert dict(job.policy) == dict(new.policy)
    assert dict(job.meta) == dict(new.meta)
    assert (job.max_attempts, job.timeout) == (5, 12.5)
    assert (job.batch_id, job.item_index, job.event_scope) == ("batch-1", 3, "tenant-ä")
    assert same_time(job.run_at, at(clock))
    assert same_time(job.created_at, at(clock))
    assert same_time(job.updated_at, at(clock))
    assert job.lease_token is None
    assert job.worker_id is None
    assert job.lease_expires_at is None
    assert not job.cancel_requested
    assert job.first_attempt_at is None
    assert job.finished_at is None
    assert job.result is None
    assert job.last_error is None
    assert job.classification is None
    assert await store.get(job.id) == job


async def test_enqueue_defaults_round_trip(store: Store) -> None:
    job = await enqueue_one(store)
    assert job.queue == "default"
    assert job.key is None
    assert job.max_attempts is None
    assert job.timeout is None
    assert job.batch_id is None
    assert job.item_index is None
    assert job.event_scope is None
    assert dict(job.policy) == {}
    assert dict(job.meta) == {}


async def test_delay_puts_run_at_in_the_future_on_the_store_clock(
    store: Store, clock: FakeClock
) -> None:
    clock.advance(1000)
    job = await enqueue_one(store, delay=30)
    assert same_time(job.run_at, at(clock, 30))
    assert same_time(job.created_at, at(clock))


async def test_batch_enqueue_preserves_order(store: Store) -> None:
    results = await store.enqueue([NewJob(handler="h", payload={"i": i}) for i in range(10)])
    assert [r.job.payload for r in results] == [{"i": i} for i in range(10)]
    assert all(r.created for r in results)
    ids = [r.job.id for r in results]
    assert ids == sorted(ids)
    assert len(set(ids)) == 10


async def test_enqueue_empty_batch(store: Store) -> None:
    assert await store.enqueue([]) == []


async def test_key_with_live_job_returns_it_across_calls(store: Store) -> None:
    first = await enqueue_one(store, key="k", payload={"v": 1})
    [again] = await store.enqueue([NewJob(handler="h", payload={"v": 2}, key="k")])
    assert not again.created
    assert again.job == first
    assert (await store.get(first.id)).payload == {"v": 1}


async def test_key_with_live_job_within_one_batch(store: Store) -> None:
    results = await store.enqueue(
        [
            NewJob(handler="h", payload={"v": 1}, key="k"),
            NewJob(handler="h", payload={"other": True}),
            NewJob(handler="h", payload={"v": 2}, key="k"),
        ]
    )
    assert [r.created for r in results] == [True, True, False]
    assert results[2].job.id == results[0].job.id
    assert results[2].job.payload == {"v": 1}
    assert results[1].job.id != results[0].job.id


@pytest.mark.parametrize("status", [Status.RUNNING, Status.RETRYING])
async def test_key_is_held_while_running_or_retrying(store: Store, status: Status) -> None:
    held = await reach(store, status, key="k")
    [again] = await store.enqueue([NewJob(handler="h", payload={}, key="k")])
    assert not again.created
    assert again.job.id == held.id
    assert await store.get(held.id) == held


@pytest.mark.parametrize(
    "status", [Status.SUCCEEDED, Status.CANCELLED, Status.DEAD_LETTER, Status.RESOLVED]
)
async def test_key_is_free_once_job_is_not_live(store: Store, status: Status) -> None:
    assert status not in LIVE
    old = await reach(store, status, key="k")
    [res] = await store.enqueue([NewJob(handler="h", payload={"v": 2}, key="k")])
    assert res.created
    assert res.job.id != old.id
    assert res.job.payload == {"v": 2}
    assert (await store.get(old.id)).status == status


async def test_upsert_creates_when_key_is_free(store: Store) -> None:
    res = await store.upsert(NewJob(handler="h", payload={"v": 1}, key="k"))
    assert res.created
    assert res.job.status == Status.PENDING
    assert res.job.version == 1
    assert await store.get(res.job.id) == res.job


async def test_upsert_replaces_pending_job(store: Store, clock: FakeClock) -> None:
    first = await enqueue_one(store, key="k", payload={"v": 1}, meta={"m": 1}, policy={"p": 1})
    clock.advance(5)
    res = await store.upsert(
        NewJob(handler="h", payload={"v": "二"}, key="k", meta={"m": 2}, policy={"p": 2})
    )
    assert not res.created
    job = res.job
    assert job.id == first.id
    assert job.payload == {"v": "二"}
    assert dict(job.meta) == {"m": 2}
    assert dict(job.policy) == {"p": 2}
    assert job.status == Status.PENDING
    assert job.version == first.version + 1
    assert same_time(job.updated_at, at(clock))
    assert await store.get(first.id) == job
    assert len(await store.list_jobs(JobFilter())) == 1


async def test_upsert_does_not_replace_running_job(store: Store, clock: FakeClock) -> None:
    running = await reach(store, Status.RUNNING, key="k", payload={"v": 1})
    clock.advance(5)
    res = await store.upsert(NewJob(handler="h", payload={"v": 2}, key="k"))
    assert not res.created
    assert res.job.id == running.id
    assert res.job.payload == {"v": 1}
    assert await store.get(running.id) == running


async def test_upsert_creates_new_job_when_old_one_is_terminal(store: Store) -> None:
    old = await reach(store, Status.SUCCEEDED, key="k")
    res = await store.upsert(NewJob(handler="h", payload={"v": 2}, key="k"))
    assert res.created
    assert res.job.id != old.id


async def test_upsert_requires_a_key(store: Store) -> None:
    with pytest.raises(ConfigError):
        await store.upsert(NewJob(handler="h", payload={}))
    assert await store.list_jobs(JobFilter()) == []


async def test_get_by_key_finds_a_finished_job(store: Store) -> None:
    job = await enqueue_one(store, key="k")
    running = await claim_one(store)
    assert await finish(store, running, Outcome.SUCCEEDED)
    assert (await store.get_by_key("k")) == await store.get(job.id)


async def test_concurrent_enqueues_with_one_key_create_one_job(store: Store) -> None:
    results = await asyncio.gather(
        *(store.enqueue([NewJob(handler="h", payload={"n": n}, key="race")]) for n in range(8))
    )
    flat = [r for batch in results for r in batch]
    assert sum(r.created for r in flat) == 1
    assert len({r.job.id for r in flat}) == 1
    assert len(await store.list_jobs(JobFilter(key="race"))) == 1


async def test_upsert_replaces_retrying_job_keeping_its_history(store: Store) -> None:
    retrying = await reach(store, Status.RETRYING, key="k", payload={"v": 1})
    res = await store.upsert(NewJob(handler="h", payload={"v": 2}, key="k"))
    assert not res.created
    job = res.job
    assert job.id == retrying.id
    assert job.payload == {"v": 2}
    assert job.status == Status.RETRYING
    assert job.attempts == retrying.attempts
    assert job.run_at == retrying.run_at
    assert job.version == retrying.version + 1
    assert len(await store.attempts(job.id)) == 1
