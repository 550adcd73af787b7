"""The transactional outbox: events written with the state change, leased, acked, retried."""

from __future__ import annotations

from typing import Any

import pytest

from durably.events import batch_payload, event_type, processed_payload
from durably.job import Action, Completion, Event, Outcome, Status
from durably.store import Store
from durably.testing import FakeClock

from .conftest import act, claim, claim_one, enqueue_one, finish, reach

pytestmark = pytest.mark.asyncio

LEASE = 30.0


async def drain(store: Store, limit: int = 100) -> list[Event]:
    """Claim and ack everything due; return what was delivered, in order."""
    seen: list[Event] = []
    while True:
        events = await store.claim_events(limit, LEASE)
        if not events:
            return seen
        assert await store.ack_events(events) == len(events)
        seen.extend(events)


def comparable(payload: Any) -> dict[str, Any]:
    """A payload without its timestamp (stores render times with different precision)."""
    return {k: v for k, v in dict(payload).items() if k != "at"}


async def test_success_writes_one_processed_event_with_the_job_payload(store: Store) -> None:
    job = await enqueue_one(store, event_scope="orders", key="o-1", meta={"trace_id": "t-9"})
    running = await claim_one(store)
    assert await finish(store, running, Outcome.SUCCEEDED, result={"ok": [1, 2]})
    done = await store.get(job.id)
    [event] = await drain(store)
    assert event.type == event_type("orders") == "orders.processed"
    assert event.job_id == job.id
    assert comparable(event.payload) == comparable(processed_payload(done))
    assert event.payload["status"] == "succeeded"
    assert event.payload["result"] == {"ok": [1, 2]}
    assert event.payload["trace_id"] == "t-9"
    assert event.payload["key"] == "o-1"


async def test_jobs_without_scope_and_retries_emit_nothing(store: Store) -> None:
    await reach(store, Status.SUCCEEDED)
    job = await enqueue_one(store, event_scope="orders")
    running = await claim_one(store)
    assert await finish(store, running, Outcome.RETRY, retry_in=3600.0)
    assert (await store.get(job.id)).status is Status.RETRYING
    assert await store.claim_events(10, LEASE) == []


async def test_dead_letter_then_resolve_emit_two_events_in_order(store: Store) -> None:
    job = await reach(store, Status.DEAD_LETTER, event_scope="billing")
    await act(store, job.id, Action.RESOLVE, notes="refunded")
    events = await drain(store)
    assert [e.payload["status"] for e in events] == ["dead_letter", "resolved"]
    assert events[0].payload["error"]["classification"] == "permanent"
    assert events[1].payload["operator"] == "alice"


async def test_cancel_of_a_waiting_job_emits_cancelled(store: Store) -> None:
    job = await enqueue_one(store, event_scope="s")
    await act(store, job.id, Action.CANCEL)
    [event] = await drain(store)
    assert event.payload["status"] == "cancelled"


async def test_a_rejected_completion_emits_nothing(store: Store) -> None:
    await enqueue_one(store, event_scope="s")
    running = await claim_one(store)
    [applied] = await store.complete(
        [Completion(running.id, "0" * 32, running.attempts, Outcome.SUCCEEDED)]
    )
    assert not applied
    assert await store.claim_events(10, LEASE) == []


async def test_a_later_event_waits_behind_an_undelivered_earlier_one(
    store: Store, clock: FakeClock
) -> None:
    job = await reach(store, Status.DEAD_LETTER, event_scope="s")
    await act(store, job.id, Action.RESOLVE)
    [first] = await store.claim_events(10, LEASE)
    assert first.payload["status"] == "dead_letter"
    assert await store.claim_events(10, LEASE) == []  # the second must not overtake
    assert await store.retry_event(first, 5.0, "sink down")
    assert await store.claim_events(10, LEASE) == []  # still waiting for the first
    clock.advance(6)
    [again] = await store.claim_events(10, LEASE)
    assert again.id == first.id
    assert again.attempts == 2
    assert await store.ack_events([again]) == 1
    [second] = await store.claim_events(10, LEASE)
    assert second.payload["status"] == "resolved"


async def test_leased_events_are_not_claimed_twice_until_the_lease_expires(
    store: Store, clock: FakeClock
) -> None:
    await reach(store, Status.SUCCEEDED, event_scope="s")
    [event] = await store.claim_events(10, LEASE)
    assert await store.claim_events(10, LEASE) == []
    clock.advance(LEASE + 1)
    [again] = await store.claim_events(10, LEASE)
    assert again.id == event.id
    assert again.lease_token != event.lease_token
    # The first publisher's late ack is fenced out; the second's goes through.
    assert await store.ack_events([event]) == 0
    assert not await store.retry_event(event, 1.0, "late")
    assert await store.ack_events([again]) == 1
    assert await store.claim_events(10, LEASE) == []


async def test_events_are_claimed_oldest_first_across_jobs(store: Store) -> None:
    ids = []
    for n in range(3):
        job = await enqueue_one(store, event_scope="s", payload={"n": n})
        ids.append(job.id)
    for running in await claim(store, limit=3):
        assert await finish(store, running, Outcome.SUCCEEDED)
    events = await drain(store, limit=2)
    assert sorted(e.job_id for e in events if e.job_id is not None) == sorted(ids)
    assert [e.id for e in events] == sorted(e.id for e in events)


async def test_a_batch_emits_one_completion_event_when_its_last_item_ends(store: Store) -> None:
    for index in range(2):
        await enqueue_one(
            store, event_scope="comp", batch_id="b-1", item_index=index, payload={"i": index}
        )
    first, second = await claim(store, limit=2)
    assert await finish(store, first, Outcome.SUCCEEDED)
    assert [e.type for e in await drain(store)] == ["comp.processed"]
    assert await finish(store, second, Outcome.DEAD_LETTER)
    events = await drain(store)
    assert [e.type for e in events] == ["comp.processed", "comp.batch_completed"]
    batch = events[1]
    assert comparable(batch.payload) == comparable(
        batch_payload("b-1", {"succeeded": 1, "dead_letter": 1}, second.updated_at)
    )
    # Resolving a dead-lettered item later does not complete the batch a second time.
    await act(store, second.id, Action.RESOLVE)
    assert [e.type for e in await drain(store)] == ["comp.processed"]
