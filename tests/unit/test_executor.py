"""``execute`` turns whatever one attempt did into the Completion the store will apply."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from durably.errors import Permanent, RetryAfter
from durably.executor import JobContext, Operation, execute
from durably.job import JSON, BadPayload, Completion, Job, Outcome, Status
from durably.policy import RetryPolicy

NOW = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=5, initial=2.0, multiplier=2.0, cap=60.0, jitter="none")


def make_job(
    attempts: int = 1,
    payload: JSON = None,
    *,
    policy: RetryPolicy | None = POLICY,
    timeout: float | None = None,
    first_attempt_at: datetime | None = None,
) -> Job:
    return Job(
        id=7,
        queue="default",
        handler="op",
        payload={"n": 1} if payload is None else payload,
        status=Status.RUNNING,
        attempts=attempts,
        max_attempts=None if policy is None else policy.max_attempts,
        policy={} if policy is None else policy.to_dict(),
        run_at=NOW,
        version=3,
        created_at=NOW,
        updated_at=NOW,
        timeout=timeout,
        worker_id="w1",
        lease_token="tok-7",
        lease_expires_at=NOW + timedelta(seconds=30),
        first_attempt_at=first_attempt_at or NOW,
        meta={"request_id": "r-1"},
    )


def op(fn: Any, policy: RetryPolicy = POLICY) -> Operation:
    return Operation.build("op", fn, policy)


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown(wait=True)


async def run(
    job: Job, operation: Operation | None, threads: ThreadPoolExecutor | None = None
) -> tuple[Completion, JobContext]:
    context = JobContext(job=job, attempt=job.attempts, worker_id="w1")
    completion = await execute(job, operation, context=context, threads=threads, rand=lambda: 0.5)
    return completion, context


async def test_success_stores_the_result_and_fences_with_the_lease() -> None:
    async def handler(payload: dict[str, int]) -> dict[str, int]:
        return {"doubled": payload["n"] * 2}

    completion, _ = await run(make_job(), op(handler))

    assert completion.outcome is Outcome.SUCCEEDED
    assert completion.result == {"doubled": 2}
    assert (completion.job_id, completion.lease_token, completion.attempt) == (7, "tok-7", 1)
    assert completion.classification is None
    assert completion.duration is not None
    assert completion.duration >= 0


async def test_a_result_that_is_not_json_is_stored_as_its_repr() -> None:
    marker = object()

    async def handler(payload: JSON) -> object:
        return marker

    completion, _ = await run(make_job(), op(handler))

    assert completion.outcome is Outcome.SUCCEEDED
    assert completion.result == {"repr": repr(marker)}


async def test_sync_handler_runs_in_the_thread_pool(threads: ThreadPoolExecutor) -> None:
    seen: list[int] = []

    def handler(payload: JSON) -> str:
        seen.append(threading.get_ident())
        return "ok"

    completion, _ = await run(make_job(), op(handler), threads)

    assert completion.outcome is Outcome.SUCCEEDED
    assert completion.result == "ok"
    assert seen
    assert seen[0] != threading.get_ident()


async def test_transient_error_retries_after_the_policy_backoff() -> None:
    async def handler(payload: JSON) -> None:
        raise ConnectionError("reset by peer")

    completion, _ = await run(make_job(attempts=2), op(handler))

    assert completion.outcome is Outcome.RETRY
    assert completion.classification == "transient"
    assert completion.retry_in == 4.0  # initial 2 * multiplier 2 ** (attempt 2 - 1)
    assert completion.error_type == "ConnectionError"
    assert completion.error_message == "reset by peer"


async def test_permanent_dead_letters_at_once() -> None:
    async def handler(payload: JSON) -> None:
        raise Permanent("customer 42 does not exist")

    completion, _ = await run(make_job(attempts=1), op(handler))

    assert completion.outcome is Outcome.DEAD_LETTER
    assert completion.classification == "permanent"
    assert completion.error_message == "customer 42 does not exist"


class ClientError(Exception):
    classification = "http_4xx"


async def test_an_exception_carrying_a_permanent_classification_dead_letters() -> None:
    async def handler(payload: JSON) -> None:
        raise ClientError("404 not found")

    completion, _ = await run(make_job(attempts=1), op(handler))

    assert completion.outcome is Outcome.DEAD_LETTER
    assert completion.classification == "http_4xx"
    assert completion.error_type == "ClientError"


@pytest.mark.parametrize(("asked", "expected"), [(5.0, 5.0), (1000.0, 60.0), (-3.0, 0.0)])
async def test_retry_after_sets_the_delay_clamped_to_the_cap(asked: float, expected: float) -> None:
    async def handler(payload: JSON) -> None:
        raise RetryAfter(asked)

    completion, _ = await run(make_job(attempts=1), op(handler))

    assert completion.outcome is Outcome.RETRY
    assert completion.classification == "rate_limited"
    assert completion.retry_in == expected


async def test_the_last_attempt_dead_letters_as_exhausted() -> None:
    async def handler(payload: JSON) -> None:
        raise ConnectionError("down")

    completion, _ = await run(make_job(attempts=5), op(handler))

    assert completion.outcome is Outcome.DEAD_LETTER
    assert completion.classification == "exhausted"
    assert completion.error_message == "down"


async def test_the_job_policy_snapshot_wins_over_the_registered_policy() -> None:
    async def handler(payload: JSON) -> None:
        raise ConnectionError("down")

    job = make_job(attempts=2, policy=POLICY.replace(max_attempts=2))
    completion, _ = await run(job, op(handler, RetryPolicy(max_attempts=10)))

    assert completion.outcome is Outcome.DEAD_LETTER
    assert completion.classification == "exhausted"


async def test_a_spent_time_budget_dead_letters() -> None:
    async def handler(payload: JSON) -> None:
        raise ConnectionError("down")

    policy = POLICY.replace(budget=10.0)
    job = make_job(attempts=2, policy=policy, first_attempt_at=NOW - timedelta(seconds=9))
    completion, _ = await run(job, op(handler, policy))

    # 9 s spent + a 4 s wait would end after the 10 s budget
    assert completion.outcome is Outcome.DEAD_LETTER
    assert completion.classification == "budget_exhausted"

    fresh = make_job(attempts=2, policy=policy, first_attempt_at=NOW)
    completion, _ = await run(fresh, op(handler, policy))
    assert completion.outcome is Outcome.RETRY


async def test_an_async_handler_over_its_timeout_is_stopped_and_retried() -> None:
    never = asyncio.Event()
    stopped = asyncio.Event()

    async def handler(payload: JSON) -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            stopped.set()
            raise

    completion, context = await run(make_job(attempts=1, timeout=0.05), op(handler))

    assert completion.outcome is Outcome.RETRY
    assert completion.classification == "timeout"
    assert completion.error_type == "TimeoutError"
    assert "0.05" in (completion.error_message or "")
    assert context.cancelled
    assert stopped.is_set()


async def test_a_sync_handler_over_its_timeout_is_told_to_stop(
    threads: ThreadPoolExecutor,
) -> None:
    finished = threading.Event()

    def handler(payload: JSON, context: JobContext) -> str:
        # Cooperative: returns as soon as the executor says the attempt is over.
        context.wait(timeout=10)
        finished.set()
        return "late"

    job = make_job(attempts=1, policy=POLICY.replace(timeout=0.05))
    completion, context = await run(job, op(handler, POLICY.replace(timeout=0.05)), threads)

    assert completion.outcome is Outcome.RETRY
    assert completion.classification == "timeout"
    assert context.cancelled
    assert await asyncio.to_thread(finished.wait, 10)


async def test_a_timeout_the_handler_raises_itself_is_not_ours() -> None:
    async def handler(payload: JSON) -> None:
        raise TimeoutError("upstream timed out")

    completion, context = await run(make_job(attempts=1, timeout=30), op(handler))

    assert completion.outcome is Outcome.RETRY
    assert completion.classification == "timeout"
    assert completion.error_message == "upstream timed out"
    assert not context.cancelled


async def test_an_unknown_handler_dead_letters() -> None:
    completion, _ = await run(make_job(), None)

    assert completion.outcome is Outcome.DEAD_LETTER
    assert completion.classification == "unknown_handler"
    assert "'op'" in (completion.error_message or "")
    assert completion.lease_token == "tok-7"


async def test_a_bad_payload_dead_letters_without_calling_the_handler() -> None:
    calls: list[JSON] = []

    async def handler(payload: JSON) -> None:
        calls.append(payload)

    job = make_job(payload=BadPayload(raw="{nope", error="Expecting property name"))
    completion, _ = await run(job, op(handler))

    assert completion.outcome is Outcome.DEAD_LETTER
    assert completion.classification == "bad_payload"
    assert "Expecting property name" in (completion.error_message or "")
    assert calls == []


async def test_a_handler_may_take_the_job_context() -> None:
    seen: dict[str, Any] = {}

    async def handler(payload: JSON, context: JobContext) -> int:
        seen.update(
            attempt=context.attempt,
            job_id=context.job.id,
            worker=context.worker_id,
            meta=dict(context.meta),
            cancelled=context.cancelled,
        )
        return context.attempt

    completion, _ = await run(make_job(attempts=3), op(handler))

    assert completion.outcome is Outcome.SUCCEEDED
    assert completion.result == 3
    assert seen == {
        "attempt": 3,
        "job_id": 7,
        "worker": "w1",
        "meta": {"request_id": "r-1"},
        "cancelled": False,
    }


async def test_an_unreadable_policy_snapshot_falls_back_to_the_registered_policy() -> None:
    async def handler(payload: JSON) -> None:
        raise ConnectionError("down")

    job = dataclasses.replace(make_job(attempts=1), policy={"no_such_field": 1})
    completion, _ = await run(job, op(handler, POLICY.replace(max_attempts=1)))

    assert completion.outcome is Outcome.DEAD_LETTER
    assert completion.classification == "exhausted"


def test_context_wait_returns_at_once_when_already_cancelled() -> None:
    context = JobContext(job=make_job(), attempt=1, worker_id="w")
    assert context.wait(timeout=0) is False
    context.cancel()
    assert context.cancelled
    assert context.wait(timeout=10) is True


async def test_context_wait_wakes_a_waiting_thread_on_cancel() -> None:
    context = JobContext(job=make_job(), attempt=1, worker_id="w")
    waiting = threading.Event()

    def handler_thread() -> bool:
        waiting.set()
        return context.wait(timeout=10)

    result = asyncio.ensure_future(asyncio.to_thread(handler_thread))
    assert await asyncio.to_thread(waiting.wait, 10)
    context.cancel()
    assert await asyncio.wait_for(result, 10) is True


async def test_a_successful_attempt_never_rebuilds_the_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import durably.executor as executor_module

    def refuse(*args: object) -> RetryPolicy:
        raise AssertionError("the policy was rebuilt for a successful attempt")

    monkeypatch.setattr(executor_module, "_policy_for", refuse)

    async def handler(payload: JSON) -> int:
        return 7

    completion, _ = await run(make_job(attempts=1), op(handler))
    assert completion.outcome is Outcome.SUCCEEDED
    assert completion.result == 7
