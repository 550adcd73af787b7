"""procrastinate on PostgreSQL, run through durably's workloads.

Each run gets a fresh schema (``bench_procrastinate_<tag>``) with procrastinate's own schema
applied in it (``SchemaManager.apply_schema``); every connection, the harness's and the
workers', selects it with ``options=-c search_path=<schema>``. Teardown drops it with CASCADE.
The harness side uses a ``PsycopgConnector`` app opened synchronously (procrastinate then
summons its ``SyncPsycopgConnector``), defers by task name and enqueues in bulk with
``batch_defer`` (one ``procrastinate_defer_jobs_v1`` call per chunk).

The workers are ``python -m procrastinate --app=bench.peers.procrastinate_peer.app worker``
(the psycopg 3 ``PsycopgConnector``, async tasks on the worker's event loop) with LISTEN/NOTIFY
on (the default, documented as the low-latency path) and ``--log-level=warning`` (the default,
INFO, writes two log lines per job).

What procrastinate really does with the workload's settings:

* Retries (W2): ``RetryStrategy.wait`` is whole seconds, so ``flaky`` uses the documented
  custom-strategy hook instead: a ``BaseRetryStrategy`` returning
  ``RetryDecision(retry_in={"milliseconds": 10})`` twice (three attempts in all). The retried
  job's ``scheduled_at`` is then 10 ms ahead, but a retry sends no NOTIFY (only inserts do) and
  the worker does not know when the next scheduled job is due: an idle worker finds a due retry
  only at its next poll. The attempt number recorded is procrastinate's own ``job.attempts + 1``.
* Polling: ``--fetch-job-polling-interval`` is a float with a 5 s default and no documented
  minimum; the workers poll every 10 ms (the retry delay), so that a due retry waits at most
  one poll. With LISTEN/NOTIFY on, new jobs (W1, W3, W4) do not wait for the poll.
* W4's backlog is ``configure(schedule_at=now + 1 h).batch_defer``. The fetch query
  (``procrastinate_fetch_job_v2``, one job per call) walks the ``(priority, id) WHERE
  status = 'todo'`` index and filters ``scheduled_at <= now()`` row by row, so every fetch reads
  the whole backlog: 10-16 ms with 50,000 jobs ahead, 35-46 ms with 200,000 (measured on this
  machine). The worker fetches once for the job and once more to find the queue empty, so with
  200,000 ahead it serves well under W4's 50 jobs/s and the latency grows through the series
  (p50 1.9-3.7 s in four runs, whether polling every 10 ms or 100 ms).
* Polling at 10 ms against 100 ms and 1 s changed nothing measurable in W2 or W4 at 50,000
  ahead (runs spread 25 ms-1.5 s with the machine's load); 10 ms is kept as the bound on how
  late an idle worker can find a due retry.

Concurrency (``--concurrency``, async jobs per worker process): W1 with 5,000 no-ops and one
process, on this 2-core machine while other benchmarks ran (load average 4-7, so +-30 %),
processed/s in four interleaved passes: 1: 228, 164, 139/141, 174/129; 2: 141, 183/122;
4: 192, 214, 218/138, 190/147; 10: 145, 96, 178/161, 152/121; 20: 112; 50: 107, 100. 4 has
the best median (about 190, against about 150 for 1 and 10): the worker fetches one job per
query from a single loop, so more slots only queue up on the psycopg pool (4 connections by
default; a pool of 12 at concurrency 10 was slower still, 134/143 against 169/174).
``batch_defer`` chunks of 1,000, 10,000 or 50,000 jobs enqueued at the same rate (7-12 k/s,
within the noise).
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from procrastinate import App, BaseRetryStrategy, JobContext, PsycopgConnector, RetryDecision
from procrastinate.jobs import Job, JobDeferrer
from procrastinate.types import JSONDict
from psycopg import sql

from bench.peers import harness
from bench.workloads import PG_URL

__all__ = ["SCHEMA_ENV", "PostgresAdapter", "app", "flaky", "later", "noop", "stamp"]

CONNINFO = PG_URL
"""The benchmark's PostgreSQL (``DURABLY_BENCH_PG_URL``)."""
SCHEMA_ENV = "DURABLY_PEER_PROCRASTINATE_SCHEMA"
"""The schema a worker process works in; unset (a bare import) means the server's default."""
POLL_INTERVAL = 0.01
"""``--fetch-job-polling-interval``: the fallback poll, which alone finds a due retry (s)."""
CHUNK = 10_000
"""Jobs per ``batch_defer`` call: one statement each, its array built in memory."""

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _connector(schema: str | None) -> PsycopgConnector:
    """A psycopg 3 connector whose connections all work in ``schema``."""
    kwargs: dict[str, Any] = {}
    if schema:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"bad schema name {schema!r}")
        kwargs["options"] = f"-c search_path={schema}"
    return PsycopgConnector(conninfo=CONNINFO, kwargs=kwargs)


