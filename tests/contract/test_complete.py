"""complete and release: attempt endings, fenced by the lease token."""

from __future__ import annotations

import pytest

from durably.job import Action, Completion, Outcome, Status
from durably.store import Store
from durably.store.base import ActionRequest, Lease
from durably.testing import FakeClock

from .conftest import at, claim, claim_one, enqueue_one, finish, lease_of, reach, same_time


async def test_success(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(3)
    result = {"sent": True, "to": "Zoë", "ids": [1, 2]}
    assert await finish(store, job, Outcome.SUCCEEDED, result=result, duration=2.5)
    done = await store.get(job.id)
    assert done.status == Status.SUCCEEDED
    assert done.result == result
    assert same_time(done.finished_at, at(clock))
    assert done.lease_token is None
    assert done.lease_expires_at is None
    assert done.version == job.version + 1
    assert same_time(done.updated_at, at(clock))
    assert done.attempts == 1
    assert done.classification is None
    assert done.last_error is None
    [attempt] = await store.attempts(job.id)
    assert attempt.outcome == "succeeded"
    assert same_time(attempt.finished_at, at(clock))
    assert attempt.duration == pytest.approx(2.5)
    assert attempt.classification is None
    assert attempt.error_type is None


async def test_retry(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(3)
    assert await finish(
        store,
        job,
        Outcome.RETRY,
        retry_in=42,
        classification="timeout",
        error_type="TimeoutError",
        error_message="took too long ⏱",
        duration=3.0,
    )
    after = await store.get(job.id)
    assert after.status == Status.RETRYING
    assert same_time(after.run_at, at(clock, 42))
    assert after.classification == "timeout"
    assert after.last_error_type == "TimeoutError"
    assert after.last_error == "took too long ⏱"
    assert after.lease_token is None
    assert after.lease_expires_at is None
    assert after.finished_at is None
    assert after.attempts == 1
    assert after.version == job.version + 1
    [attempt] = await store.attempts(job.id)
    assert attempt.outcome == "failed"
    assert attempt.classification == "timeout"
    assert attempt.error_type == "TimeoutError"
    assert attempt.error_message == "took too long ⏱"
    assert same_time(attempt.finished_at, at(clock))
    assert attempt.duration == pytest.approx(3.0)


async def test_dead_letter(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(1)
    assert await finish(store, job, Outcome.DEAD_LETTER, classification="exhausted")
    after = await store.get(job.id)
    assert after.status == Status.DEAD_LETTER
    assert after.classification == "exhausted"
    assert after.last_error == "boom"
    assert after.last_error_type == "ValueError"
    assert same_time(after.finished_at, at(clock))
    assert after.lease_token is None
    [attempt] = await store.attempts(job.id)
    assert attempt.outcome == "failed"
    assert attempt.classification == "exhausted"


async def test_cancelled(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(1)
    assert await finish(store, job, Outcome.CANCELLED, classification="cancelled")
    after = await store.get(job.id)
    assert after.status == Status.CANCELLED
    assert after.classification == "cancelled"
    assert same_time(after.finished_at, at(clock))
    assert after.lease_token is None
    [attempt] = await store.attempts(job.id)
    assert attempt.outcome == "cancelled"


async def test_attempt_outcome_override(store: Store) -> None:
    job = await reach(store, Status.RUNNING)
    assert await finish(
        store, job, Outcome.RETRY, classification="lease_expired", attempt_outcome="lease_expired"
    )
    [attempt] = await store.attempts(job.id)
    assert attempt.outcome == "lease_expired"


async def test_success_after_failure_clears_error_fields(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    assert await finish(store, job, Outcome.RETRY, retry_in=0)
    again = await claim_one(store)
    assert again.last_error == "boom"  # kept while the job retries
    assert await finish(store, again, Outcome.SUCCEEDED, result=1)
    done = await store.get(job.id)
    assert done.classification is None
    assert done.last_error is None
    assert done.last_error_type is None
    attempts = await store.attempts(job.id)
    assert [a.outcome for a in attempts] == ["failed", "succeeded"]


async def test_wrong_token_changes_nothing(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(1)
    wrong = Completion(job_id=job.id, lease_token="not-mine", attempt=1, outcome=Outcome.SUCCEEDED)
    assert await store.complete([wrong]) == [False]
    assert await store.get(job.id) == job
    [attempt] = await store.attempts(job.id)
    assert attempt.finished_at is None
    assert attempt.outcome is None


async def test_second_completion_is_rejected(store: Store) -> None:
    job = await reach(store, Status.RUNNING)
    assert await finish(store, job, Outcome.SUCCEEDED, result=1)
    done = await store.get(job.id)
    assert not await finish(store, job, Outcome.DEAD_LETTER)
    assert await store.get(job.id) == done


async def test_completion_of_unknown_job_is_rejected(store: Store) -> None:
    ghost = Completion(job_id=987_654, lease_token="x", attempt=1, outcome=Outcome.SUCCEEDED)
    assert await store.complete([ghost]) == [False]


async def test_rescued_job_rejects_the_late_worker(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)  # lease 30 s
    clock.advance(31)
    [stale] = await store.expired(10)
    assert stale.id == job.id
    rescue = Completion(
        job_id=job.id,
        lease_token=job.lease_token or "",
        attempt=1,
        outcome=Outcome.RETRY,
        classification="lease_expired",
        attempt_outcome="lease_expired",
        retry_in=0,
        require_expired=True,
    )
    assert await store.complete([rescue]) == [True]
    rescued = await store.get(job.id)
    assert rescued.status == Status.RETRYING
    assert rescued.classification == "lease_expired"
    # The original worker wakes up: its completion must not land, neither now...
    assert not await finish(store, job, Outcome.SUCCEEDED, result="late")
    assert await store.get(job.id) == rescued
    # ...nor after another worker took the job over.
    again = await claim_one(store, worker="w2")
    assert not await finish(store, job, Outcome.SUCCEEDED, result="late")
    assert await store.get(job.id) == again
    assert (await store.heartbeat([lease_of(job)], 30)).renewed == frozenset()
    assert await finish(store, again, Outcome.SUCCEEDED, result="new")
    done = await store.get(job.id)
    assert done.result == "new"
    attempts = await store.attempts(job.id)
    assert [a.outcome for a in attempts] == ["lease_expired", "succeeded"]
    assert [a.worker_id for a in attempts] == ["worker-1", "w2"]


async def test_require_expired_rejects_a_live_lease(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)  # lease 30 s
    clock.advance(29)
    rescue = Completion(
        job_id=job.id,
        lease_token=job.lease_token or "",
        attempt=1,
        outcome=Outcome.RETRY,
        require_expired=True,
    )
    assert await store.complete([rescue]) == [False]
    assert await store.get(job.id) == job


async def test_require_expired_after_heartbeat_is_rejected(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(25)
    await store.heartbeat([lease_of(job)], 30)
    clock.advance(10)  # past the first expiry, not the renewed one
    before = await store.get(job.id)
    rescue = Completion(
        job_id=job.id,
        lease_token=job.lease_token or "",
        attempt=1,
        outcome=Outcome.RETRY,
        require_expired=True,
    )
    assert await store.complete([rescue]) == [False]
    assert await store.get(job.id) == before


async def test_batch_completion_reports_per_item(store: Store) -> None:
    a = await reach(store, Status.RUNNING, queue="a")
    b = await reach(store, Status.RUNNING, queue="b")
    c = await reach(store, Status.RUNNING, queue="c")
    flags = await store.complete(
        [
            Completion(
                job_id=a.id, lease_token=a.lease_token or "", attempt=1, outcome=Outcome.SUCCEEDED
            ),
            Completion(job_id=b.id, lease_token="stale", attempt=1, outcome=Outcome.SUCCEEDED),
            Completion(
                job_id=c.id,
                lease_token=c.lease_token or "",
                attempt=1,
                outcome=Outcome.RETRY,
                retry_in=5,
                classification="transient",
            ),
        ]
    )
    assert flags == [True, False, True]
    assert (await store.get(a.id)).status == Status.SUCCEEDED
    assert await store.get(b.id) == b
    assert (await store.get(c.id)).status == Status.RETRYING


async def test_empty_completion_batch(store: Store) -> None:
    assert await store.complete([]) == []


async def test_release_unstarted_pending_job(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.PENDING, delay=0)
    running = await claim_one(store)
    clock.advance(2)
    assert await store.release([lease_of(running)]) == 1
    back = await store.get(job.id)
    assert back.status == Status.PENDING
    assert back.attempts == 0
    assert back.lease_token is None
    assert back.lease_expires_at is None
    assert back.run_at == job.run_at
    assert back.version == running.version + 1
    assert same_time(back.updated_at, at(clock))
    assert await store.attempts(job.id) == []
    again = await claim_one(store)
    assert again.id == job.id
    assert again.attempts == 1
    assert [a.number for a in await store.attempts(job.id)] == [1]


async def test_release_unstarted_retry(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    assert await finish(store, job, Outcome.RETRY, retry_in=10)
    clock.advance(10)
    second = await claim_one(store)
    assert second.attempts == 2
    assert await store.release([lease_of(second)]) == 1
    back = await store.get(job.id)
    assert back.status == Status.RETRYING
    assert back.attempts == 1
    assert back.run_at == second.run_at
    assert back.last_error == "boom"
    [attempt] = await store.attempts(job.id)
    assert attempt.number == 1
    assert attempt.outcome == "failed"


async def test_release_with_wrong_token_releases_nothing(store: Store) -> None:
    job = await reach(store, Status.RUNNING)
    other = await reach(store, Status.RUNNING, queue="o")
    assert await store.release([Lease(job.id, "stale")]) == 0
    assert await store.get(job.id) == job
    assert await store.release([Lease(job.id, "stale"), lease_of(other)]) == 1
    assert len(await store.attempts(job.id)) == 1


async def test_release_after_completion_releases_nothing(store: Store) -> None:
    job = await reach(store, Status.RUNNING)
    assert await finish(store, job, Outcome.SUCCEEDED)
    done = await store.get(job.id)
    assert await store.release([lease_of(job)]) == 0
    assert await store.get(job.id) == done


async def test_release_many(store: Store) -> None:
    await reach(store, Status.PENDING)
    await reach(store, Status.PENDING)
    got = await claim(store)
    assert await store.release([lease_of(j) for j in got]) == 2
    assert len(await claim(store)) == 2


async def test_attempt_row_keeps_its_own_classification_under_the_verdict(store: Store) -> None:
    job = await enqueue_one(store)
    running = await claim_one(store)
    assert await finish(
        store,
        running,
        Outcome.DEAD_LETTER,
        classification="exhausted",
        attempt_classification="timeout",
    )
    assert (await store.get(job.id)).classification == "exhausted"
    [attempt] = await store.attempts(job.id)
    assert attempt.classification == "timeout"


async def test_release_after_a_requeue_that_kept_attempts_goes_back_to_retrying(
    store: Store,
) -> None:
    job = await reach(store, Status.DEAD_LETTER)
    await store.act(ActionRequest(job_id=job.id, action=Action.REQUEUE, actor="alice"))
    running = await claim_one(store)
    assert running.attempts == 2
    assert await store.release([lease_of(running)]) == 1
    back = await store.get(job.id)
    # The documented rule: attempts left on record (1) -> retrying, run_at unchanged.
    assert (back.status, back.attempts) == (Status.RETRYING, 1)
    assert back.first_attempt_at is not None
