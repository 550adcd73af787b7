"""The Store protocol: what every backend (SQLite, PostgreSQL, Redis) must do.

A store speaks in job operations, never in "execute this SQL". Decisions (retry or dead-letter,
how long to wait, which transitions are allowed) are made once in the core; a store persists
them atomically and guards every write:

* worker writes (heartbeat, complete) apply only while the job is ``running`` under the caller's
  lease token, so a worker whose lease was taken over can never overwrite newer work (fencing);
* operator writes apply only from the action's source statuses and, when given, only at the
  version the operator saw;
* every change bumps ``version`` and ``updated_at``;
* every time comparison and every timestamp uses the store's clock, never the worker's.

All methods are coroutines. Driver exceptions never escape: they become
:class:`durably.errors.StoreError` (or :class:`~durably.errors.StoreUnavailable`).

The contract suite in ``tests/contract`` runs the same tests against every store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from durably.job import (
    Action,
    Attempt,
    AuditEntry,
    Completion,
    Event,
    Job,
    JobFilter,
    NewJob,
    Status,
    _quick_init,
)

__all__ = [
    "ActionRequest",
    "ClaimRequest",
    "ClaimsOnWake",
    "EnqueueResult",
    "HeartbeatResult",
    "Lease",
    "Store",
]


@_quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class EnqueueResult:
    """The job that now stands for a :class:`NewJob`, and whether this call created it.

    ``created`` is False when the idempotency key already had a live job, which is returned
    unchanged.
    """

    job: Job
    created: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimRequest:
    """What a worker asks for when it claims.

    The store picks up to ``limit`` jobs in ``queues`` whose status is ``pending`` or
    ``retrying`` and whose ``run_at`` is due on the store's clock, skipping rows other workers
    hold. Due ``retrying`` jobs come first (work already started finishes before fresh work
    starts, so a retry's lateness does not grow with the backlog), then ``pending`` ones; within
    each group oldest ``run_at`` first, ties by id. For each it atomically: sets ``running``, a
    fresh random ``lease_token``, ``worker_id``, ``lease_expires_at = now + lease_seconds``,
    increments ``attempts``, sets ``first_attempt_at`` if unset, bumps ``version``, and inserts an
    attempt row (``started_at = now``) numbered one past the job's last attempt row: history numbers
    never restart, even after a requeue that reset ``attempts``. A job has at most one open
    (unfinished) attempt row, the one its current lease runs; completions finish that row and
    release deletes it.

    With ``batch_id`` only that batch's jobs are claimed, and with ``due_only=False`` their
    ``run_at`` is ignored ("process this batch now").
    """

    queues: Sequence[str]
    worker_id: str
    limit: int
    lease_seconds: float
    batch_id: str | None = None
    due_only: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """A worker's hold on a running job."""

    job_id: int
    lease_token: str


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """What a heartbeat found.

    ``renewed`` holds the ids whose lease was extended; any lease asked about and not renewed
    was lost (the job was rescued, finished or cancelled elsewhere) and its worker must stop
    writing. ``cancel_requested`` holds the renewed ids an operator asked to cancel.
    """

    renewed: frozenset[int]
    cancel_requested: frozenset[int]


@dataclasses.dataclass(frozen=True, slots=True)
class ActionRequest:
    """An operator action on one job.

    The store applies ``Action`` per :data:`durably.job.ACTIONS`, checking in this order:
    the job exists (else :class:`~durably.errors.JobNotFound`), it is at ``expected_version``
    when given (else :class:`~durably.errors.Conflict`), it is in one of the rule's source
    statuses (else :class:`~durably.errors.InvalidTransition`). It records an audit entry
    (``actor``, ``action``, from/to status, the new ``version``, ``notes``) in the same
    transaction.

    ``REQUEUE`` raises :class:`~durably.errors.KeyTaken` when the job's idempotency key is held
    by another live job meanwhile. It sets ``run_at`` to now, clears the error fields,
    ``first_attempt_at`` and ``finished_at``, and with ``reset_attempts`` sets ``attempts`` to
    0. ``CANCEL`` on a ``running`` job does not change its status: it sets ``cancel_requested``
    (audited, version bumped) and returns the job, for its worker to see at the next heartbeat.
    Every action that ends the job sets ``finished_at`` and the ``operator`` fields; releasing
    the idempotency key is automatic because terminal jobs are not live.
    """

    job_id: int
    action: Action
    actor: str
    notes: str | None = None
    expected_version: int | None = None
    reset_attempts: bool = False


@runtime_checkable
class Store(Protocol):
    """A durable home for jobs. See the module docstring for the rules every method obeys."""

    url: str
    """The URL the store was opened with, with any password masked (safe to log)."""

    # Every store's constructor accepts ``migrate_on_open: bool = True`` (``durably migrate``
    # passes False to report pending migrations before applying them) and
    # ``clock: Callable[[], datetime] | None = None``. When
    # set (tests), every "now" the store uses comes from it instead of the database's clock,
    # so tests can expire leases and make retries due without sleeping.

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect. Refuse (``SchemaTooNew``) a schema newer than this code; migrate if behind
        (unless constructed with ``migrate_on_open=False``)."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def migrate(self, *, dry_run: bool = False) -> list[str]:
        """Apply pending migrations under a lock; return their names (only list them if dry)."""

    async def schema_version(self) -> int:
        """The highest migration applied to this store (0 for an empty store)."""

    async def now(self) -> datetime:
        """The store's clock (timezone-aware UTC)."""

    # -- producers -------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[EnqueueResult]:
        """Insert jobs in order, in one transaction and as few round trips as the backend allows.

        A job whose ``key`` already has a live job (pending, running, retrying) is not inserted;
        the live job is returned with ``created=False``. Keys of jobs in other statuses are free.
        """

    async def upsert(self, job: NewJob) -> EnqueueResult:
        """Enqueue by key, or replace the live job's content: payload, meta, policy,
        max_attempts, timeout, queue, handler and event_scope.

        Replacing happens only while the live job is not ``running``; a running job is returned
        unchanged with ``created=False``. ``job.key`` must be set.
        """

    # -- workers ---------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> list[Job]:
        """Claim due jobs under fresh leases (see :class:`ClaimRequest`)."""

    async def heartbeat(self, leases: Sequence[Lease], lease_seconds: float) -> HeartbeatResult:
        """Extend the leases that are still held (``running`` with that token).

        A renewal is a change like any other: it bumps ``version`` and ``updated_at``.
        """

    async def complete(self, completions: Sequence[Completion]) -> list[bool]:
        """Apply attempt endings, fenced by lease token; return, per completion, if applied.

        For an applied completion the store, in one transaction: finishes the attempt row
        (``finished_at``, ``outcome``, ``classification``, error, ``duration``), sets the job's
        status (succeeded, retrying with ``run_at = now + retry_in``, dead_letter or cancelled),
        its ``result`` / error fields / ``classification``, clears the lease, sets
        ``finished_at`` when the job ended (succeeded, dead_letter, cancelled), and bumps
        ``version``. Success clears ``classification``, ``last_error`` and ``last_error_type``;
        the other outcomes set them from the completion. Attempt row ``outcome`` is
        ``attempt_outcome`` when given, else ``succeeded`` / ``failed`` (retry, dead_letter) /
        ``cancelled``; its ``classification`` is ``attempt_classification`` when given, else
        ``classification``. A completion that does not apply changes nothing.
        """

    async def release(self, leases: Sequence[Lease]) -> int:
        """Hand back claimed jobs that never started (graceful shutdown).

        Fenced by lease token: ``attempts`` is decremented, the unstarted attempt row deleted,
        the lease cleared, ``version`` bumped, and the status becomes ``pending`` when no attempt
        is left on record (``attempts == 0``) or ``retrying`` otherwise; ``run_at`` is unchanged.
        Returns how many were released.
        """

    async def expired(self, limit: int) -> list[Job]:
        """Running jobs whose lease has expired on the store's clock, oldest expiry first."""

    async def next_due_in(self, queues: Sequence[str]) -> float | None:
        """Seconds until the earliest waiting job in ``queues`` is due (0 if one is due now).

        ``None`` when no job waits. Lets an idle worker sleep exactly until a retry is due.
        """

    async def wait(self, queues: Sequence[str], timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a job may have become available in ``queues``.

        Returns True when woken by an enqueue (LISTEN/NOTIFY, a Redis blocking call, or an
        in-process signal for SQLite), False on timeout. Spurious wake-ups are allowed; missed
        ones are not worse than the timeout, which is the polling fallback.
        """

    # -- operators -------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job:
        """The job, or ``JobNotFound``."""

    async def get_by_key(self, key: str) -> Job | None:
        """The live job holding ``key``, else the newest job that had it, else None."""

    async def list_jobs(
        self, where: JobFilter, *, limit: int = 100, after_id: int | None = None
    ) -> list[Job]:
        """Jobs matching ``where``, newest first (descending id), below ``after_id`` if given."""

    async def attempts(self, job_id: int) -> list[Attempt]:
        """The job's attempts, oldest first."""

    async def audit(self, job_id: int) -> list[AuditEntry]:
        """The job's audit trail, oldest first."""

    async def act(self, request: ActionRequest) -> Job:
        """Apply one operator action (see :class:`ActionRequest`); return the job after it."""

    async def counts(self) -> dict[tuple[str, Status], int]:
        """How many jobs per (queue, status)."""

    async def prune(self, older_than: float, statuses: frozenset[Status]) -> int:
        """Delete jobs (with attempts and audit) in ``statuses`` finished ``older_than`` s ago."""

    # -- outbox ----------------------------------------------------------------------------
    #
    # In the same transaction as any change (complete or act) that moves a job with an
    # ``event_scope`` into one of ``EVENT_STATUSES``, the store inserts an event of type
    # ``<scope>.processed`` whose payload is ``durably.events.processed_payload(job_after)``.
    # When that change moves the job out of a live status and leaves its batch (``batch_id``)
    # with no live job, it also inserts one ``<scope>.batch_completed`` event with
    # ``durably.events.batch_payload(batch_id, counts_by_status, job_after.updated_at)``
    # (exactly once per batch completion, even with concurrent completers). Jobs without a
    # scope emit nothing. A change that rolls back emits nothing.

    async def claim_events(self, limit: int, lease_seconds: float) -> list[Event]:
        """Lease up to ``limit`` due, unleased (or lease-expired) events, oldest id first.

        An event is skipped while an older event of the same job is still undelivered, so
        each job's events are delivered in order. Each claimed event gets a fresh
        ``lease_token`` and ``attempts + 1``.
        """

    async def ack_events(self, events: Sequence[Event]) -> int:
        """Delete delivered events, fenced by their lease token; return how many."""

    async def retry_event(self, event: Event, retry_in: float, error: str) -> bool:
        """Release a failed delivery: due again in ``retry_in`` s; fenced by lease token."""


@runtime_checkable
class ClaimsOnWake(Protocol):
    """A store that can claim as a wait ends, with no round trip in between (Redis).

    Workers use it, when the store offers it, for their idle wait: the claim is sent together
    with the blocking wait and the server runs it the moment the wait is served, which saves
    a wake-up and a round trip between an enqueue and the start of its job.
    """

    async def wait_and_claim(self, request: ClaimRequest, timeout: float) -> list[Job]:
        """Wait as :meth:`Store.wait` on ``request.queues``, then claim as :meth:`Store.claim`.

        The claim runs whether the wait was woken or timed out, and the jobs it claimed
        belong to the caller. It may already have run on the server when the caller stops
        waiting for the reply, so the caller must not cancel the call: to end the wait early
        it calls :meth:`interrupt_wait`, after which this returns promptly (possibly with jobs,
        which the caller then runs or releases).
        """

    async def interrupt_wait(self, worker_id: str) -> None:
        """End ``worker_id``'s :meth:`wait_and_claim` now, or its next one if none is running.

        An interruption no wait took is dropped after a minute; until then it may end one
        later wait early, which is a spurious wake-up (allowed, as for :meth:`Store.wait`).
        """
