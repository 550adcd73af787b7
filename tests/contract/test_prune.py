"""prune: retention of finished jobs."""

from __future__ import annotations

from durably.errors import JobNotFound
from durably.job import Action, Status
from durably.store import Store
from durably.testing import FakeClock

from .conftest import act, reach


async def _gone(store: Store, job_id: int) -> bool:
    try:
        await store.get(job_id)
    except JobNotFound:
        pass
    else:
        return False
    try:
        attempts = await store.attempts(job_id)
        audit = await store.audit(job_id)
    except JobNotFound:
        return True
    return attempts == [] and audit == []


async def test_prune_removes_old_finished_jobs(store: Store, clock: FakeClock) -> None:
    old_done = await reach(store, Status.SUCCEEDED, queue="q1")
    old_dead = await reach(store, Status.DEAD_LETTER, queue="q2")
    old_resolved = await reach(store, Status.RESOLVED, queue="q3")
    pending = await reach(store, Status.PENDING, queue="q4")
    retrying = await reach(store, Status.RETRYING, queue="q5")
    clock.advance(100)
    new_done = await reach(store, Status.SUCCEEDED, queue="q6")
    clock.advance(10)

    removed = await store.prune(50, frozenset({Status.SUCCEEDED, Status.RESOLVED}))
    assert removed == 2
    assert await _gone(store, old_done.id)
    assert await _gone(store, old_resolved.id)
    for kept in (old_dead, pending, retrying, new_done):
        assert await store.get(kept.id) == kept
    assert len(await store.attempts(new_done.id)) == 1

    assert await store.prune(50, frozenset({Status.DEAD_LETTER})) == 1
    assert await _gone(store, old_dead.id)
    assert await store.prune(50, frozenset({Status.SUCCEEDED, Status.DEAD_LETTER})) == 0


async def test_prune_uses_finished_at_not_created_at(store: Store, clock: FakeClock) -> None:
    dead = await reach(store, Status.DEAD_LETTER)
    clock.advance(100)
    await act(store, dead.id, Action.ABANDON)  # finished now, though created long ago
    clock.advance(10)
    assert await store.prune(50, frozenset({Status.ABANDONED})) == 0
    clock.advance(50)
    assert await store.prune(50, frozenset({Status.ABANDONED})) == 1
    assert await _gone(store, dead.id)


async def test_prune_never_removes_live_jobs(store: Store, clock: FakeClock) -> None:
    jobs = [
        await reach(store, Status.PENDING, queue="a"),
        await reach(store, Status.RUNNING, queue="b"),
        await reach(store, Status.RETRYING, queue="c"),
    ]
    clock.advance(10_000)
    statuses = frozenset({Status.PENDING, Status.RUNNING, Status.RETRYING})
    assert await store.prune(1, statuses) == 0
    for job in jobs:
        assert (await store.get(job.id)).id == job.id
