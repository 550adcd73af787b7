"""Exceptions raised by durably, and the two that handlers raise to steer retries.

Driver exceptions (sqlite3, psycopg, redis) never leave a store: they are translated into
:class:`StoreError` (or one of the precise errors below) with the cause chained.
"""

from __future__ import annotations

__all__ = [
    "AttemptsExhausted",
    "Cancelled",
    "ConfigError",
    "Conflict",
    "DurablyError",
    "InvalidTransition",
    "JobNotFound",
    "KeyTaken",
    "PayloadError",
    "Permanent",
    "RetryAfter",
    "SchemaTooNew",
    "StaleLease",
    "StoreError",
    "StoreUnavailable",
    "UnknownHandler",
]


class DurablyError(Exception):
    """Base class of every error durably raises itself."""


class ConfigError(DurablyError, ValueError):
    """A setting or argument is invalid. The message says which and what is allowed."""


class PayloadError(DurablyError, ValueError):
    """A payload is not JSON-serialisable or is larger than the configured limit."""


class UnknownHandler(DurablyError, LookupError):
    """No operation is registered under that name."""


class JobNotFound(DurablyError, LookupError):
    """No job has that id."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class InvalidTransition(DurablyError):
    """The job is in a status from which the requested action is not allowed."""

    def __init__(self, job_id: int, status: str, action: str, allowed: frozenset[str]) -> None:
        choices = ", ".join(sorted(allowed))
        super().__init__(
            f"cannot {action} job {job_id}: it is {status}; {action} needs one of: {choices}"
        )
        self.job_id = job_id
        self.status = status
        self.action = action


class Conflict(DurablyError):
    """The job changed since the caller read it (its version moved)."""

    def __init__(self, job_id: int, expected: int, actual: int) -> None:
        super().__init__(
            f"job {job_id} changed: expected version {expected}, found {actual}; "
            "read it again and retry the action"
        )
        self.job_id = job_id
        self.expected = expected
        self.actual = actual


class KeyTaken(Conflict):
    """A requeue would give a job the idempotency key that another live job holds now."""

    def __init__(self, job_id: int, holder: int) -> None:
        DurablyError.__init__(
            self,
            f"cannot requeue job {job_id}: its key is held by live job {holder}; "
            "finish or cancel that job first",
        )
        self.job_id = job_id
        self.holder = holder
        self.expected = 0
        self.actual = 0


class StaleLease(DurablyError):
    """A worker wrote with a lease token that is no longer the job's current lease.

    The write was rejected: another worker (or the rescuer) owns the job now.
    """


class StoreError(DurablyError):
    """The store failed in a way that is not the caller's mistake."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused, dropped or timed out)."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer durably than this one; refusing to touch it."""


class Permanent(Exception):
    """Raise (or wrap a cause in) this from a handler to fail at once, without retrying.

    >>> raise durably.Permanent("customer 42 does not exist")  # doctest: +SKIP
    """

    classification: str = "permanent"


class RetryAfter(Exception):
    """Raise from a handler to ask for the next attempt after ``seconds``.

    The delay is clamped by the policy (never below zero, never above its cap) and still counts
    as a failed attempt.
    """

    classification: str = "rate_limited"

    def __init__(self, seconds: float, message: str = "") -> None:
        super().__init__(message or f"retry after {seconds:g}s")
        self.seconds = float(seconds)


class Cancelled(DurablyError):
    """The operation was cancelled (by a token, a deadline or an operator) before it finished."""


class AttemptsExhausted(DurablyError):
    """In-process retry gave up: ``attempts`` were made; ``__cause__`` is the last error."""

    def __init__(self, attempts: int, last: BaseException, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}{why}: "
            f"{type(last).__name__}: {last}"
        )
        self.attempts = attempts
        self.last = last
