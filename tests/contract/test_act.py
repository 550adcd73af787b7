"""Operator actions: every action from every status, audited, guarded by status and version."""

from __future__ import annotations

import pytest

from durably.errors import Conflict, InvalidTransition, JobNotFound
from durably.job import ACTIONS, TERMINAL, Action, Outcome, Status
from durably.store import Store
from durably.testing import FakeClock

from .conftest import act, at, claim_one, finish, lease_of, reach, same_time

MATRIX = [(action, status) for action in Action for status in Status]


def _allowed(action: Action, status: Status) -> bool:
    return status in ACTIONS[action].sources


@pytest.mark.parametrize(
    ("action", "status"), MATRIX, ids=[f"{a.value}-from-{s.value}" for a, s in MATRIX]
)
async def test_action_from_status(
    store: Store, clock: FakeClock, action: Action, status: Status
) -> None:
    job = await reach(store, status)
    audit_before = await store.audit(job.id)
    clock.advance(5)
    if action is Action.CANCEL and status is Status.RUNNING:
        after = await act(store, job.id, action, actor="bob", notes="stop it")
        assert after.status == Status.RUNNING
        assert after.cancel_requested
        assert after.lease_token == job.lease_token
        expected_to = Status.RUNNING
    elif _allowed(action, status):
        after = await act(store, job.id, action, actor="bob", notes="looked at it ✓")
        expected_to = ACTIONS[action].target
        assert after.status == expected_to
    else:
        with pytest.raises(InvalidTransition) as info:
            await act(store, job.id, action, actor="bob", notes="nope")
        assert info.value.job_id == job.id
        assert await store.get(job.id) == job
        assert await store.audit(job.id) == audit_before
        return
    assert after.version == job.version + 1
    assert same_time(after.updated_at, at(clock))
    assert await store.get(job.id) == after
    audit = await store.audit(job.id)
    assert audit[: len(audit_before)] == audit_before
    [entry] = audit[len(audit_before) :]
    assert entry.job_id == job.id
    assert entry.actor == "bob"
    assert entry.action == action.value
    assert entry.from_status == status.value
    assert entry.to_status == expected_to.value
    assert entry.version == after.version
    assert entry.notes in ("stop it", "looked at it ✓")
    assert same_time(entry.at, at(clock))
    if expected_to in TERMINAL:
        assert same_time(after.finished_at, at(clock))
        assert after.operator == "bob"
        assert after.operator_notes == "looked at it ✓"


async def test_cancel_pending_job_releases_its_key(store: Store) -> None:
    job = await reach(store, Status.PENDING, key="k")
    cancelled = await act(store, job.id, Action.CANCEL)
    assert cancelled.status == Status.CANCELLED
    again = await reach(store, Status.PENDING, key="k")
    assert again.id != job.id


async def test_cancel_requested_job_keeps_running_and_can_finish(store: Store) -> None:
    job = await reach(store, Status.RUNNING)
    await act(store, job.id, Action.CANCEL)
    assert await finish(store, job, Outcome.CANCELLED, classification="cancelled")
    assert (await store.get(job.id)).status == Status.CANCELLED


@pytest.mark.parametrize("delta", [-1, 1, 10])
async def test_expected_version_mismatch_is_a_conflict(store: Store, delta: int) -> None:
    job = await reach(store, Status.DEAD_LETTER)
    audit_before = await store.audit(job.id)
    with pytest.raises(Conflict) as info:
        await act(store, job.id, Action.RESOLVE, expected_version=job.version + delta)
    assert info.value.job_id == job.id
    assert info.value.expected == job.version + delta
    assert info.value.actual == job.version
    assert await store.get(job.id) == job
    assert await store.audit(job.id) == audit_before


async def test_expected_version_match_applies(store: Store) -> None:
    job = await reach(store, Status.DEAD_LETTER)
    after = await act(store, job.id, Action.RESOLVE, expected_version=job.version)
    assert after.status == Status.RESOLVED


