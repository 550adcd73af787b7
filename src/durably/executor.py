"""Running one attempt of one job. ``execute`` always returns a Completion and never raises.

The executor turns whatever happened (a result, an exception, a timeout, a cancellation, an
unknown handler, an undecodable payload) into the decision the store will apply. The retry
decision itself is :func:`durably.policy.decide`, so the rules live in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any

from durably.errors import RetryAfter
from durably.job import JSON, BadPayload, Classification, Completion, Job, Outcome
from durably.policy import RetryPolicy, decide

__all__ = [
    "JobContext",
    "Operation",
    "cancelled_completion",
    "execute",
    "interrupted_completion",
    "rescue_completion",
]

log = logging.getLogger("durably.worker")

_MAX_ERROR = 4000


@dataclasses.dataclass(slots=True)
class JobContext:
    """What a handler may ask about the attempt it runs in (declare a second parameter for it).

    ``cancelled`` turns true when an operator cancels the job, the attempt times out, or the
    worker shuts down: long synchronous handlers should check it and return early.
    """

    job: Job
    attempt: int
    worker_id: str
    # A plain flag (reading a bool is atomic, so handler threads may poll it): an Event per
    # attempt was a measurable share of a worker's time on short jobs.
    _cancelled: bool = False
    _event: threading.Event | None = None  # made only when a handler thread waits on it

    @property
    def cancelled(self) -> bool:
        """True once the attempt should stop."""
        return self._cancelled

    def cancel(self) -> None:
        """Ask the handler to stop (used by the worker)."""
        self._cancelled = True
        if self._event is not None:
            self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block (in a synchronous handler's thread) until the attempt should stop or
        ``timeout`` seconds pass; True when it should stop."""
        if self._event is None:
            self._event = threading.Event()
        # Read the flag after the event exists: a cancel() in between sets one or the other.
        if self._cancelled:
            return True
        return self._event.wait(timeout)

    @property
    def meta(self) -> Mapping[str, JSON]:
        """The job's meta (request and trace ids, ...)."""
        return self.job.meta


