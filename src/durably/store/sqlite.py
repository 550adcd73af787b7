"""The embedded store: one SQLite file in WAL mode, safe for several worker processes on one host.

Every call runs on one dedicated thread that owns the connection, so the event loop never blocks
on the database. Writes that must see a consistent state (claims, completions, operator actions)
run in ``BEGIN IMMEDIATE`` transactions, which take SQLite's write lock up front: two processes
can never claim the same job, and no transaction has to be retried half way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from durably.errors import (
    ConfigError,
    Conflict,
    InvalidTransition,
    JobNotFound,
    KeyTaken,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from durably.events import batch_payload, event_type, processed_payload
from durably.job import (
    ACTIONS,
    EVENT_STATUSES,
    LIVE,
    Action,
    Attempt,
    AuditEntry,
    Completion,
    Event,
    Job,
    JobFilter,
    NewJob,
    Outcome,
    Status,
    decode_json,
)
from durably.store.base import (
    ActionRequest,
    ClaimRequest,
    EnqueueResult,
    HeartbeatResult,
    Lease,
)
from durably.store.sqlfiles import load_migrations, load_queries

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_Q = load_queries("sqlite")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        queue=row["queue"],
        handler=row["handler"],
        payload=decode_json(row["payload"]),
        status=Status(row["status"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        policy=json.loads(row["policy"]),
        run_at=datetime.fromtimestamp(row["run_at"], UTC),
        version=row["version"],
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        updated_at=datetime.fromtimestamp(row["updated_at"], UTC),
        key=row["key"],
        timeout=row["timeout"],
        batch_id=row["batch_id"],
        item_index=row["item_index"],
        event_scope=row["event_scope"],
        meta=json.loads(row["meta"]),
        worker_id=row["worker_id"],
        lease_token=row["lease_token"],
        lease_expires_at=_ts(row["lease_expires_at"]),
        cancel_requested=bool(row["cancel_requested"]),
        first_attempt_at=_ts(row["first_attempt_at"]),
        finished_at=_ts(row["finished_at"]),
        classification=row["classification"],
        last_error=row["last_error"],
        last_error_type=row["last_error_type"],
        result=decode_json(row["result"]),
        operator=row["operator"],
        operator_notes=row["operator_notes"],
    )


class _Wakeups:
    """Wakes waiting workers of this process when a job for their database becomes runnable.

    Other processes are seen through ``PRAGMA data_version``, which changes whenever another
    connection commits; ``wait`` checks it at a short interval.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, weakref.WeakSet[_Waiter]] = {}

    def add(self, path: str, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.setdefault(path, weakref.WeakSet()).add(waiter)

    def discard(self, path: str, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.get(path, weakref.WeakSet()).discard(waiter)

    def notify(self, path: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(path, ()))
        for waiter in waiters:
            waiter.wake()


class _Waiter:
    __slots__ = ("__weakref__", "event", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self.loop.call_soon_threadsafe(self.event.set)


_WAKEUPS = _Wakeups()


def _emit(conn: sqlite3.Connection, before: Status, after: Job, now: float) -> None:
    """Write the outbox events a change owes, inside the caller's transaction."""
    if after.status not in EVENT_STATUSES or after.event_scope is None:
        return  # events are opt-in per job: no scope, no outbox rows
    conn.execute(
        _Q["insert_event"],
        (after.id, event_type(after.event_scope), _dumps(processed_payload(after)), now, now),
    )
    if (
        after.batch_id is not None
        and before in LIVE
        and conn.execute(_Q["batch_live_count"], (after.batch_id,)).fetchone()[0] == 0
    ):
        counts = dict(conn.execute(_Q["batch_counts"], (after.batch_id,)).fetchall())
        conn.execute(
            _Q["insert_event"],
            (
                None,
                event_type(after.event_scope, "batch_completed"),
                _dumps(batch_payload(after.batch_id, counts, after.updated_at)),
                now,
                now,
            ),
        )


def _event(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        type=row["type"],
        payload=json.loads(row["payload"]),
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        job_id=row["job_id"],
        attempts=row["attempts"],
        lease_token=row["lease_token"],
    )


class SQLiteStore:
    """Jobs in one SQLite file (``sqlite:///path/to.db``; ``sqlite:///:memory:`` for tests).

    ``clock`` replaces the system clock for every timestamp and comparison (tests).
    ``synchronous`` is SQLite's ``PRAGMA synchronous``: ``FULL`` (default) survives power loss,
    ``NORMAL`` survives process crashes and is faster.
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = 10.0,
        synchronous: str = "FULL",
        wake_interval: float = 0.005,
        migrate_on_open: bool = True,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigError(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}"
            )
        self.path = path
        self.url = f"sqlite:///{path}"
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._wake_interval = wake_interval
        self._migrate_on_open = migrate_on_open
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wake_key = path if path == ":memory:" else str(Path(path).resolve())

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``sqlite:///:memory:``.

        Query parameters (``?synchronous=NORMAL&busy_timeout=5``) set constructor options.
        """
        parts = urlsplit(url)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc not in ("", "localhost") or not path:
            raise ConfigError(
                f"bad SQLite URL {url!r}: use sqlite:///relative/path.db, "
                "sqlite:////absolute/path.db or sqlite:///:memory:"
            )
        for name, values in parse_qs(parts.query).items():
            if name == "synchronous":
                options.setdefault("synchronous", values[-1])
            elif name == "busy_timeout":
                options.setdefault("busy_timeout", float(values[-1]))
            else:
                raise ConfigError(f"unknown SQLite URL option {name!r}")
        return cls(path, **options)

    # -- plumbing ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock().timestamp() if self._clock is not None else time.time()

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            parent = Path(self.path).parent
            if not parent.exists():
                raise ConfigError(f"cannot open {self.path!r}: folder {str(parent)!r} is missing")
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # only the store's own thread touches it
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None or self._executor is None:
            raise StoreError("the SQLite store is not open: call await store.open() first")
        conn = self._conn
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, conn)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreUnavailable(f"SQLite database {self.path!r} is busy: {exc}") from exc
            raise StoreError(f"SQLite error on {self.path!r}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite error on {self.path!r}: {exc}") from exc

    @contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (created if missing), then migrate it or refuse a newer schema."""
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="durably-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
        except sqlite3.Error as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise StoreUnavailable(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        if self._migrate_on_open:
            await self.migrate()
        elif await self.schema_version() > len(load_migrations("sqlite")):
            await self.migrate(dry_run=True)  # raises SchemaTooNew

    async def close(self) -> None:
        """Close the connection and its thread. Idempotent."""
        conn, executor = self._conn, self._executor
        self._conn = self._executor = None
        if conn is not None and executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        if executor is not None:
            executor.shutdown(wait=True)

    async def migrate(self, *, dry_run: bool = False) -> list[str]:
        """Apply pending migrations in one ``BEGIN IMMEDIATE`` transaction each."""
        migrations = load_migrations("sqlite")

        def work(conn: sqlite3.Connection) -> list[str]:
            conn.execute(_Q["create_migrations_table"])
            applied: list[str] = []
            current = conn.execute(_Q["schema_version"]).fetchone()[0]
            if current > len(migrations):
                raise SchemaTooNew(
                    f"the database {self.path!r} is at schema version {current}, but this "
                    f"durably knows only up to {len(migrations)}: upgrade durably"
                )
            for migration in migrations[current:]:
                applied.append(f"{migration.version:03d}_{migration.name}")
                if dry_run:
                    continue
                with self._write(conn):
                    # Re-check under the write lock: another process may have migrated.
                    if conn.execute(_Q["schema_version"]).fetchone()[0] >= migration.version:
                        continue
                    for statement in _split_statements(migration.sql):
                        conn.execute(statement)
                    conn.execute(
                        _Q["record_migration"],
                        (migration.version, migration.name, self._now()),
                    )
            return applied

        return await self._run(work)

    async def schema_version(self) -> int:
        """The highest migration applied."""

        def work(conn: sqlite3.Connection) -> int:
            conn.execute(_Q["create_migrations_table"])
            return int(conn.execute(_Q["schema_version"]).fetchone()[0])

        return await self._run(work)

    async def now(self) -> datetime:
        """The store's clock: the host's (SQLite is embedded), or the injected one."""
        return datetime.fromtimestamp(self._now(), UTC)

    # -- producers --------------------------------------------------------------------------

    @staticmethod
    def _insert_params(job: NewJob, now: float) -> dict[str, Any]:
        return {
            "queue": job.queue,
            "handler": job.handler,
            "payload": _dumps(job.payload),
            "max_attempts": job.max_attempts,
            "policy": _dumps(dict(job.policy)),
            "run_at": now + max(0.0, job.delay),
            "now": now,
            "key": job.key,
            "timeout": job.timeout,
            "batch_id": job.batch_id,
            "item_index": job.item_index,
            "event_scope": job.event_scope,
            "meta": _dumps(dict(job.meta)),
        }

    def _insert_keyless(
        self, conn: sqlite3.Connection, jobs: Sequence[NewJob], now: float
    ) -> list[EnqueueResult]:
        """Insert jobs that hold no key with one ``executemany``, then read them back.

        Without keys nothing can conflict, so every row is inserted. ``jobs.id`` is
        AUTOINCREMENT and this transaction holds the write lock, so the new ids are the
        contiguous range ending at ``last_insert_rowid()``, in input order.
        """
        conn.executemany(_Q["insert_job_plain"], [self._insert_params(j, now) for j in jobs])
        last = conn.execute(_Q["last_insert_rowid"]).fetchone()[0]
        rows = conn.execute(_Q["jobs_in_id_range"], (last - len(jobs), last)).fetchall()
        if len(rows) != len(jobs):  # pragma: no cover - guarded by the write lock
            raise StoreError(f"enqueue inserted {len(rows)} jobs, expected {len(jobs)}")
        return [EnqueueResult(_job(row), created=True) for row in rows]

    def _insert(self, conn: sqlite3.Connection, job: NewJob, now: float) -> EnqueueResult:
        row = conn.execute(_Q["insert_job"], self._insert_params(job, now)).fetchone()
        if row is not None:
            return EnqueueResult(_job(row), created=True)
        existing = conn.execute(_Q["live_job_by_key"], (job.key,)).fetchone()
        if existing is None:  # pragma: no cover - only a key conflict makes the insert a no-op
            raise StoreError(f"enqueue of {job.handler!r} inserted nothing")
        return EnqueueResult(_job(existing), created=False)

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[EnqueueResult]:
        """Insert all jobs in one transaction."""
        if not jobs:
            return []

        def work(conn: sqlite3.Connection) -> list[EnqueueResult]:
            now = self._now()
            with self._write(conn):
                if len(jobs) > 1 and all(job.key is None for job in jobs):
                    return self._insert_keyless(conn, jobs, now)
                return [self._insert(conn, job, now) for job in jobs]

        results = await self._run(work)
        _WAKEUPS.notify(self._wake_key)
        return results

    async def upsert(self, job: NewJob) -> EnqueueResult:
        """Enqueue by key, or replace the live job's content while it is not running."""
        if job.key is None:
            raise ConfigError("upsert needs a key")

        def work(conn: sqlite3.Connection) -> EnqueueResult:
            now = self._now()
            with self._write(conn):
                live = conn.execute(_Q["live_job_by_key"], (job.key,)).fetchone()
                if live is None:
                    return self._insert(conn, job, now)
                row = conn.execute(
                    _Q["upsert_live"],
                    {
                        "id": live["id"],
                        "payload": _dumps(job.payload),
                        "meta": _dumps(dict(job.meta)),
                        "policy": _dumps(dict(job.policy)),
                        "max_attempts": job.max_attempts,
                        "timeout": job.timeout,
                        "event_scope": job.event_scope,
                        "queue": job.queue,
                        "handler": job.handler,
                        "now": now,
                    },
                ).fetchone()
                return EnqueueResult(_job(row if row is not None else live), created=False)

        result = await self._run(work)
        _WAKEUPS.notify(self._wake_key)
        return result

    # -- workers ----------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> list[Job]:
        """Claim due jobs under fresh leases, with their attempt rows, in one transaction."""
        if request.limit <= 0 or not request.queues:
            return []
        queues = _dumps(list(request.queues))

        def work(conn: sqlite3.Connection) -> list[Job]:
            now = self._now()
            params: dict[str, Any] = {
                "worker_id": request.worker_id,
                "now": now,
                "lease_seconds": request.lease_seconds,
                "queues": queues,
                "limit": request.limit,
            }
            with self._write(conn):
                if request.batch_id is None:
                    rows = conn.execute(_Q["claim"], params).fetchall()
                else:
                    params["batch_id"] = request.batch_id
                    params["due_only"] = int(request.due_only)
                    rows = conn.execute(_Q["claim_batch"], params).fetchall()
                conn.executemany(
                    _Q["insert_attempt"],
                    [{"id": r["id"], "worker_id": request.worker_id, "now": now} for r in rows],
                )
            return sorted((_job(r) for r in rows), key=lambda j: (j.run_at, j.id))

        return await self._run(work)

    async def heartbeat(self, leases: Sequence[Lease], lease_seconds: float) -> HeartbeatResult:
        """Extend every lease still held."""
        if not leases:
            return HeartbeatResult(frozenset(), frozenset())

        def work(conn: sqlite3.Connection) -> HeartbeatResult:
            now = self._now()
            renewed: set[int] = set()
            cancel: set[int] = set()
            with self._write(conn):
                for lease in leases:
                    row = conn.execute(
                        _Q["heartbeat"],
                        {
                            "now": now,
                            "lease_seconds": lease_seconds,
                            "id": lease.job_id,
                            "token": lease.lease_token,
                        },
                    ).fetchone()
                    if row is not None:
                        renewed.add(row[0])
                        if row[1]:
                            cancel.add(row[0])
            return HeartbeatResult(frozenset(renewed), frozenset(cancel))

        return await self._run(work)

    async def complete(self, completions: Sequence[Completion]) -> list[bool]:
        """Apply attempt endings, fenced by lease token, in one transaction."""
        if not completions:
            return []

        def work(conn: sqlite3.Connection) -> list[bool]:
            now = self._now()
            applied: list[bool] = []
            finished: list[dict[str, Any]] = []
            with self._write(conn):
                for c in completions:
                    status = c.next_status
                    succeeded = c.outcome is Outcome.SUCCEEDED
                    row = conn.execute(
                        _Q["complete"],
                        {
                            "status": status.value,
                            "result": None if c.result is None else _dumps(c.result),
                            "classification": None if succeeded else c.classification,
                            "error_message": None if succeeded else c.error_message,
                            "error_type": None if succeeded else c.error_type,
                            "retry_in": max(0.0, c.retry_in),
                            "now": now,
                            "id": c.job_id,
                            "token": c.lease_token,
                            "require_expired": int(c.require_expired),
                        },
                    ).fetchone()
                    if row is None:
                        applied.append(False)
                        continue
                    if row["event_scope"] is not None and status in EVENT_STATUSES:
                        # The whole row only when an event is owed; emitted before the next
                        # completion so a batch's last job is seen as the last exactly once.
                        after = conn.execute(_Q["get_job"], (c.job_id,)).fetchone()
                        _emit(conn, Status.RUNNING, _job(after), now)
                    finished.append(
                        {
                            "now": now,
                            "outcome": c.row_outcome,
                            "classification": c.row_classification,
                            "error_type": c.error_type,
                            "error_message": c.error_message,
                            "duration": c.duration,
                            "id": c.job_id,
                        }
                    )
                    applied.append(True)
                conn.executemany(_Q["finish_attempt"], finished)
            return applied

        results = await self._run(work)
        if any(
            ok and c.outcome is Outcome.RETRY for ok, c in zip(results, completions, strict=True)
        ):
            _WAKEUPS.notify(self._wake_key)
        return results

    async def release(self, leases: Sequence[Lease]) -> int:
        """Hand back claimed jobs that never started, as if never claimed."""
        if not leases:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            now = self._now()
            released = 0
            with self._write(conn):
                for lease in leases:
                    row = conn.execute(
                        _Q["release"], {"now": now, "id": lease.job_id, "token": lease.lease_token}
                    ).fetchone()
                    if row is not None:
                        conn.execute(_Q["delete_attempt"], (lease.job_id,))
                        released += 1
            return released

        count = await self._run(work)
        if count:
            _WAKEUPS.notify(self._wake_key)
        return count

    async def expired(self, limit: int) -> list[Job]:
        """Running jobs whose lease has expired, oldest expiry first."""

        def work(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(_Q["expired"], (self._now(), limit)).fetchall()
            return [_job(r) for r in rows]

        return await self._run(work)

    async def next_due_in(self, queues: Sequence[str]) -> float | None:
        """Seconds until the earliest waiting job is due; None if none waits."""

        def work(conn: sqlite3.Connection) -> float | None:
            run_at = conn.execute(_Q["next_due"], (_dumps(list(queues)),)).fetchone()[0]
            return None if run_at is None else max(0.0, run_at - self._now())

        return await self._run(work)

    async def wait(self, queues: Sequence[str], timeout: float) -> bool:
        """Wait for an enqueue in this process or a commit by another one, up to ``timeout``."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop)
        _WAKEUPS.add(self._wake_key, waiter)
        try:
            version = await self._run(_data_version)
            deadline = loop.time() + max(0.0, timeout)
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(
                        waiter.event.wait(), timeout=min(remaining, self._wake_interval)
                    )
                    return True
                except TimeoutError:
                    pass
                if self.path != ":memory:" and await self._run(_data_version) != version:
                    return True
        finally:
            _WAKEUPS.discard(self._wake_key, waiter)

    # -- operators --------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job:
        """The job, or ``JobNotFound``."""

        def work(conn: sqlite3.Connection) -> Job:
            row = conn.execute(_Q["get_job"], (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            return _job(row)

        return await self._run(work)

    async def get_by_key(self, key: str) -> Job | None:
        """The live job holding ``key``, else the newest that had it."""

        def work(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(_Q["live_job_by_key"], (key,)).fetchone()
            if row is None:
                row = conn.execute(_Q["latest_job_by_key"], (key,)).fetchone()
            return None if row is None else _job(row)

        return await self._run(work)

    async def list_jobs(
        self, where: JobFilter, *, limit: int = 100, after_id: int | None = None
    ) -> list[Job]:
        """Jobs matching ``where``, newest first."""
        clauses: list[str] = []
        params: list[Any] = []
        if where.statuses is not None:
            clauses.append("status IN (SELECT value FROM json_each(?))")
            params.append(_dumps(sorted(s.value for s in where.statuses)))
        for column, value in (
            ("queue", where.queue),
            ("handler", where.handler),
            ("batch_id", where.batch_id),
            ("classification", where.classification),
            ("key", where.key),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")  # column names are the fixed tuple above
                params.append(value)
        if after_id is not None:
            clauses.append("id < ?")
            params.append(after_id)
        sql = _Q["list_jobs"].format(where=" AND ".join(clauses) or "1")
        params.append(limit)

        def work(conn: sqlite3.Connection) -> list[Job]:
            return [_job(r) for r in conn.execute(sql, params).fetchall()]

        return await self._run(work)

    async def attempts(self, job_id: int) -> list[Attempt]:
        """The job's attempts, oldest first."""

        def work(conn: sqlite3.Connection) -> list[Attempt]:
            return [
                Attempt(
                    job_id=r["job_id"],
                    number=r["number"],
                    worker_id=r["worker_id"],
                    started_at=datetime.fromtimestamp(r["started_at"], UTC),
                    finished_at=_ts(r["finished_at"]),
                    outcome=r["outcome"],
                    classification=r["classification"],
                    error_type=r["error_type"],
                    error_message=r["error_message"],
                    duration=r["duration"],
                )
                for r in conn.execute(_Q["list_attempts"], (job_id,)).fetchall()
            ]

        return await self._run(work)

    async def audit(self, job_id: int) -> list[AuditEntry]:
        """The job's audit trail, oldest first."""

        def work(conn: sqlite3.Connection) -> list[AuditEntry]:
            return [
                AuditEntry(
                    job_id=r["job_id"],
                    at=datetime.fromtimestamp(r["at"], UTC),
                    actor=r["actor"],
                    action=r["action"],
                    from_status=r["from_status"],
                    to_status=r["to_status"],
                    version=r["version"],
                    notes=r["notes"],
                )
                for r in conn.execute(_Q["list_audit"], (job_id,)).fetchall()
            ]

        return await self._run(work)

    async def act(self, request: ActionRequest) -> Job:
        """Apply one operator action, audited, in one transaction."""
        rule = ACTIONS[request.action]

        def work(conn: sqlite3.Connection) -> Job:
            now = self._now()
            with self._write(conn):
                row = conn.execute(_Q["get_job"], (request.job_id,)).fetchone()
                if row is None:
                    raise JobNotFound(request.job_id)
                before = _job(row)
                if (
                    request.expected_version is not None
                    and before.version != request.expected_version
                ):
                    raise Conflict(before.id, request.expected_version, before.version)
                cancel_running = request.action is Action.CANCEL and before.status is Status.RUNNING
                if before.status not in rule.sources and not cancel_running:
                    raise InvalidTransition(
                        before.id,
                        before.status.value,
                        request.action.value,
                        frozenset(s.value for s in rule.sources),
                    )
                params: dict[str, Any] = {"id": before.id, "now": now}
                if cancel_running:
                    after_row = conn.execute(_Q["act_request_cancel"], params).fetchone()
                elif request.action is Action.REQUEUE:
                    if before.key is not None:
                        holder = conn.execute(_Q["live_job_by_key"], (before.key,)).fetchone()
                        if holder is not None and holder["id"] != before.id:
                            raise KeyTaken(before.id, holder["id"])
                    params["reset"] = int(request.reset_attempts)
                    after_row = conn.execute(_Q["act_requeue"], params).fetchone()
                else:
                    params.update(
                        status=rule.target.value, actor=request.actor, notes=request.notes
                    )
                    after_row = conn.execute(_Q["act_end"], params).fetchone()
                after = _job(after_row)
                if after.status is not before.status:
                    _emit(conn, before.status, after, now)
                conn.execute(
                    _Q["insert_audit"],
                    (
                        after.id,
                        now,
                        request.actor,
                        request.action.value,
                        before.status.value,
                        after.status.value,
                        after.version,
                        request.notes,
                    ),
                )
                return after

        job = await self._run(work)
        if job.status is Status.PENDING:
            _WAKEUPS.notify(self._wake_key)
        return job

    async def counts(self) -> dict[tuple[str, Status], int]:
        """How many jobs per (queue, status)."""

        def work(conn: sqlite3.Connection) -> dict[tuple[str, Status], int]:
            return {(r[0], Status(r[1])): r[2] for r in conn.execute(_Q["counts"]).fetchall()}

        return await self._run(work)

    async def prune(self, older_than: float, statuses: frozenset[Status]) -> int:
        """Delete finished jobs (attempts and audit cascade) in chunks."""
        chosen = _dumps(sorted(s.value for s in statuses))

        def work(conn: sqlite3.Connection) -> int:
            cutoff = self._now() - older_than
            total = 0
            while True:
                with self._write(conn):
                    cursor = conn.execute(
                        _Q["prune"], {"cutoff": cutoff, "statuses": chosen, "limit": 1000}
                    )
                    deleted = cursor.rowcount
                total += deleted
                if deleted < 1000:
                    return total

        return await self._run(work)

    # -- outbox -----------------------------------------------------------------------------

    async def claim_events(self, limit: int, lease_seconds: float) -> list[Event]:
        """Lease due events, oldest first, never overtaking an older event of the same job."""

        def work(conn: sqlite3.Connection) -> list[Event]:
            params = {"now": self._now(), "lease_seconds": lease_seconds, "limit": limit}
            with self._write(conn):
                rows = conn.execute(_Q["claim_events"], params).fetchall()
            return sorted((_event(r) for r in rows), key=lambda e: e.id)

        return await self._run(work)

    async def ack_events(self, events: Sequence[Event]) -> int:
        """Delete delivered events (fenced by lease token)."""
        if not events:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            with self._write(conn):
                return sum(
                    conn.execute(_Q["ack_event"], (e.id, e.lease_token)).rowcount for e in events
                )

        return await self._run(work)

    async def retry_event(self, event: Event, retry_in: float, error: str) -> bool:
        """Make a failed delivery due again in ``retry_in`` seconds."""

        def work(conn: sqlite3.Connection) -> bool:
            params = {
                "now": self._now(),
                "retry_in": max(0.0, retry_in),
                "error": error[:4000],
                "id": event.id,
                "token": event.lease_token,
            }
            with self._write(conn):
                return conn.execute(_Q["retry_event"], params).rowcount == 1

        return await self._run(work)


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


@functools.cache
def _split_statements(sql: str) -> tuple[str, ...]:
    """A migration file's statements, run one by one so they share our transaction."""
    statements: list[str] = []
    buffer = ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return tuple(statements)