async def test_version_is_checked_before_status(store: Store) -> None:
    job = await reach(store, Status.SUCCEEDED)
    with pytest.raises(Conflict):
        await act(store, job.id, Action.RESOLVE, expected_version=job.version + 1)


async def test_unknown_job(store: Store) -> None:
    for action in Action:
        with pytest.raises(JobNotFound) as info:
            await act(store, 424_242, action)
        assert info.value.job_id == 424_242
    with pytest.raises(JobNotFound):
        await act(store, 424_242, Action.CANCEL, expected_version=1)


async def test_requeue_clears_errors_and_keeps_attempts(store: Store, clock: FakeClock) -> None:
    dead = await reach(store, Status.DEAD_LETTER, delay=0)
    assert dead.attempts == 1
    assert dead.last_error is not None
    clock.advance(100)
    job = await act(store, dead.id, Action.REQUEUE, notes="fixed upstream")
    assert job.status == Status.PENDING
    assert job.attempts == 1
    assert same_time(job.run_at, at(clock))
    assert job.last_error is None
    assert job.last_error_type is None
    assert job.classification is None
    assert job.first_attempt_at is None
    assert job.finished_at is None
    assert job.lease_token is None
    again = await claim_one(store)
    assert again.id == dead.id
    assert again.attempts == 2


async def test_requeue_reset_attempts(store: Store) -> None:
    dead = await reach(store, Status.DEAD_LETTER)
    job = await act(store, dead.id, Action.REQUEUE, reset_attempts=True)
    assert job.attempts == 0
    assert len(await store.attempts(dead.id)) == 1  # history is kept


async def test_requeue_retrying_job_makes_it_due_now(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RETRYING)  # due in an hour
    clock.advance(1)
    requeued = await act(store, job.id, Action.REQUEUE)
    assert same_time(requeued.run_at, at(clock))
    assert (await claim_one(store)).id == job.id


@pytest.mark.parametrize("action", [Action.RESOLVE, Action.ABANDON])
async def test_resolve_and_abandon_record_the_operator(
    store: Store, clock: FakeClock, action: Action
) -> None:
    dead = await reach(store, Status.DEAD_LETTER)
    clock.advance(60)
    job = await act(store, dead.id, action, actor="carol", notes="refunded by hand")
    assert job.operator == "carol"
    assert job.operator_notes == "refunded by hand"
    assert same_time(job.finished_at, at(clock))
    assert job.classification == dead.classification  # why it died stays on record


async def test_audit_trail_is_oldest_first(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.DEAD_LETTER)
    await act(store, job.id, Action.REQUEUE, actor="a1")
    clock.advance(1)
    await act(store, job.id, Action.CANCEL, actor="a2", notes=None)
    clock.advance(1)
    await act(store, job.id, Action.REQUEUE, actor="a3")
    audit = await store.audit(job.id)
    assert [e.actor for e in audit] == ["a1", "a2", "a3"]
    assert [e.action for e in audit] == ["requeue", "cancel", "requeue"]
    assert [(e.from_status, e.to_status) for e in audit] == [
        ("dead_letter", "pending"),
        ("pending", "cancelled"),
        ("cancelled", "pending"),
    ]
    assert audit[1].notes is None
    versions = [e.version for e in audit]
    assert versions == sorted(versions)
    assert len(set(versions)) == 3
    assert versions[-1] == (await store.get(job.id)).version


async def test_requeue_after_requested_cancel_clears_the_request(store: Store) -> None:
    """A requeued job is a fresh start: its next worker must not be told to cancel at once."""
    job = await reach(store, Status.RUNNING)
    await act(store, job.id, Action.CANCEL)
    assert await finish(store, job, Outcome.CANCELLED, classification="cancelled")
    requeued = await act(store, job.id, Action.REQUEUE)
    assert not requeued.cancel_requested
    again = await claim_one(store)
    assert not again.cancel_requested
    res = await store.heartbeat([lease_of(again)], 30)
    assert res.cancel_requested == frozenset()
