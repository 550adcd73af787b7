"""Huey 3.5 on SQLite, Redis and PostgreSQL, run through the side-by-side harness.

The module is both the adapters (imported by the harness) and the Huey application that the
workers import: ``python -m huey.bin.huey_consumer bench.peers.huey_peer.huey``, with the store
and namespace in the ``DURABLY_HUEY_*`` environment variables that :meth:`_HueyAdapter.env`
returns. A bare import (no environment) builds an in-memory Huey, so nothing is created.

Settings, and why:

* Workers (``-k``/``-w``), chosen on W1 processed/s with 2,000 to 5,000 no-ops on this 2-core
  machine, shared with other benchmarks (runs of one setting varied by up to 2.5x, so only
  differences that held over repeats count):

  - SQLite: **4 threads**. 1 thread 520-850/s, 2: 875, 4: 1,210-1,450, 8: 1,250-1,350,
    16: 1,210; processes (2, 4): 625-780, as the processes contend for SQLite's write lock.
  - Redis: **4 threads**. 1 thread 1,290-1,300/s, 2: 1,620, 4: 1,560-2,080, 8: 1,410-2,100,
    16: 2,100; 4 processes 1,570-2,150 at five times the memory.
  - PostgreSQL with SqlHuey (not run, see below): 8 threads was its best. 1 thread 155/s,
    2: 215-225, 4: 285-420, 8: 280-435, 16: 325-410, 32: 450; processes (2, 4): 260-650. It
    plateaus from 4 threads: each job is two transactions (the dequeue and the revoke-key
    delete), about eight round trips through peewee.
  - PostgreSQL with ``PostgresHuey`` (:class:`PostgresAdapter`): **4 processes**.
    Threads (1, 2, 4): 500-950/s; 2 processes 680-1,270, 4: 950-2,530, 8: 1,730.
  - Greenlets not tried: gevent is not installed, and ``huey_consumer`` does not monkey-patch,
    which Huey's docs leave to a wrapper script of the user's.
* Polling: ``-d 0.001 -m 0.001 -b 1``: an idle worker of a polling store (SQLite)
  looks every millisecond and never backs off. Huey validates only ``backoff >= 1`` and takes
  any positive delay; below a millisecond the empty polls spin for nothing (durably's own SQLite
  fallback poll is 5 ms). It costs: idle, 4 SQLite threads use 14% of a core. Redis
  (``BRPOP``) and ``PostgresHuey`` (``LISTEN``/``NOTIFY``) block instead (0% idle); ``-d``
  then only paces retries after errors.
* Scheduler: ``-s 1``, the smallest interval Huey accepts (an integer, a factor of 60). It is
  also the granularity of every delayed job: W2's retries.
* Periodic tasks off (``-n``) since there are none, and ``-q`` (warnings only): at the default
  INFO level Huey logs two lines per job, much of a no-op job's cost.
* ``results=False``: the tasks return nothing to read, so Huey keeps no result store.
* Retries: ``@huey.task(retries=2, retry_delay=0.01, context=True)``; the attempt number is
  Huey's own (``3 - task.retries``: Huey decrements ``retries`` as it requeues). Huey puts a
  failed task with a ``retry_delay`` in its schedule with ``eta = failure + 10 ms``, and only the
  scheduler moves it back, once a second, to the tail of the queue: the real delay is 10 ms to
  1 s plus the wait behind every job already queued (W2's retries wait behind the first attempts
  of later jobs: seconds at 3,000 jobs). ``retry_delay=0`` would requeue at once, which is no
  delay at all.
* Bulk enqueue: ``TaskWrapper.map(keys)``, Huey's only bulk call; it enqueues one message per
  key (one ``LPUSH``, one SQL transaction): Huey has no batched enqueue.
* W4's backlog: ``Huey.add_schedule(task.s(key, delay=3600))`` per key. Huey's documented
  ``TaskWrapper.schedule`` puts a job due later in the queue, and a worker moves it to the
  schedule with this same ``add_schedule`` call; doing it directly leaves the store as
  ``schedule`` would, without keeping the consumer busy for minutes (200,000 moves at about
  2,500/s on Redis outlast the harness's 60 s warm-up).
* Stop: Huey's consumer shuts down gracefully on SIGINT (its default ``-g INT``); SIGTERM
  interrupts running tasks.
* Namespaces: SQLite, a file in the adapter's working directory; Redis, a Huey name holding the
  run's tag (Huey's keys are ``huey.<kind>.<name>``), so teardown deletes ``huey.*.<name>*``
  found with ``SCAN MATCH``; PostgreSQL, a schema of the run's own (``search_path`` on every
  connection), dropped with its tables.
* PostgreSQL: Huey 3.5's own ``PostgresHuey`` (psycopg 3, ``LISTEN``/``NOTIFY``, ``SKIP
  LOCKED``). The older ``huey.contrib.sql_huey.SqlHuey`` on peewee polls and ran about a third
  as fast here (W1 280-435/s at its best, 8 threads; 342/s at full scale), so it is not run:
  the point is each peer at its best.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import psycopg
import redis
from huey import Huey, MemoryHuey, PostgresHuey, RedisHuey, SqliteHuey
from huey.api import Task, TaskWrapper
from psycopg import sql

from bench.peers import harness
from bench.workloads import PG_URL, REDIS_URL

__all__ = [
    "STORE_ENV",
    "TASKS",
    "PostgresAdapter",
    "RedisAdapter",
    "SqliteAdapter",
    "flaky",
    "huey",
    "later",
    "make_huey",
    "noop",
    "stamp",
]

STORE_ENV = "DURABLY_HUEY_STORE"
"""Which Huey a worker builds: ``sqlite``, ``redis`` or ``postgres``."""
NAME_ENV = "DURABLY_HUEY_NAME"
"""The Huey name (its queue), holding the run's tag."""
TARGET_ENV = "DURABLY_HUEY_TARGET"
"""The SQLite file, the Redis URL or the PostgreSQL URL."""
SCHEMA_ENV = "DURABLY_HUEY_SCHEMA"
"""The PostgreSQL schema of the run."""
RETRIES = harness.SUCCEED_ON - 1
"""Retries after the first attempt: three attempts in all."""
POLL_DELAY = 0.001
"""``-d`` and ``-m``: a polling worker's delay between empty polls (see the module docstring)."""
SCAN_COUNT = 1_000
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def noop(key: int) -> None:
    """W1's job: only records that it ran."""
    harness.record("noop", key, 1)