class FixedRetry(BaseRetryStrategy):
    """Retry ``retries`` times, each ``wait_ms`` milliseconds after the failure."""

    def __init__(self, *, retries: int, wait_ms: int) -> None:
        self.retries = retries
        self.wait_ms = wait_ms

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        """A retry ``wait_ms`` from now while fewer than ``retries`` were made."""
        if job.attempts >= self.retries:
            return None
        return RetryDecision(retry_in={"milliseconds": self.wait_ms})


app = App(connector=_connector(os.environ.get(SCHEMA_ENV)))
"""What the workers run (``--app=bench.peers.procrastinate_peer.app``)."""


def _attempt(context: JobContext) -> int:
    # procrastinate counts the attempts made before this one.
    return context.job.attempts + 1


@app.task(name="noop", pass_context=True)
async def noop(context: JobContext, key: int) -> None:
    """W1: nothing but the record."""
    harness.record("noop", key, _attempt(context))


@app.task(
    name="flaky",
    pass_context=True,
    retry=FixedRetry(retries=harness.SUCCEED_ON - 1, wait_ms=round(harness.RETRY_FIXED * 1000)),
)
async def flaky(context: JobContext, key: int) -> None:
    """W2: fails attempts 1 and 2, succeeds on attempt 3."""
    attempt = _attempt(context)
    harness.record("flaky", key, attempt)
    if attempt < harness.SUCCEED_ON:
        raise RuntimeError(f"planned failure on attempt {attempt}")


@app.task(name="stamp", pass_context=True)
async def stamp(context: JobContext, key: int, enqueued_at: float) -> None:
    """W3/W4: records its enqueue time beside its start."""
    harness.record("stamp", key, _attempt(context), enqueued_at)


@app.task(name="later", pass_context=True)
async def later(context: JobContext, key: int) -> None:
    """W4's backlog, due an hour ahead: must never run."""
    harness.record("later", key, _attempt(context))


def _batch_defer(deferrer: JobDeferrer, keys: Sequence[int]) -> None:
    """One job per key, :data:`CHUNK` jobs per ``batch_defer`` call."""
    for start in range(0, len(keys), CHUNK):
        chunk: list[JSONDict] = [{"key": key} for key in keys[start : start + CHUNK]]
        deferrer.batch_defer(*chunk)


class PostgresAdapter(harness.Adapter):
    """procrastinate with its psycopg 3 connector, in a schema of its own."""

    peer: ClassVar[str] = "procrastinate"
    store: ClassVar[str] = "postgres"
    distribution: ClassVar[str] = "procrastinate"
    concurrency: ClassVar[int] = 4

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.schema = f"bench_procrastinate_{self.tag}"
        self.app = App(connector=_connector(self.schema))
        self._created = False
        self._opened = False

    def _execute(self, statement: sql.Composed) -> None:
        with psycopg.connect(CONNINFO, autocommit=True) as conn:
            conn.execute(statement)

    def setup(self) -> None:
        """Create the schema, apply procrastinate's schema in it, open the harness's app."""
        self._execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
        self._created = True
        self.app.open()
        self._opened = True
        self.app.schema_manager.apply_schema()

    def teardown(self) -> None:
        """Drop the schema and everything in it."""
        self.close()
        if self._created:
            self._execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )
            self._created = False

    def env(self) -> dict[str, str]:
        """The schema the workers' app connects to."""
        return {SCHEMA_ENV: self.schema}

    def worker_argv(self, concurrency: int) -> list[str]:
        """procrastinate's own worker command line."""
        return [
            sys.executable,
            "-m",
            "procrastinate",
            "--app=bench.peers.procrastinate_peer.app",
            "--log-level=warning",
            "worker",
            f"--concurrency={concurrency}",
            f"--fetch-job-polling-interval={POLL_INTERVAL}",
            "--listen-notify",
        ]

    def enqueue_bulk(self, task: str, keys: Sequence[int]) -> None:
        """``batch_defer`` in chunks of :data:`CHUNK`."""
        _batch_defer(self.app.configure_task(task), keys)

    def enqueue_stamp(self, key: int, enqueued_at: float) -> None:
        """One ``defer``."""
        self.app.configure_task("stamp").defer(key=key, enqueued_at=enqueued_at)

    def schedule_later(self, keys: Sequence[int], delay: float) -> None:
        """``batch_defer`` with ``schedule_at`` ``delay`` seconds ahead."""
        due = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)
        _batch_defer(self.app.configure_task("later", schedule_at=due), keys)

    def close(self) -> None:
        """Close the harness app's connection pool."""
        if self._opened:
            self.app.close()
            self._opened = False