Handler = Callable[..., Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Operation:
    """A registered handler: its name, function, default policy and queue."""

    name: str
    fn: Handler
    policy: RetryPolicy
    queue: str = "default"
    is_async: bool = False
    wants_context: bool = False

    @classmethod
    def build(
        cls, name: str, fn: Handler, policy: RetryPolicy, queue: str = "default"
    ) -> Operation:
        """Inspect ``fn`` once: async or not, and whether it takes a :class:`JobContext`."""
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        return cls(
            name=name,
            fn=fn,
            policy=policy,
            queue=queue,
            is_async=inspect.iscoroutinefunction(fn),
            wants_context=len(params) >= 2,
        )


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + "…"


def _elapsed(job: Job, duration: float) -> float:
    if job.first_attempt_at is None:
        return duration
    return max(0.0, (job.updated_at - job.first_attempt_at).total_seconds()) + duration


_PLAIN = frozenset({type(None), bool, int, str})


def _json_result(job: Job, value: Any) -> JSON:
    if type(value) in _PLAIN:
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        log.warning(
            "job %s (%s) returned a value that is not JSON; its repr is stored instead",
            job.id,
            job.handler,
            extra={"job_id": job.id, "handler": job.handler},
        )
        return {"repr": repr(value)[:_MAX_ERROR]}
    return value


_DEFAULT_POLICY = RetryPolicy()


@functools.lru_cache(maxsize=1024)
def _snapshot_policy(base: RetryPolicy, snapshot: tuple[tuple[str, Any], ...]) -> RetryPolicy:
    # Jobs of one operation share a handful of snapshots: validate each once, not per attempt.
    return RetryPolicy.from_dict(dict(snapshot), base=base)


def _policy_for(job: Job, operation: Operation | None) -> RetryPolicy:
    base = operation.policy if operation is not None else _DEFAULT_POLICY
    if not job.policy:
        return base
    try:
        return _snapshot_policy(base, tuple(sorted(job.policy.items())))
    except Exception:  # a snapshot from another version: the registered policy still applies
        log.warning("job %s has an unreadable policy snapshot; using the registered one", job.id)
        return base


def _timeout_for(job: Job, operation: Operation) -> float | None:
    """The attempt's time limit. The policy is rebuilt only when the job's own fields do not
    settle it: a successful attempt never needs the rest of the policy."""
    if job.timeout is not None:
        return job.timeout
    if job.policy and "timeout" in job.policy and job.policy["timeout"] is None:
        return None
    return _policy_for(job, operation).timeout


def _failure(
    job: Job,
    policy: RetryPolicy,
    *,
    classification: str,
    retryable: bool,
    error_type: str,
    message: str,
    duration: float,
    rand: Callable[[], float],
    retry_after: float | None = None,
    attempt_outcome: str | None = None,
) -> Completion:
    decision = decide(
        policy,
        attempt=job.attempts,
        classification=classification,
        retryable=retryable,
        retry_after=retry_after,
        elapsed=_elapsed(job, duration),
        rand=rand,
    )
    return Completion(
        job_id=job.id,
        lease_token=job.lease_token or "",
        attempt=job.attempts,
        outcome=decision.outcome,
        classification=decision.classification,
        error_type=error_type,
        error_message=message,
        retry_in=decision.delay,
        duration=duration,
        attempt_outcome=attempt_outcome,
        attempt_classification=classification,
    )


def _exception_completion(
    job: Job,
    policy: RetryPolicy,
    exc: Exception,
    duration: float,
    rand: Callable[[], float],
) -> Completion:
    return _failure(
        job,
        policy,
        classification=policy.classify(exc),
        retryable=policy.is_retryable(exc),
        retry_after=exc.seconds if isinstance(exc, RetryAfter) else None,
        error_type=type(exc).__qualname__,
        message=_error_text(exc),
        duration=duration,
        rand=rand,
    )


def _permanent(job: Job, classification: Classification, message: str) -> Completion:
    return Completion(
        job_id=job.id,
        lease_token=job.lease_token or "",
        attempt=job.attempts,
        outcome=Outcome.DEAD_LETTER,
        classification=classification.value,
        error_type=classification.value,
        error_message=message,
        duration=0.0,
    )


async def execute(
    job: Job,
    operation: Operation | None,
    *,
    context: JobContext,
    threads: Executor | None = None,
    rand: Callable[[], float] = random.random,
    monotonic: Callable[[], float] = time.monotonic,
) -> Completion:
    """Run one attempt of ``job`` and decide what happens next. Never raises (but for
    ``asyncio.CancelledError`` when the worker itself is being torn down)."""
    if operation is None:
        return _permanent(
            job,
            Classification.UNKNOWN_HANDLER,
            f"no operation named {job.handler!r} is registered on this worker",
        )
    if isinstance(job.payload, BadPayload):
        return _permanent(
            job, Classification.BAD_PAYLOAD, f"payload is not valid JSON: {job.payload.error}"
        )
    timeout = _timeout_for(job, operation)
    args: tuple[Any, ...] = (job.payload, context) if operation.wants_context else (job.payload,)
    started = monotonic()
    scope = None if timeout is None else asyncio.timeout(timeout)
    try:
        if operation.is_async:
            call: Awaitable[Any] = operation.fn(*args)
        else:
            loop = asyncio.get_running_loop()
            call = loop.run_in_executor(threads, lambda: operation.fn(*args))
        if scope is None:
            result = await call
        else:
            async with scope:
                result = await call
    except TimeoutError as exc:
        policy = _policy_for(job, operation)
        if scope is None or not scope.expired():
            return _exception_completion(job, policy, exc, monotonic() - started, rand)
        # Our per-attempt limit. A sync handler's thread cannot be killed: it is told to stop.
        context.cancel()
        return _failure(
            job,
            policy,
            classification=Classification.TIMEOUT.value,
            retryable=True,
            error_type="TimeoutError",
            message=f"attempt timed out after {timeout:g}s",
            duration=monotonic() - started,
            rand=rand,
        )
    except asyncio.CancelledError:
        context.cancel()
        raise
    except Exception as exc:
        policy = _policy_for(job, operation)
        return _exception_completion(job, policy, exc, monotonic() - started, rand)
    return Completion(
        job_id=job.id,
        lease_token=job.lease_token or "",
        attempt=job.attempts,
        outcome=Outcome.SUCCEEDED,
        result=_json_result(job, result),
        duration=monotonic() - started,
    )


def cancelled_completion(job: Job, duration: float, reason: str) -> Completion:
    """The ending of an attempt stopped by an operator's cancel."""
    return Completion(
        job_id=job.id,
        lease_token=job.lease_token or "",
        attempt=job.attempts,
        outcome=Outcome.CANCELLED,
        classification=Classification.CANCELLED.value,
        error_type="Cancelled",
        error_message=reason,
        duration=duration,
    )


def interrupted_completion(
    job: Job, operation: Operation | None, duration: float, rand: Callable[[], float]
) -> Completion:
    """The ending of an attempt cut short by worker shutdown: it counts, and retries at once."""
    policy = _policy_for(job, operation)
    return _failure(
        job,
        policy,
        classification=Classification.INTERRUPTED.value,
        retryable=True,
        error_type="Interrupted",
        message="the worker shut down before the attempt finished",
        duration=duration,
        rand=rand,
        retry_after=0.0,
        attempt_outcome="interrupted",
    )


def rescue_completion(
    job: Job, operation: Operation | None, rand: Callable[[], float]
) -> Completion:
    """The ending of an attempt whose worker vanished (its lease expired).

    The lost attempt counts; after the last one the job is dead-lettered as ``poison``.
    Applied with ``require_expired`` so a worker that renewed in time keeps its job.
    """
    policy = _policy_for(job, operation)
    completion = _failure(
        job,
        policy,
        classification=Classification.LEASE_EXPIRED.value,
        retryable=True,
        error_type="LeaseExpired",
        message=f"worker {job.worker_id} stopped renewing its lease (crashed or stalled)",
        duration=0.0,
        rand=rand,
        attempt_outcome="lease_expired",
    )
    return dataclasses.replace(completion, require_expired=True)