def flaky(key: int, task: Task) -> None:
    """W2's job: fails until Huey's own retry counter says this is the third attempt."""
    # Huey decrements ``task.retries`` each time it requeues a failed task: 2, 1, 0.
    attempt = RETRIES + 1 - task.retries
    harness.record("flaky", key, attempt)
    if attempt < harness.SUCCEED_ON:
        raise RuntimeError(f"flaky job {key}: failing attempt {attempt} on purpose")


def stamp(key: int, enqueued_at: float) -> None:
    """W3/W4's job: records with the time it was enqueued."""
    harness.record("stamp", key, 1, enqueued_at)


def later(key: int) -> None:
    """W4's backlog job, due an hour ahead: must never run during the benchmark."""
    harness.record("later", key, 1)


def _search_path(schema: str) -> str:
    if not _IDENTIFIER.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    return f"-c search_path={schema}"


def make_huey(
    store: str, name: str, target: str = "", schema: str = ""
) -> tuple[Huey, dict[str, TaskWrapper]]:
    """The Huey of ``store`` named ``name``, and its four tasks by name."""
    app: Huey
    if store == "sqlite":
        app = SqliteHuey(name, filename=target, results=False)
    elif store == "redis":
        app = RedisHuey(name, url=target, results=False)
    elif store == "postgres":
        app = PostgresHuey(name, dsn=target, options=_search_path(schema), results=False)
    elif store == "memory":
        app = MemoryHuey(name, results=False)
    else:
        raise ValueError(f"unknown Huey store {store!r}")
    tasks = {
        "noop": app.task()(noop),
        "flaky": app.task(retries=RETRIES, retry_delay=harness.RETRY_FIXED, context=True)(flaky),
        "stamp": app.task()(stamp),
        "later": app.task()(later),
    }
    return app, tasks


huey, TASKS = make_huey(
    os.environ.get(STORE_ENV, "memory"),
    os.environ.get(NAME_ENV, "durably_bench"),
    os.environ.get(TARGET_ENV, ""),
    os.environ.get(SCHEMA_ENV, ""),
)
"""The worker's Huey, from the environment (in memory for a bare import)."""


