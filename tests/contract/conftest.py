"""Small drivers for the contract suite: reach any status through the Store API, never by rows."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

from durably.job import Action, Completion, Job, NewJob, Outcome, Status
from durably.store import Store
from durably.store.base import ActionRequest, ClaimRequest, Lease
from durably.testing import FakeClock

WORKER = "worker-1"
LEASE = 30.0

# Stores may keep timestamps as floats or milliseconds; a millisecond is below anything we check.
TIME_TOLERANCE = timedelta(milliseconds=2)


def at(clock: FakeClock, offset: float = 0.0) -> datetime:
    """The fake clock's now, plus ``offset`` seconds."""
    return clock.now() + timedelta(seconds=offset)


def same_time(actual: datetime | None, expected: datetime) -> bool:
    """True when ``actual`` is an aware datetime within a couple of milliseconds of ``expected``."""
    return (
        actual is not None
        and actual.tzinfo is not None
        and abs(actual - expected) <= TIME_TOLERANCE
    )


def lease_of(job: Job) -> Lease:
    assert job.lease_token is not None, f"job {job.id} holds no lease"
    return Lease(job.id, job.lease_token)


def changed_fields(before: Job, after: Job) -> set[str]:
    """Names of the fields that differ, ignoring the bookkeeping ``version`` and ``updated_at``."""
    return {
        f.name
        for f in dataclasses.fields(Job)
        if f.name not in ("version", "updated_at")
        and getattr(before, f.name) != getattr(after, f.name)
    }


async def enqueue_one(store: Store, handler: str = "h", payload: Any = None, **kw: Any) -> Job:
    """Enqueue one job and insist it was created."""
    [res] = await store.enqueue([NewJob(handler=handler, payload=payload or {"n": 1}, **kw)])
    assert res.created
    return res.job


async def claim(
    store: Store,
    queues: tuple[str, ...] = ("default",),
    *,
    worker: str = WORKER,
    limit: int = 10,
    lease: float = LEASE,
    batch_id: str | None = None,
    due_only: bool = True,
) -> list[Job]:
    return await store.claim(
        ClaimRequest(
            queues=list(queues),
            worker_id=worker,
            limit=limit,
            lease_seconds=lease,
            batch_id=batch_id,
            due_only=due_only,
        )
    )


async def claim_one(store: Store, queue: str = "default", **kw: Any) -> Job:
    """Claim exactly one job from ``queue`` and return it."""
    jobs = await claim(store, (queue,), limit=1, **kw)
    assert len(jobs) == 1, f"expected one claimable job in {queue!r}, got {jobs}"
    return jobs[0]


async def finish(store: Store, job: Job, outcome: Outcome, **kw: Any) -> bool:
    """Complete ``job`` (as claimed) with ``outcome``; sensible error fields for failures."""
    assert job.lease_token is not None
    if outcome is not Outcome.SUCCEEDED:
        kw.setdefault("classification", "transient" if outcome is Outcome.RETRY else "permanent")
        kw.setdefault("error_type", "ValueError")
        kw.setdefault("error_message", "boom")
    [applied] = await store.complete(
        [
            Completion(
                job_id=job.id,
                lease_token=job.lease_token,
                attempt=job.attempts,
                outcome=outcome,
                **kw,
            )
        ]
    )
    return applied


async def act(store: Store, job_id: int, action: Action, **kw: Any) -> Job:
    kw.setdefault("actor", "alice")
    return await store.act(ActionRequest(job_id=job_id, action=action, **kw))


async def reach(store: Store, status: Status, *, queue: str = "default", **kw: Any) -> Job:
    """A fresh job in ``status``, driven there through the Store API only.

    The claim takes the oldest due job in ``queue``: nothing else may be waiting there.
    """
    job = await enqueue_one(store, queue=queue, **kw)
    if status is Status.PENDING:
        return job
    running = await claim_one(store, queue)
    assert running.id == job.id
    if status is Status.RUNNING:
        return running
    outcome = {
        Status.RETRYING: Outcome.RETRY,
        Status.SUCCEEDED: Outcome.SUCCEEDED,
        Status.DEAD_LETTER: Outcome.DEAD_LETTER,
        Status.CANCELLED: Outcome.CANCELLED,
        Status.RESOLVED: Outcome.DEAD_LETTER,
        Status.ABANDONED: Outcome.DEAD_LETTER,
    }[status]
    extra = {"retry_in": 3600.0} if outcome is Outcome.RETRY else {}
    assert await finish(store, running, outcome, **extra)
    if status is Status.RESOLVED:
        await act(store, job.id, Action.RESOLVE)
    elif status is Status.ABANDONED:
        await act(store, job.id, Action.ABANDON)
    done = await store.get(job.id)
    assert done.status == status
    return done
