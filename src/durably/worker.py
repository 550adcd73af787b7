"""The worker: claims jobs under leases, runs them, and writes their endings, all fenced.

Pieces, each small:

* the **fetcher** claims batches while there is room and work, and otherwise sleeps until an
  enqueue wakes it, the next retry is due, or the poll interval passes;
* **runners** (``concurrency`` of them) execute jobs; sync handlers run in a thread pool;
* the **completer** writes endings in batches;
* the **heartbeat** renews every held lease and passes on operators' cancel requests;
* the **rescuer** ends attempts whose worker vanished (expired leases).

Graceful shutdown (SIGTERM/SIGINT, or :meth:`Worker.stop`): stop claiming, hand back claimed jobs
that never started (no attempt used), let running jobs finish up to ``shutdown_timeout``, then
interrupt the rest (their attempt counts and they retry at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from durably.errors import ConfigError, StoreError, StoreUnavailable
from durably.events import Publisher
from durably.executor import (
    JobContext,
    Operation,
    cancelled_completion,
    execute,
    interrupted_completion,
    rescue_completion,
)
from durably.job import TERMINAL, Completion, Job, Outcome, Status
from durably.store.base import ClaimRequest, ClaimsOnWake, Lease, Store
from durably.telemetry import Telemetry

if TYPE_CHECKING:
    from durably.app import Durably

__all__ = ["Pruner", "Rescuer", "Worker"]

log = logging.getLogger("durably.worker")

_RETRY_SOON = 5.0
"""Retries due within this many seconds make the worker claim in smaller batches meanwhile."""
_SMALLEST_RETRY_CLAIM = 10
"""Those smaller claims take at least this many jobs (when the room holds as many)."""
_UNKNOWN = float("inf")


def _job_extra(job: Job, **more: object) -> dict[str, object]:
    extra: dict[str, object] = {
        "job_id": job.id,
        "handler": job.handler,
        "key": job.key,
        "attempt": job.attempts,
        "queue": job.queue,
    }
    for name in ("request_id", "trace_id"):
        if name in job.meta:
            extra[name] = job.meta[name]
    extra.update(more)
    return extra


class Rescuer:
    """Ends attempts whose lease expired: the worker crashed or stalled.

    The lost attempt counts (classification ``lease_expired``); a job that keeps killing its
    workers is dead-lettered as ``poison`` after its last attempt. Safe to run on every worker
    at once: each ending is fenced by the stale lease token and the expiry.
    """

    def __init__(
        self,
        store: Store,
        operations: Mapping[str, Operation],
        *,
        rand: Callable[[], float] = random.random,
        limit: int = 100,
    ) -> None:
        self.store = store
        self.operations = operations
        self.rand = rand
        self.limit = limit

    async def run_once(self) -> int:
        """Rescue up to ``limit`` expired jobs; return how many this call ended."""
        jobs = await self.store.expired(self.limit)
        if not jobs:
            return 0
        completions = [
            rescue_completion(job, self.operations.get(job.handler), self.rand) for job in jobs
        ]
        applied = await self.store.complete(completions)
        for job, completion, ok in zip(jobs, completions, applied, strict=True):
            if ok:
                log.warning(
                    "rescued job %s (%s) from worker %s: lease expired; %s",
                    job.id,
                    job.handler,
                    job.worker_id,
                    "dead-lettered as poison"
                    if completion.outcome is Outcome.DEAD_LETTER
                    else f"retry in {completion.retry_in:.1f}s",
                    extra=_job_extra(job, classification=completion.classification),
                )
        return sum(applied)


class Pruner:
    """Deletes finished jobs (with their attempts and audit) once they are ``retention`` seconds
    old, so the hot tables stay small. Dead-lettered jobs are kept until someone acts on them."""

    def __init__(
        self, store: Store, retention: float, statuses: frozenset[Status] = TERMINAL
    ) -> None:
        if retention <= 0:
            raise ConfigError(f"retention must be a positive number of seconds, not {retention}")
        self.store = store
        self.retention = retention
        self.statuses = statuses

    async def run_once(self) -> int:
        """Prune once; return how many jobs were deleted."""
        deleted = await self.store.prune(self.retention, self.statuses)
        if deleted:
            log.info("pruned %d finished jobs older than %.0fs", deleted, self.retention)
        return deleted


@dataclasses.dataclass(slots=True)
class _Running:
    job: Job
    context: JobContext
    started: float
    task: asyncio.Task[Completion] | None = None
    stop_reason: str | None = None  # "cancel" (operator), "shutdown", "lost" (lease lost)


class Worker:
    """Runs the jobs of one app's registered operations.

    >>> worker = app.worker(concurrency=20)  # doctest: +SKIP
    >>> await worker.run()                   # until SIGTERM, or drained with burst=True

    ``freeze_heap=True`` is for a process that exists to run this worker (``durably worker``
    sets it): once started, everything already allocated is moved out of the garbage
    collector's reach (:func:`gc.freeze`), so full collections stay short. Leave it off in a
    process that does other work.
    """

    def __init__(
        self,
        app: Durably,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        prefetch: int | None = None,
        batch_size: int | None = None,
        poll_interval: float = 1.0,
        lease_seconds: float = 30.0,
        heartbeat_interval: float | None = None,
        rescue_interval: float | None = None,
        shutdown_timeout: float = 30.0,
        burst: bool = False,
        worker_id: str | None = None,
        rand: Callable[[], float] = random.random,
        publish_events: bool = True,
        census_interval: float = 15.0,
        retention: float | None = None,
        prune_interval: float = 300.0,
        freeze_heap: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, not {concurrency}")
        if lease_seconds <= 0:
            raise ConfigError(f"lease_seconds must be positive, not {lease_seconds}")
        if poll_interval <= 0:
            raise ConfigError(f"poll_interval must be positive, not {poll_interval}")
        self.app = app
        self.queues = tuple(queues) if queues else app.queues()
        self.concurrency = concurrency
        # Claiming ahead (renewed by heartbeats, handed back at shutdown) halves the round
        # trips per job; the profile showed claims capped at `concurrency` dominating.
        self.prefetch = concurrency if prefetch is None else max(0, prefetch)
        self.batch_size = batch_size or max(concurrency + self.prefetch, 1)
        # While retries this worker scheduled come due soon, claims take a quarter of the
        # concurrency, but no fewer than _SMALLEST_RETRY_CLAIM jobs: a due retry waits for the
        # next claim, and its endings make retries due in bursts as large as a completion
        # batch, so smaller claims reach the end of a burst sooner (W2 retry lateness p99 at
        # concurrency 100: whole-room claims 30-50 ms, halves 18-24 ms, quarters 8-14 ms). Yet
        # each claim costs a fixed 1-2 ms: claims of 2 made a worker at concurrency 10
        # claim-bound (W2 ~360 jobs/s, against ~1,000 with claims of 10). Otherwise claims stay
        # large: each is a commit (on SQLite, drains ran 25% slower with the small claims).
        self._retry_batch_size = batch_size or max(
            concurrency // 4, min(_SMALLEST_RETRY_CLAIM, concurrency + self.prefetch), 1
        )
        # The monotonic time the last of those retries is due by. Until its first endings are
        # written the worker cannot know whether its jobs retry, so it starts with small claims
        # (a first whole-room claim of jobs that all fail made their retries due all at once).
        self._retries_due_until = _UNKNOWN
        self._claimed_short = False  # the idle wait claimed, and got less than it asked for
        self._on_stop: set[Callable[[], object]] = set()  # what stop() cancels (the idle wait)
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.heartbeat_interval = heartbeat_interval or lease_seconds / 3
        if self.heartbeat_interval >= lease_seconds:
            raise ConfigError("heartbeat_interval must be shorter than lease_seconds")
        self.rescue_interval = rescue_interval or max(lease_seconds / 2, 0.05)
        self.shutdown_timeout = shutdown_timeout
        self.burst = burst
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.rand = rand
        self.publish_events = publish_events
        self.census_interval = census_interval
        self.retention = retention
        self.prune_interval = prune_interval
        self.freeze_heap = freeze_heap
        self.stats: Counter[str] = Counter()
        self._stop = asyncio.Event()
        # Claimed jobs waiting for a runner. Retries (second or later attempt) go first, as in
        # the store's claim order: a retry claimed behind a prefetched batch of fresh jobs would
        # otherwise wait for all of them. Entries: (rank, sequence, job); None stops a runner.
        self._queue: asyncio.PriorityQueue[tuple[int, int, Job | None]] = asyncio.PriorityQueue()
        self._sequence = itertools.count()
        self._running: dict[int, _Running] = {}
        # Claimed jobs still waiting for a runner that must not start: "lost" (the lease was
        # taken over) or "cancel" (an operator cancelled them), as the heartbeat found.
        self._skip: dict[int, str] = {}
        self._pending: list[Completion] = []
        self._pending_event = asyncio.Event()
        self._closing = False  # set at shutdown: the completer drains what is left and returns
        self._writing = False  # the completer has a batch in flight
        self._progress = asyncio.Event()  # set whenever endings were written
        self._slot_free = asyncio.Event()
        self._store: Store | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._inflight: dict[int, Job] = {}  # claimed jobs by id, until their ending is written
        self.telemetry = app.telemetry
        self.publisher: Publisher | None = None

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler)."""
        if not self._stop.is_set():
            log.info("worker %s stopping: no new claims", self.worker_id)
        self._stop.set()
        self._slot_free.set()
        for cancel in list(self._on_stop):
            cancel()

    @property
    def store(self) -> Store:
        """The store this worker uses (opened by :meth:`run`)."""
        if self._store is None:
            raise RuntimeError("the worker is not running")
        return self._store

    async def run(self, *, install_signals: bool = False) -> None:
        """Work until stopped (or, in burst mode, until no job is due)."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        try:
            store = await self._open_store()
        finally:
            if install_signals and self._store is None:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        if store is None:
            return  # stopped before the store could be reached: nothing was claimed
        self._threads = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="durably-job"
        )
        if self.freeze_heap:
            # This process is the worker's own (the CLI's): what start-up made (modules, the
            # app, the store) lives as long as it does. Frozen out of the collector, it is not
            # walked by every full collection, which paused the event loop ~18 ms (due retries
            # waited it out) and now walks only what the worker makes.
            gc.collect()
            gc.freeze()
        log.info(
            "worker %s started on %s (queues %s, concurrency %d)",
            self.worker_id,
            store.url,
            ",".join(self.queues),
            self.concurrency,
        )
        # Jobs stranded by a crashed worker are ended before this one claims (burst included).
        await self._guarded(self._rescue)
        runners = [asyncio.create_task(self._runner()) for _ in range(self.concurrency)]
        completer = asyncio.create_task(self._completer())
        services = [
            asyncio.create_task(self._every(self.heartbeat_interval, self._heartbeat)),
            asyncio.create_task(self._every(self.rescue_interval, self._rescue)),
        ]
        if self.retention is not None:
            pruner = Pruner(store, self.retention)

            async def prune() -> None:
                self.stats["pruned"] += await pruner.run_once()

            services.append(asyncio.create_task(self._every(self.prune_interval, prune)))
        if type(self.telemetry) is not Telemetry:
            services.append(asyncio.create_task(self._every(self.census_interval, self._census)))
        publisher_stop = asyncio.Event()
        sinks = self.app.all_sinks()
        if sinks and self.publish_events:
            self.publisher = Publisher(store, sinks, telemetry=self.telemetry, rand=self.rand)
            publishing = asyncio.create_task(
                self.publisher.run(publisher_stop, poll_interval=self.poll_interval)
            )
        try:
            await self._fetch_loop()
        finally:
            await self._shutdown(runners, services, completer)
            publisher_stop.set()
            if self.publisher is not None:
                await publishing
                await self._drain_events(self.publisher)
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._threads.shutdown(wait=False, cancel_futures=True)
            log.info("worker %s stopped (%s)", self.worker_id, dict(self.stats))

    async def _open_store(self) -> Store | None:
        """Open the store, backing off while it is unreachable (a database restarting, a cut
        session during migrations): a worker never exits because its store blinked.

        Returns None when a stop was requested before the store could be reached.
        """
        failures = 0
        while True:
            try:
                self._store = await self.app.store_async()
                return self._store
            except StoreUnavailable as exc:
                failures += 1
                delay = min(30.0, 0.1 * 2 ** min(failures, 10)) * (0.5 + self.rand() / 2)
                log.error(
                    "worker %s cannot reach the store (%s); retrying in %.1fs",
                    self.worker_id,
                    exc,
                    delay,
                )
            await self._until(asyncio.sleep(delay), None)
            if self._stop.is_set():
                return None

    # -- fetching ---------------------------------------------------------------------------

    def _room(self) -> int:
        return self.concurrency + self.prefetch - len(self._running) - self._queue.qsize()

    def _claim_request(self, room: int) -> ClaimRequest:
        limit = min(
            room,
            self._retry_batch_size
            if time.monotonic() < self._retries_due_until
            else self.batch_size,
        )
        return ClaimRequest(self.queues, self.worker_id, limit, self.lease_seconds)

    def _take(self, jobs: Sequence[Job]) -> None:
        """Queue claimed jobs for the runners, retries first."""
        for job in jobs:
            self.stats["claimed"] += 1
            self._inflight[job.id] = job
            self.telemetry.job_started(job, (job.updated_at - job.run_at).total_seconds())
            self._queue.put_nowait((0 if job.attempts > 1 else 1, next(self._sequence), job))

    async def _fetch_loop(self) -> None:
        store = self.store
        failures = 0
        while not self._stop.is_set():
            self._slot_free.clear()  # before measuring room, so a freed slot is never missed
            room = self._room()
            if room <= 0:
                # A plain wait (stop() sets it too): going through _until() took the fetcher
                # several loop turns to wake, by which time the runners had drained the whole
                # prefetch and sat idle through the next claim's round trip.
                self._claimed_short = False
                await self._slot_free.wait()
                continue
            if self._claimed_short:
                # The idle wait has just claimed, and found less than it asked for.
                self._claimed_short = False
            else:
                request = self._claim_request(room)
                try:
                    jobs = await store.claim(request)
                    failures = 0
                except StoreError as exc:
                    failures += 1
                    delay = min(30.0, 0.1 * 2 ** min(failures, 10)) * (0.5 + self.rand() / 2)
                    log.error(
                        "worker %s cannot claim (%s); retrying in %.1fs", self.worker_id, exc, delay
                    )
                    await self._until(asyncio.sleep(delay), None)
                    continue
                self._take(jobs)
                if len(jobs) == request.limit:
                    continue  # probably more work: claim again at once
            if await self._idle():
                return

    def _quiet(self) -> bool:
        """Nothing running, queued, or waiting to be written: the store shows all we did."""
        return not self._running and self._queue.empty() and not self._pending and not self._writing

    async def _idle(self) -> bool:
        """Sleep until work may be there; True when burst mode is done."""
        # Let runners start what was just claimed before the schedule's round trip: its
        # synchronous half (connection checkout, send) otherwise delays each start by ~0.5 ms.
        # Two turns: one for a runner to take the job, one for its task to start the handler.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self._progress.clear()
        quiet = self._quiet()  # before reading the schedule, so a retry written meanwhile shows
        try:
            due = await self.store.next_due_in(self.queues)
        except StoreError as exc:
            log.error("worker %s cannot read the schedule: %s", self.worker_id, exc)
            due = None
        if self.burst and quiet and self._quiet() and (due is None or due > self.poll_interval):
            # Before leaving, end what a crashed worker left behind: it may be due now.
            before = self.stats["rescued"]
            await self._guarded(self._rescue)
            return self.stats["rescued"] == before
        timeout = self.poll_interval if due is None else min(self.poll_interval, due)
        if timeout > 0:
            room = self._room()
            if not self.burst and room > 0 and isinstance(self.store, ClaimsOnWake):
                await self._wait_and_claim(self.store, self._claim_request(room), timeout)
            elif not self.burst:
                await self._wait_or_stop(timeout)
            else:
                await self._until(self._wait_for_work(timeout), timeout)
        return False

    async def _wait_or_stop(self, timeout: float) -> None:
        """The store's wait, cancelled by :meth:`stop`: one task, so a wake-up reaches the
        claim in a loop turn or two (through _until() and _wait_for_work() it took four or
        five, ~0.1 ms after an idle spell)."""
        if self._stop.is_set():
            return  # stopped while the schedule was read: nothing is registered to cancel yet
        waiting = asyncio.ensure_future(self.store.wait(self.queues, timeout))
        self._on_stop.add(waiting.cancel)
        try:
            # The bound only guards against a store whose wait outlives its timeout.
            await asyncio.wait({waiting}, timeout=timeout + 1.0)
        finally:
            self._on_stop.discard(waiting.cancel)
            if not waiting.done():
                waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StoreError):
            await waiting

    async def _wait_and_claim(
        self, store: ClaimsOnWake, request: ClaimRequest, timeout: float
    ) -> None:
        """The idle wait with the claim sent behind it (see :class:`ClaimsOnWake`).

        A stop interrupts it through the store instead of cancelling it: the claim may already
        have run on the server, and the jobs it took go to the queue, which shutdown releases.
        """
        call = asyncio.ensure_future(store.wait_and_claim(request, timeout))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            # The bound only guards against a store that never answers.
            await asyncio.wait(
                {call, stop}, timeout=timeout + 5.0, return_when=asyncio.FIRST_COMPLETED
            )
            if not call.done():
                with contextlib.suppress(StoreError):
                    await store.interrupt_wait(self.worker_id)
                await asyncio.wait({call}, timeout=5.0)
        finally:
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop
            if not call.done():
                # The store did not answer the interruption: give up on the reply (any job the
                # claim took is rescued when its lease expires).
                call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({call})
        if call.cancelled():
            return
        try:
            jobs = call.result()
        except StoreError as exc:
            log.error("worker %s cannot wait for jobs (%s)", self.worker_id, exc)
            await self._until(asyncio.sleep(min(1.0, timeout)), None)
            return
        self._take(jobs)
        self._claimed_short = len(jobs) < request.limit

    async def _wait_for_work(self, timeout: float) -> None:
        """Until the store signals work, or (burst mode) our own endings were written."""
        waits = {asyncio.ensure_future(self.store.wait(self.queues, timeout))}
        if self.burst:
            waits.add(asyncio.ensure_future(self._progress.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            for task in waits:
                with contextlib.suppress(asyncio.CancelledError, StoreError):
                    await task

    async def _until(self, waiting: object, timeout: float | None) -> None:
        """Await ``waiting`` (a coroutine) but return early when a stop is requested."""
        task = asyncio.ensure_future(waiting)  # type: ignore[call-overload]
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait(
                {task, stop},
                timeout=None if timeout is None else timeout + 1.0,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for pending in (task, stop):
                if not pending.done():
                    pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await task
            with contextlib.suppress(asyncio.CancelledError):
                await stop

    # -- running ----------------------------------------------------------------------------

    async def _runner(self) -> None:
        while True:
            _, _, job = await self._queue.get()
            if job is None:
                return
            await self._run_one(job)
            self._slot_free.set()

    async def _run_one(self, job: Job) -> None:
        skip = self._skip.pop(job.id, None)
        if skip == "lost":
            self._inflight.pop(job.id, None)
            log.warning(
                "worker %s lost the lease of job %s before starting it; skipping it",
                self.worker_id,
                job.id,
                extra=_job_extra(job),
            )
            return
        if skip == "cancel":
            self._pending.append(
                cancelled_completion(job, 0.0, "cancelled by an operator before it started")
            )
            self._pending_event.set()
            return
        operation = self.app.operations.get(job.handler)
        context = JobContext(job=job, attempt=job.attempts, worker_id=self.worker_id)
        running = _Running(job=job, context=context, started=time.monotonic())
        self._running[job.id] = running
        running.task = asyncio.create_task(
            execute(job, operation, context=context, threads=self._threads, rand=self.rand)
        )
        try:
            completion: Completion | None = await running.task
        except Exception:
            # execute() never raises by design; if it does anyway, this job's lease will expire
            # and the rescuer retries it. The worker itself must carry on.
            log.exception("internal error running job %s", job.id, extra=_job_extra(job))
            self.stats["internal_errors"] += 1
            completion = None
        except asyncio.CancelledError:
            context.cancel()
            duration = time.monotonic() - running.started
            if running.stop_reason == "cancel":
                completion = cancelled_completion(job, duration, "cancelled by an operator")
            elif running.stop_reason == "shutdown":
                completion = interrupted_completion(job, operation, duration, self.rand)
            elif running.stop_reason == "lost":
                completion = None
            else:
                raise
        finally:
            del self._running[job.id]
        if completion is not None:
            self._pending.append(completion)
            self._pending_event.set()
        else:
            self._inflight.pop(job.id, None)

    # -- completing -------------------------------------------------------------------------

    async def _completer(self) -> None:
        """Write endings in batches; on store errors keep them and try again (fenced, so safe)."""
        failures = 0
        while True:
            if self._closing and not self._pending:
                return
            await self._pending_event.wait()
            self._pending_event.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            self._writing = True
            try:
                applied = await self.store.complete(batch)
                failures = 0
            except StoreError as exc:
                failures += 1
                delay = min(10.0, 0.05 * 2 ** min(failures, 10))
                log.error("cannot record %d job endings (%s); retrying", len(batch), exc)
                self._pending[:0] = batch
                if self._closing:
                    return  # shutdown's flush() makes the last try
                await asyncio.sleep(delay)
                self._pending_event.set()
                continue
            except asyncio.CancelledError:
                # Torn down mid-write: keep the endings for flush(). Writes are fenced, so one
                # that did land is only rejected the second time, never applied twice.
                self._pending[:0] = batch
                raise
            finally:
                self._writing = False
            if self._retries_due_until == _UNKNOWN:
                self._retries_due_until = 0.0  # now it shows whether this work retries
            for completion, ok in zip(batch, applied, strict=True):
                self._account(completion, ok)
            self._progress.set()

    def _account(self, completion: Completion, ok: bool) -> None:
        job = self._inflight.pop(completion.job_id, None)
        if job is not None:
            self.telemetry.attempt_finished(job, completion, ok)

        def extra() -> dict[str, object]:  # built only when a line is logged
            fields: dict[str, object] = (
                _job_extra(job) if job is not None else {"job_id": completion.job_id}
            )
            fields["attempt"] = completion.attempt
            return fields

        if not ok:
            self.stats["stale_writes"] += 1
            log.warning(
                "rejected a stale write for job %s: its lease was taken over",
                completion.job_id,
                extra=extra(),
            )
            return
        outcome = completion.outcome
        self.stats[outcome.value] += 1
        if outcome is Outcome.RETRY and completion.retry_in <= _RETRY_SOON:
            self._retries_due_until = max(
                self._retries_due_until, time.monotonic() + completion.retry_in + 1.0
            )
        # A retry is routine (the policy is doing its job) and so is a cancel an operator asked
        # for; a dead letter needs someone's attention. Logging retries as warnings also cost a
        # retry-heavy worker a sixth of its CPU at the usual WARNING level.
        level = logging.WARNING if outcome is Outcome.DEAD_LETTER else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "job %s attempt %d: %s%s",
                completion.job_id,
                completion.attempt,
                outcome.value,
                ""
                if outcome is Outcome.SUCCEEDED
                else f" ({completion.classification}: {completion.error_message})"
                + (f", next in {completion.retry_in:.2f}s" if outcome is Outcome.RETRY else ""),
                extra={
                    **extra(),
                    "outcome": outcome.value,
                    "classification": completion.classification,
                },
            )

    async def flush(self) -> None:
        """Write every ending produced so far (tests and shutdown)."""
        while self._pending:
            batch, self._pending = self._pending, []
            applied = await self.store.complete(batch)
            for completion, ok in zip(batch, applied, strict=True):
                self._account(completion, ok)

    # -- leases -----------------------------------------------------------------------------

    async def _every(self, interval: float, action: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.current_task()
        while True:
            await asyncio.sleep(interval)
            await self._guarded(action)
            if task is not None and task.cancelling():
                # A cancellation that reached the store call came back as a store error (a
                # driver may turn it into a dropped connection): honour it, or shutdown would
                # wait for this loop for ever (seen: a Redis worker's rescuer under CLIENT KILL).
                raise asyncio.CancelledError

    async def _heartbeat(self) -> None:
        held = {r.job.id: r for r in self._running.values()}
        waiting = [job for _, _, job in self._queue._queue if job is not None]  # type: ignore[attr-defined]
        # Every claimed job whose ending is not written yet: queued, running, and finished with
        # the write still pending (a store outage must not get finished work rescued and re-run).
        leases = [Lease(job.id, job.lease_token or "") for job in self._inflight.values()]
        if not leases:
            return
        result = await self.store.heartbeat(leases, self.lease_seconds)
        for job in waiting:
            if job.id not in result.renewed:
                self._skip[job.id] = "lost"
            elif job.id in result.cancel_requested:
                self._skip[job.id] = "cancel"
        for job_id, running in held.items():
            if self._running.get(job_id) is not running:
                continue  # it finished while the heartbeat was on its way
            if job_id not in result.renewed:
                self._interrupt(running, "lost")
                log.warning(
                    "worker %s lost the lease of job %s; stopping it",
                    self.worker_id,
                    job_id,
                    extra=_job_extra(running.job),
                )
            elif job_id in result.cancel_requested:
                self._interrupt(running, "cancel")

    def _interrupt(self, running: _Running, reason: str) -> None:
        if running.stop_reason is None:
            running.stop_reason = reason
            running.context.cancel()
            if running.task is not None:
                running.task.cancel()

    async def _rescue(self) -> None:
        rescued = await Rescuer(self.store, self.app.operations, rand=self.rand).run_once()
        self.stats["rescued"] += rescued

    async def _drain_events(self, publisher: Publisher, rounds: int = 20) -> None:
        """Deliver what the last endings wrote to the outbox (bounded: a dead sink waits for
        the next run, its events safe in the outbox)."""
        for _ in range(rounds):
            try:
                if await publisher.run_once() == 0:
                    return
            except Exception as exc:
                log.error("could not deliver the last events (%s); they stay in the outbox", exc)
                return

    async def _census(self) -> None:
        self.telemetry.job_counts(await self.store.counts())

    async def _guarded(self, action: Callable[[], Awaitable[None]]) -> None:
        try:
            await action()
        except StoreError as exc:
            log.error("worker %s: %s failed: %s", self.worker_id, action.__name__, exc)

    # -- shutdown ---------------------------------------------------------------------------

    async def _shutdown(
        self,
        runners: list[asyncio.Task[None]],
        services: list[asyncio.Task[None]],
        completer: asyncio.Task[None],
    ) -> None:
        unstarted: list[Job] = []
        while not self._queue.empty():
            _, _, job = self._queue.get_nowait()
            if job is None:
                continue
            skip = self._skip.pop(job.id, None)
            if skip == "cancel":
                # Releasing would clear the operator's cancel request and run the job later.
                self._pending.append(
                    cancelled_completion(job, 0.0, "cancelled by an operator before it started")
                )
            elif skip is None:
                unstarted.append(job)
        if unstarted:
            try:
                released = await self.store.release(
                    [Lease(job.id, job.lease_token or "") for job in unstarted]
                )
                self.stats["released"] += released
                log.info("handed back %d unstarted jobs", released)
            except StoreError as exc:
                log.error(
                    "could not hand back %d jobs (%s): their leases will expire",
                    len(unstarted),
                    exc,
                )
        for _ in runners:
            self._queue.put_nowait((2, next(self._sequence), None))
        if self._running:
            log.info(
                "waiting up to %.0fs for %d running jobs", self.shutdown_timeout, len(self._running)
            )
        _, still = await asyncio.wait(runners, timeout=self.shutdown_timeout)
        if still:
            for running in list(self._running.values()):
                self._interrupt(running, "shutdown")
            await asyncio.wait(still, timeout=5.0)
        # Let the completer write what the last jobs produced instead of cancelling it mid-write
        # (a cancelled write may never reach the store, leaving a finished job "running").
        self._closing = True
        self._pending_event.set()
        await asyncio.wait({completer}, timeout=max(self.shutdown_timeout, 5.0))
        for task in [completer, *services]:
            task.cancel()
        # Bounded: a task that swallowed its cancellation must not hold the shutdown.
        _, stuck = await asyncio.wait([completer, *services], timeout=5.0)
        for task in stuck:
            log.error("worker %s: %s ignored its cancellation", self.worker_id, task.get_name())
        for task in [completer, *services]:
            if task.done() and not task.cancelled():
                with contextlib.suppress(asyncio.CancelledError):
                    task.result()
        try:
            await self.flush()
        except StoreError as exc:
            log.error("could not record the last job endings (%s): leases will expire", exc)
