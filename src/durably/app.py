"""The application object: registered operations, and the API producers and operators use.

Every method has a synchronous form (``app.enqueue``) and an asynchronous twin
(``await app.enqueue_async``). The synchronous forms run on a private event-loop thread, so they
work from scripts, Django and Flask views, and threads alike.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar, overload

from durably.batches import (
    BatchSummary,
    CompensationResult,
    batch_jobs,
    process_batch,
    summarise,
)
from durably.errors import ConfigError, PayloadError, UnknownHandler
from durably.events import Publisher, Sink, Subscriber, Subscribers
from durably.executor import Handler, Operation
from durably.job import (
    JSON,
    LIVE,
    TERMINAL,
    Action,
    Attempt,
    AuditEntry,
    Job,
    JobFilter,
    NewJob,
    Status,
    dumps_json,
)
from durably.policy import RetryPolicy
from durably.store import Store, from_url
from durably.store.base import ActionRequest, EnqueueResult
from durably.telemetry import Telemetry
from durably.worker import Worker

__all__ = ["DEFAULT_URL", "Durably", "JobSpec"]

T = TypeVar("T")
F = TypeVar("F", bound=Handler)

DEFAULT_URL = "sqlite:///durably.db"
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")
_QUEUE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def _check_name(kind: str, value: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(
            f"invalid {kind} {value!r}: use letters, digits and _ . - (and : for handlers)"
        )
    return value


class JobSpec(dict[str, Any]):
    """Keyword arguments of one :meth:`Durably.enqueue`, for :meth:`Durably.enqueue_many`.

    >>> app.enqueue_many([JobSpec(handler="send", payload={"to": 1})])  # doctest: +SKIP
    """


class _Portal:
    """A private event loop on a daemon thread, for the synchronous API."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="durably-portal", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop()).result()

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()