class _HueyAdapter(harness.Adapter):
    """What the three stores share: the consumer's command line and the enqueue calls."""

    peer: ClassVar[str] = "huey"
    distribution: ClassVar[str] = "huey"
    stop_signal: ClassVar[int] = signal.SIGINT
    kind: ClassVar[str]
    """The ``STORE_ENV`` value."""
    worker_type: ClassVar[str] = "thread"
    """``-k``: thread, process or greenlet."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.queue_name = f"durably_bench_{self.tag}"
        self._app: Huey | None = None
        self._wrappers: dict[str, TaskWrapper] = {}

    def target(self) -> str:
        """The file or URL of the store."""
        raise NotImplementedError

    def schema(self) -> str:
        """The PostgreSQL schema, if any."""
        return ""

    def _client(self) -> dict[str, TaskWrapper]:
        if self._app is None:
            self._app, self._wrappers = make_huey(
                self.kind, self.queue_name, self.target(), self.schema()
            )
        return self._wrappers

    def env(self) -> dict[str, str]:
        """The store, the Huey name, the file or URL and the schema."""
        return {
            STORE_ENV: self.kind,
            NAME_ENV: self.queue_name,
            TARGET_ENV: self.target(),
            SCHEMA_ENV: self.schema(),
        }

    def worker_argv(self, concurrency: int) -> list[str]:
        """``huey_consumer`` with ``concurrency`` workers of :attr:`worker_type`."""
        delay = str(POLL_DELAY)
        return [
            sys.executable,
            "-m",
            "huey.bin.huey_consumer",
            f"{__name__}.huey",
            "--workers",
            str(concurrency),
            "--worker-type",
            self.worker_type,
            "--delay",
            delay,
            "--max-delay",
            delay,
            "--backoff",
            "1",
            "--scheduler-interval",
            "1",
            "--no-periodic",
            "--quiet",
        ]

    def enqueue_bulk(self, task: str, keys: Sequence[int]) -> None:
        """``TaskWrapper.map``: Huey's bulk call (one message per key)."""
        self._client()[task].map(keys)

    def enqueue_stamp(self, key: int, enqueued_at: float) -> None:
        """Call the task: one message."""
        self._client()["stamp"](key, enqueued_at)

    def schedule_later(self, keys: Sequence[int], delay: float) -> None:
        """``Huey.add_schedule(task.s(key, delay=...))`` per key: Huey has no bulk schedule.

        ``TaskWrapper.schedule`` would put each job in the queue, for a worker to move to the
        schedule; ``add_schedule`` is the call that worker makes, made here directly.
        """
        wrapper = self._client()["later"]
        assert self._app is not None
        for key in keys:
            self._app.add_schedule(wrapper.s(key, delay=delay))

    def close(self) -> None:
        """Close the harness-side connections."""
        if self._app is not None:
            with contextlib.suppress(Exception):
                self._app.storage.close()


class SqliteAdapter(_HueyAdapter):
    """``SqliteHuey`` on a file in the working directory (WAL, Huey's defaults)."""

    store: ClassVar[str] = "sqlite"
    kind: ClassVar[str] = "sqlite"
    concurrency: ClassVar[int] = 4

    def target(self) -> str:
        """The database file."""
        return str(self.workdir / "huey.db")

    def setup(self) -> None:
        """Create the database file and Huey's tables."""
        self._client()

    def teardown(self) -> None:
        """Delete the database file and its WAL files."""
        self.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(self.target() + suffix).unlink(missing_ok=True)


class RedisAdapter(_HueyAdapter):
    """``RedisHuey`` (blocking ``BRPOP``) under a name holding the run's tag."""

    store: ClassVar[str] = "redis"
    kind: ClassVar[str] = "redis"
    concurrency: ClassVar[int] = 4

    def target(self) -> str:
        """The Redis URL."""
        return REDIS_URL

    def teardown(self) -> None:
        """Delete the keys of this Huey name (``huey.<kind>.<name>``, ``huey.notify.<name>.*``)."""
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"huey.*.{self.queue_name}*", count=SCAN_COUNT))
            for start in range(0, len(keys), SCAN_COUNT):
                client.delete(*keys[start : start + SCAN_COUNT])
        finally:
            client.close()

    def close(self) -> None:
        """Disconnect the harness-side connection pool."""
        if self._app is not None:
            with contextlib.suppress(Exception):
                self._app.storage.pool.disconnect()


class _SchemaAdapter(_HueyAdapter):
    """A Huey on PostgreSQL, in a schema of the run's own."""

    store: ClassVar[str] = "postgres"

    def target(self) -> str:
        """The PostgreSQL URL."""
        return PG_URL

    def schema(self) -> str:
        """``huey_bench_<tag>``."""
        return f"huey_bench_{self.tag}"

    def setup(self) -> None:
        """Create the schema, then Huey's tables in it."""
        _search_path(self.schema())  # validates the name before it reaches any SQL
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema())))
        self._client()

    def teardown(self) -> None:
        """Drop the schema and everything in it."""
        self.close()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema()))
            )


class PostgresAdapter(_SchemaAdapter):
    """``huey.PostgresHuey``: Huey's own PostgreSQL storage (psycopg 3, ``LISTEN``/``NOTIFY``)."""

    kind: ClassVar[str] = "postgres"
    concurrency: ClassVar[int] = 4
    worker_type: ClassVar[str] = "process"