class Durably:
    """A durably application: where jobs are stored and which operations may run.

    >>> app = Durably("sqlite:///jobs.db")
    >>> @app.operation("notify", policy=RetryPolicy(max_attempts=5))
    ... def notify(payload: dict) -> dict: ...
    >>> job = app.enqueue("notify", {"track_id": 42}, key="track-42")  # doctest: +SKIP

    ``url`` defaults to ``$DURABLY_URL``, then ``sqlite:///durably.db``. ``store_options`` go to
    the store (``schema=`` for PostgreSQL, ``prefix=`` for Redis, ``clock=`` for tests).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        store: Callable[[], Store] | None = None,
        default_queue: str = "default",
        default_policy: RetryPolicy | None = None,
        max_payload_bytes: int = 1 << 20,
        strict: bool = True,
        telemetry: Telemetry | None = None,
        **store_options: Any,
    ) -> None:
        self.url = url or os.environ.get("DURABLY_URL") or DEFAULT_URL
        self._store_options = dict(store_options)
        self._store_factory = store or (lambda: from_url(self.url, **self._store_options))
        self._probe = self._store_factory()  # validates the URL now, not at first use
        self.default_queue = _check_name("queue", default_queue, _QUEUE)
        self.default_policy = default_policy or RetryPolicy()
        self.max_payload_bytes = max_payload_bytes
        self.strict = strict
        self.operations: dict[str, Operation] = {}
        self._stores: dict[asyncio.AbstractEventLoop, asyncio.Task[Store]] = {}
        self._stores_lock = threading.Lock()
        self._portal = _Portal()
        self.telemetry = telemetry or Telemetry()
        self.subscribers = Subscribers()
        self.sinks: list[Sink] = []

    def use_url(self, url: str, **store_options: Any) -> None:
        """Point the app at another store (for example the CLI's ``--url``).

        Store options given at construction (``schema=``, ``prefix=``) are kept unless
        overridden here. Closes the stores opened so far; the next call opens the new one.
        """
        self.close()
        self.url = url
        self._store_options.update(store_options)
        self._store_factory = lambda: from_url(self.url, **self._store_options)
        self._probe = self._store_factory()

    def __repr__(self) -> str:
        return f"Durably({self._probe.url!r}, operations={sorted(self.operations)})"

    # -- registry ---------------------------------------------------------------------------

    @overload
    def operation(self, name: F, /) -> F: ...

    @overload
    def operation(
        self,
        name: str | None = None,
        /,
        *,
        policy: RetryPolicy | None = None,
        queue: str | None = None,
    ) -> Callable[[F], F]: ...

    def operation(
        self,
        name: str | F | None = None,
        /,
        *,
        policy: RetryPolicy | None = None,
        queue: str | None = None,
    ) -> F | Callable[[F], F]:
        """Register a handler (sync or async) under ``name`` (default: the function's name).

        A handler takes the JSON payload, and optionally a :class:`~durably.JobContext` second.
        """
        if callable(name):
            return self.operation()(name)

        def register(fn: F) -> F:
            self.register(name or fn.__name__, fn, policy=policy, queue=queue)
            return fn

        return register

    def register(
        self,
        name: str,
        fn: Handler,
        *,
        policy: RetryPolicy | None = None,
        queue: str | None = None,
    ) -> Operation:
        """Register ``fn`` under ``name``; the non-decorator form of :meth:`operation`."""
        _check_name("operation name", name, _NAME)
        if name in self.operations and self.operations[name].fn is not fn:
            raise ConfigError(f"an operation named {name!r} is already registered")
        op = Operation.build(
            name,
            fn,
            policy or self.default_policy,
            _check_name("queue", queue or self.default_queue, _QUEUE),
        )
        self.operations[name] = op
        return op

    def queues(self) -> tuple[str, ...]:
        """Every queue some registered operation uses (the default queue if none)."""
        found = sorted({op.queue for op in self.operations.values()})
        return tuple(found) or (self.default_queue,)

    # -- stores -----------------------------------------------------------------------------

    async def store_async(self) -> Store:
        """This event loop's store, opened (and migrated) on first use."""
        loop = asyncio.get_running_loop()
        with self._stores_lock:
            opening = self._stores.get(loop)
            if opening is None:
                store = self._probe if not self._stores else self._store_factory()
                opening = loop.create_task(self._open(store))
                self._stores[loop] = opening
        try:
            # Every caller on this loop waits for the same open(): none gets a half-open store.
            return await asyncio.shield(opening)
        except BaseException:
            if opening.done():
                with self._stores_lock:
                    if self._stores.get(loop) is opening:
                        del self._stores[loop]
            raise

    @staticmethod
    async def _open(store: Store) -> Store:
        await store.open()
        return store

    def store(self) -> Store:
        """The synchronous API's store (on the private loop)."""
        return self._portal.call(self.store_async())

    async def close_async(self) -> None:
        """Close this loop's store."""
        loop = asyncio.get_running_loop()
        with self._stores_lock:
            opening = self._stores.pop(loop, None)
        if opening is not None:
            try:
                store = await opening
            except Exception:  # it never opened: nothing to close
                return
            await store.close()

    def close(self) -> None:
        """Close every store and the private loop. The app can be used again afterwards."""
        if self._portal._loop is not None:
            self._portal.call(self.close_async())
        self._portal.close()
        with self._stores_lock:
            self._stores.clear()
            self._probe = self._store_factory()

    def __enter__(self) -> Durably:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._portal.call(coro)

    # -- producing --------------------------------------------------------------------------

    def _new_job(
        self,
        handler: str | Handler,
        payload: JSON = None,
        *,
        key: str | None = None,
        queue: str | None = None,
        delay: float | None = None,
        policy: RetryPolicy | None = None,
        timeout: float | None = None,
        batch_id: str | None = None,
        item_index: int | None = None,
        event_scope: str | None = None,
        meta: Mapping[str, JSON] | None = None,
    ) -> NewJob:
        name = handler if isinstance(handler, str) else getattr(handler, "__name__", "")
        op = self.operations.get(name)
        if op is None and (self.strict or not _NAME.match(name)):
            known = ", ".join(sorted(self.operations)) or "none"
            raise UnknownHandler(
                f"no operation named {name!r} is registered (registered: {known}); "
                "register it with @app.operation, or create the app with strict=False "
                "to enqueue for workers that have it"
            )
        chosen = policy or (op.policy if op is not None else self.default_policy)
        encoded = _check_payload(payload, self.max_payload_bytes, "payload")
        if meta is not None:
            _check_payload(dict(meta), self.max_payload_bytes, "meta")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 512):
            raise ConfigError("key must be a non-empty string of at most 512 characters")
        if delay is not None and delay < 0:
            raise ConfigError(f"delay must not be negative, not {delay}")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout}")
        return NewJob(
            handler=name,
            payload=payload,
            queue=_check_name("queue", queue or (op.queue if op else self.default_queue), _QUEUE),
            key=key,
            max_attempts=chosen.max_attempts,
            policy=_snapshot(chosen),
            delay=chosen.initial_delay if delay is None else delay,
            timeout=timeout if timeout is not None else chosen.timeout,
            batch_id=batch_id,
            item_index=item_index,
            event_scope=event_scope,
            meta=dict(meta or {}),
            payload_json=encoded,
        )

    async def enqueue_async(
        self,
        handler: str | Handler,
        payload: JSON = None,
        *,
        connection: Any = None,
        **options: Any,
    ) -> Job:
        """Store one job; with ``key``, return the live job holding that key instead.

        Options: ``key``, ``queue``, ``delay`` (seconds), ``policy``, ``timeout``, ``batch_id``,
        ``item_index``, ``event_scope``, ``meta``. With ``connection`` (PostgreSQL: a psycopg
        ``AsyncConnection``) the job is written in the caller's transaction.
        """
        new = self._new_job(handler, payload, **options)
        if connection is not None:
            return (await self._enqueue_with_async(connection, [new]))[0].job
        store = await self.store_async()
        return (await store.enqueue([new]))[0].job

    def enqueue(
        self,
        handler: str | Handler,
        payload: JSON = None,
        *,
        connection: Any = None,
        **options: Any,
    ) -> Job:
        """Synchronous :meth:`enqueue_async`. With ``connection`` (a psycopg ``Connection``) the
        job is written in the caller's transaction and exists only if it commits."""
        new = self._new_job(handler, payload, **options)
        if connection is not None:
            return self._enqueue_with(connection, [new])[0].job
        return self._sync(self._enqueue_new([new]))[0].job

    async def _enqueue_new(self, jobs: Sequence[NewJob]) -> list[EnqueueResult]:
        store = await self.store_async()
        return await store.enqueue(jobs)

    def _enqueue_with(self, connection: Any, jobs: Sequence[NewJob]) -> list[EnqueueResult]:
        method = getattr(self._probe, "enqueue_with", None)
        if method is None:
            raise ConfigError(
                f"transactional enqueue (connection=...) needs PostgreSQL; this app uses "
                f"{self._probe.url}"
            )
        result: list[EnqueueResult] = method(connection, jobs)
        return result

    async def _enqueue_with_async(
        self, connection: Any, jobs: Sequence[NewJob]
    ) -> list[EnqueueResult]:
        method = getattr(self._probe, "enqueue_with_async", None)
        if method is None:
            raise ConfigError(
                f"transactional enqueue (connection=...) needs PostgreSQL; this app uses "
                f"{self._probe.url}"
            )
        result: list[EnqueueResult] = await method(connection, jobs)
        return result

    def _new_jobs(self, specs: Iterable[Mapping[str, Any]]) -> list[NewJob]:
        """:meth:`_new_job` for each spec. Specs naming only a handler and a payload (the usual
        bulk enqueue) share one checked template per handler: only the payload is checked and
        encoded per job, which more than halves the per-job cost of a big ``enqueue_many``."""
        jobs: list[NewJob] = []
        templates: dict[str | Handler, NewJob] = {}
        for spec in specs:
            handler = spec.get("handler")
            if handler is None or len(spec) > (2 if "payload" in spec else 1):
                jobs.append(self._new_job(**dict(spec)))
                continue
            template = templates.get(handler)
            if template is None:
                template = templates[handler] = self._new_job(handler)
            payload = spec.get("payload")
            jobs.append(
                NewJob(
                    template.handler,
                    payload,
                    template.queue,
                    None,
                    template.max_attempts,
                    template.policy,
                    template.delay,
                    template.timeout,
                    None,
                    None,
                    None,
                    {},
                    _check_payload(payload, self.max_payload_bytes, "payload"),
                )
            )
        return jobs

    async def enqueue_many_async(
        self, specs: Iterable[Mapping[str, Any]], *, connection: Any = None
    ) -> list[Job]:
        """Store many jobs in one round trip; each spec holds :meth:`enqueue` arguments."""
        jobs = self._new_jobs(specs)
        if connection is not None:
            return [r.job for r in await self._enqueue_with_async(connection, jobs)]
        return [r.job for r in await self._enqueue_new(jobs)]

    def enqueue_many(
        self, specs: Iterable[Mapping[str, Any]], *, connection: Any = None
    ) -> list[Job]:
        """Synchronous :meth:`enqueue_many_async`."""
        jobs = self._new_jobs(specs)
        if connection is not None:
            return [r.job for r in self._enqueue_with(connection, jobs)]
        return [r.job for r in self._sync(self._enqueue_new(jobs))]

    async def upsert_async(
        self, handler: str | Handler, payload: JSON, *, key: str, **options: Any
    ) -> Job:
        """Enqueue by key, or replace the live job's payload while it is not running."""
        new = self._new_job(handler, payload, key=key, **options)
        store = await self.store_async()
        return (await store.upsert(new)).job

    def upsert(self, handler: str | Handler, payload: JSON, *, key: str, **options: Any) -> Job:
        """Synchronous :meth:`upsert_async`."""
        return self._sync(self.upsert_async(handler, payload, key=key, **options))

    # -- reading ----------------------------------------------------------------------------

    async def get_async(self, job_id: int) -> Job:
        """The job, or :class:`~durably.errors.JobNotFound`."""
        return await (await self.store_async()).get(job_id)

    def get(self, job_id: int) -> Job:
        """Synchronous :meth:`get_async`."""
        return self._sync(self.get_async(job_id))

    async def get_by_key_async(self, key: str) -> Job | None:
        """The live job holding ``key``, else the newest that had it."""
        return await (await self.store_async()).get_by_key(key)

    def get_by_key(self, key: str) -> Job | None:
        """Synchronous :meth:`get_by_key_async`."""
        return self._sync(self.get_by_key_async(key))

    async def jobs_async(
        self, where: JobFilter | None = None, *, limit: int = 100, after_id: int | None = None
    ) -> list[Job]:
        """Jobs matching ``where``, newest first."""
        store = await self.store_async()
        return await store.list_jobs(where or JobFilter(), limit=limit, after_id=after_id)

    def jobs(
        self, where: JobFilter | None = None, *, limit: int = 100, after_id: int | None = None
    ) -> list[Job]:
        """Synchronous :meth:`jobs_async`."""
        return self._sync(self.jobs_async(where, limit=limit, after_id=after_id))

    async def attempts_async(self, job_id: int) -> list[Attempt]:
        """The job's attempts, oldest first."""
        return await (await self.store_async()).attempts(job_id)

    def attempts(self, job_id: int) -> list[Attempt]:
        """Synchronous :meth:`attempts_async`."""
        return self._sync(self.attempts_async(job_id))

    async def audit_async(self, job_id: int) -> list[AuditEntry]:
        """The job's operator audit trail, oldest first."""
        return await (await self.store_async()).audit(job_id)

    def audit(self, job_id: int) -> list[AuditEntry]:
        """Synchronous :meth:`audit_async`."""
        return self._sync(self.audit_async(job_id))

    async def stats_async(self) -> dict[tuple[str, Status], int]:
        """Job counts per (queue, status)."""
        return await (await self.store_async()).counts()

    def stats(self) -> dict[tuple[str, Status], int]:
        """Synchronous :meth:`stats_async`."""
        return self._sync(self.stats_async())

    # -- operating --------------------------------------------------------------------------

    async def act_async(
        self,
        job_id: int,
        action: Action,
        *,
        actor: str,
        notes: str | None = None,
        expected_version: int | None = None,
        reset_attempts: bool = False,
    ) -> Job:
        """Apply an operator action, audited (see :data:`durably.job.ACTIONS`)."""
        if not actor or not actor.strip():
            raise ConfigError("an operator action needs an actor (who is acting)")
        store = await self.store_async()
        return await store.act(
            ActionRequest(
                job_id=job_id,
                action=Action(action),
                actor=actor,
                notes=notes,
                expected_version=expected_version,
                reset_attempts=reset_attempts,
            )
        )

    async def cancel_async(
        self,
        job_id: int,
        *,
        actor: str = "api",
        notes: str | None = None,
        expected_version: int | None = None,
    ) -> Job:
        """Cancel a waiting or dead-lettered job; ask a running job's worker to stop it."""
        return await self.act_async(
            job_id, Action.CANCEL, actor=actor, notes=notes, expected_version=expected_version
        )

    async def resolve_async(
        self,
        job_id: int,
        *,
        actor: str,
        notes: str | None = None,
        expected_version: int | None = None,
    ) -> Job:
        """Mark a dead-lettered job as handled by a person (``actor``), with ``notes``."""
        return await self.act_async(
            job_id, Action.RESOLVE, actor=actor, notes=notes, expected_version=expected_version
        )

    async def abandon_async(
        self,
        job_id: int,
        *,
        actor: str,
        notes: str | None = None,
        expected_version: int | None = None,
    ) -> Job:
        """Give up on a dead-lettered job on purpose, with ``notes`` saying why."""
        return await self.act_async(
            job_id, Action.ABANDON, actor=actor, notes=notes, expected_version=expected_version
        )

    async def requeue_async(
        self,
        job_id: int,
        *,
        actor: str = "api",
        notes: str | None = None,
        reset_attempts: bool = False,
        expected_version: int | None = None,
    ) -> Job:
        """Run a dead-lettered, cancelled, abandoned or retrying job again now."""
        return await self.act_async(
            job_id,
            Action.REQUEUE,
            actor=actor,
            notes=notes,
            reset_attempts=reset_attempts,
            expected_version=expected_version,
        )

    def cancel(
        self,
        job_id: int,
        *,
        actor: str = "api",
        notes: str | None = None,
        expected_version: int | None = None,
    ) -> Job:
        """Cancel a waiting or dead-lettered job; ask a running job's worker to stop it."""
        return self._sync(
            self.cancel_async(job_id, actor=actor, notes=notes, expected_version=expected_version)
        )

    def resolve(
        self,
        job_id: int,
        *,
        actor: str,
        notes: str | None = None,
        expected_version: int | None = None,
    ) -> Job:
        """Mark a dead-lettered job as handled by a person (``actor``), with ``notes``."""
        return self._sync(
            self.resolve_async(job_id, actor=actor, notes=notes, expected_version=expected_version)
        )

    def abandon(
        self,
        job_id: int,
        *,
        actor: str,
        notes: str | None = None,
        expected_version: int | None = None,
    ) -> Job:
        """Give up on a dead-lettered job on purpose, with ``notes`` saying why."""
        return self._sync(
            self.abandon_async(job_id, actor=actor, notes=notes, expected_version=expected_version)
        )

    def requeue(
        self,
        job_id: int,
        *,
        actor: str = "api",
        notes: str | None = None,
        reset_attempts: bool = False,
        expected_version: int | None = None,
    ) -> Job:
        """Run a dead-lettered, cancelled, abandoned or retrying job again now."""
        return self._sync(
            self.requeue_async(
                job_id,
                actor=actor,
                notes=notes,
                reset_attempts=reset_attempts,
                expected_version=expected_version,
            )
        )

    async def requeue_many_async(
        self,
        where: JobFilter,
        *,
        actor: str,
        notes: str | None = None,
        reset_attempts: bool = False,
        limit: int = 10_000,
    ) -> list[Job]:
        """Requeue every job matching ``where`` (each audited); returns the requeued jobs.

        Jobs that change status meanwhile are skipped, not forced.
        """
        from durably.errors import Conflict, InvalidTransition

        store = await self.store_async()
        requeued: list[Job] = []
        after: int | None = None
        while len(requeued) < limit:
            page = await store.list_jobs(where, limit=min(500, limit), after_id=after)
            if not page:
                break
            for job in page:
                try:
                    requeued.append(
                        await self.act_async(
                            job.id,
                            Action.REQUEUE,
                            actor=actor,
                            notes=notes,
                            reset_attempts=reset_attempts,
                            expected_version=job.version,
                        )
                    )
                except (Conflict, InvalidTransition):
                    continue
            after = page[-1].id
        return requeued

    def requeue_many(
        self,
        where: JobFilter,
        *,
        actor: str = "api",
        notes: str | None = None,
        reset_attempts: bool = False,
        limit: int = 10_000,
    ) -> list[Job]:
        """Synchronous :meth:`requeue_many_async`."""
        return self._sync(
            self.requeue_many_async(
                where, actor=actor, notes=notes, reset_attempts=reset_attempts, limit=limit
            )
        )

    async def prune_async(self, older_than: float, statuses: Iterable[Status] | None = None) -> int:
        """Delete finished jobs older than ``older_than`` seconds (terminal statuses by default)."""
        store = await self.store_async()
        return await store.prune(older_than, frozenset(statuses or TERMINAL))

    def prune(self, older_than: float, statuses: Iterable[Status] | None = None) -> int:
        """Synchronous :meth:`prune_async`."""
        return self._sync(self.prune_async(older_than, statuses))

    # -- batches (seed 001) -----------------------------------------------------------------

    async def enqueue_batch_async(
        self,
        batch_id: str,
        handler: str | Handler,
        items: Iterable[JSON],
        **options: Any,
    ) -> list[Job]:
        """One job per item, numbered by ``item_index``, stored in one round trip."""
        if not isinstance(batch_id, str) or not 0 < len(batch_id) <= 200:
            raise ConfigError("batch_id must be a non-empty string of at most 200 characters")
        specs = [
            {**options, "handler": handler, "payload": item, "batch_id": batch_id, "item_index": i}
            for i, item in enumerate(items)
        ]
        return await self.enqueue_many_async(specs)

    def enqueue_batch(
        self, batch_id: str, handler: str | Handler, items: Iterable[JSON], **options: Any
    ) -> list[Job]:
        """Synchronous :meth:`enqueue_batch_async`."""
        return self._sync(self.enqueue_batch_async(batch_id, handler, list(items), **options))

    async def batch_async(self, batch_id: str) -> BatchSummary:
        """Counts by status and the failing items (with reasons) of a batch."""
        return summarise(batch_id, await batch_jobs(self, batch_id))

    def batch(self, batch_id: str) -> BatchSummary:
        """Synchronous :meth:`batch_async`."""
        return self._sync(self.batch_async(batch_id))

    async def process_batch_async(self, batch_id: str) -> CompensationResult:
        """Run the batch's pending and retrying items now (see ``batches.process_batch``)."""
        return await process_batch(self, batch_id)

    def process_batch(self, batch_id: str) -> CompensationResult:
        """Synchronous :meth:`process_batch_async`."""
        return self._sync(self.process_batch_async(batch_id))

    # -- hurl and cancel by key (seed 003) ------------------------------------------------------

    async def hurl_async(
        self,
        key: str,
        scope: str | None,
        handler: str | Handler,
        params: JSON = None,
        *,
        retries: int | None = None,
        initial_delay: float | None = None,
        interval: float | None = None,
        **options: Any,
    ) -> Job:
        """Keep calling ``handler(params)`` until it succeeds: keyed, idempotent, resumable.

        ``retries=None`` retries without limit; ``interval`` makes every retry wait that many
        seconds (a fixed-interval policy, as the rocks of seed 003 with 30 s); otherwise the
        operation's policy applies. A live job with this key has its params replaced while it
        is not running (``upsert``) and is returned. Outcomes go to ``<scope>.processed``.
        """
        name = handler if isinstance(handler, str) else getattr(handler, "__name__", "")
        op = self.operations.get(name)
        policy = options.pop("policy", None) or (op.policy if op else self.default_policy)
        changes: dict[str, Any] = {"max_attempts": None if retries is None else retries + 1}
        if interval is not None:
            changes.update(fixed=interval, jitter="none")
        if initial_delay is not None:
            changes["initial_delay"] = initial_delay
        return await self.upsert_async(
            handler, params, key=key, policy=policy.replace(**changes), event_scope=scope, **options
        )

    def hurl(
        self,
        key: str,
        scope: str | None,
        handler: str | Handler,
        params: JSON = None,
        *,
        retries: int | None = None,
        initial_delay: float | None = None,
        interval: float | None = None,
        **options: Any,
    ) -> Job:
        """Synchronous :meth:`hurl_async`."""
        return self._sync(
            self.hurl_async(
                key,
                scope,
                handler,
                params,
                retries=retries,
                initial_delay=initial_delay,
                interval=interval,
                **options,
            )
        )

    async def cancel_key_async(
        self, key: str, *, actor: str = "api", notes: str | None = None
    ) -> Job | None:
        """Cancel the live job holding ``key`` (a running one is asked to stop).

        Returns the job after the action, or None when no live job holds the key.
        """
        job = await self.get_by_key_async(key)
        if job is None or job.status not in LIVE:
            return None
        return await self.act_async(job.id, Action.CANCEL, actor=actor, notes=notes)

    def cancel_key(self, key: str, *, actor: str = "api", notes: str | None = None) -> Job | None:
        """Synchronous :meth:`cancel_key_async`. Seed 003 calls this ``break``."""
        return self._sync(self.cancel_key_async(key, actor=actor, notes=notes))

    break_ = cancel_key

    # -- outcome events ---------------------------------------------------------------------

    def subscribe(self, scope: str, callback: Subscriber) -> None:
        """Call ``callback(event)`` (sync or async) for every ``<scope>.*`` event.

        Events are delivered by the publisher that runs beside this app's workers, at least
        once and in order per job; ``"*"`` subscribes to every scope.
        """
        self.subscribers.add(scope, callback)

    def add_sink(self, sink: Sink) -> None:
        """Deliver every event to ``sink`` too (a :class:`~durably.events.RedisStreamSink`,
        :class:`~durably.events.WebhookSink`, or your own)."""
        self.sinks.append(sink)

    def all_sinks(self) -> list[Sink]:
        """The sinks a publisher for this app delivers to (subscribers first)."""
        return ([self.subscribers] if self.subscribers else []) + list(self.sinks)

    async def publisher_async(self, **options: Any) -> Publisher:
        """A :class:`~durably.events.Publisher` for this app's sinks, on this loop's store."""
        options.setdefault("telemetry", self.telemetry)
        return Publisher(await self.store_async(), self.all_sinks(), **options)

    # -- working ----------------------------------------------------------------------------

    def worker(self, **options: Any) -> Worker:
        """A :class:`~durably.worker.Worker` for this app (see its options)."""
        return Worker(self, **options)

    def run_worker(self, **options: Any) -> dict[str, int]:
        """Run a worker in this thread until SIGTERM/SIGINT (or drained, with ``burst=True``).

        Returns the worker's counters.
        """

        async def main() -> dict[str, int]:
            worker = self.worker(**options)
            try:
                await worker.run(
                    install_signals=threading.current_thread() is threading.main_thread()
                )
            finally:
                await self.close_async()
            return dict(worker.stats)

        return asyncio.run(main())


def _check_payload(value: JSON, limit: int, what: str) -> str:
    """``value`` as compact JSON, or :class:`PayloadError` when it is not JSON or too large."""
    try:
        encoded = dumps_json(value)
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"{what} must be JSON (dict, list, str, number, bool, None): {exc}"
        ) from exc
    except RecursionError as exc:
        raise PayloadError(f"{what} is circular or nested too deeply to be JSON") from exc
    # A character is at most 4 bytes of UTF-8: most payloads need no byte count at all.
    if len(encoded) * 4 > limit and len(size := encoded.encode()) > limit:
        raise PayloadError(f"{what} is {len(size)} bytes encoded; the limit is {limit} bytes")
    return encoded


def _snapshot(policy: RetryPolicy) -> Mapping[str, JSON]:
    """The policy's snapshot, built once per policy: enqueueing in bulk reuses it (stores only
    read it)."""
    try:
        return _cached_snapshot(policy)
    except TypeError:  # a policy holding an unhashable value (say a list for retry_on)
        return policy.to_dict()


@functools.lru_cache(maxsize=256)
def _cached_snapshot(policy: RetryPolicy) -> Mapping[str, JSON]:
    return policy.to_dict()
