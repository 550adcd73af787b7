"""Load and connection-chaos tests: real ``durably worker`` processes on real servers.

* 4 worker processes drain 20,000 jobs with no faults: every job succeeds, runs exactly once,
  has exactly one attempt, and the work is shared.
* Worker sessions are cut under load (``pg_terminate_backend`` on PostgreSQL, ``CLIENT KILL`` on
  Redis), only this test's sessions: no worker dies, no job is lost, none completes twice.
* A PostgreSQL store whose pooled sessions were all cut must reach the (healthy) server again at
  once (psycopg_pool's per-checkout check used to stall every caller for the whole timeout).

The contract under connection loss is at-least-once *execution* and exactly-once *completion*:
a claim whose reply is lost leaves a lease nobody holds, which the rescuer ends after it expires
(the attempt counts); the handler may even run twice if an attempt is ended that way while it
ran. The store must still record exactly one successful ending per job.

Every worker appends ``<job id> <attempt>`` to a file of its own when a handler finishes (see
``load_tasks.py``), so executions are counted outside the store under test. Worker output is
kept in ``tmp_path`` (``w<n>.err``) and its tail shown when a test fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from load_tasks import make_app

from conftest import PG_URL, drop_namespace, store_options, unique_name
from durably import ConfigError, Durably, JobSpec, Status
from durably.errors import StoreUnavailable
from durably.job import Job, JobFilter
from durably.store import from_url
from durably.store.postgres import PostgresStore
from durably.store.redis import RedisStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TASKS = "tests.integration.load_tasks"
ENQUEUE_CHUNK = 1_000
# Upper bounds on every wait; a test that reaches one has failed.
DRAIN_DEADLINE = 90.0
STOP_DEADLINE = 30.0
POLL = 0.05

LOAD_WORKERS = 4
LOAD_JOBS_PER_WORKER = 5_000
LOAD_KINDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


@dataclasses.dataclass
class WorkerProcess:
    """One ``durably worker`` subprocess, its output in files."""

    name: str
    process: subprocess.Popen[bytes]
    stderr: Path

    def tail(self, lines: int = 40) -> str:
        text = self.stderr.read_text(errors="replace").splitlines()
        return f"--- {self.name} (exit {self.process.poll()}) ---\n" + "\n".join(text[-lines:])


@dataclasses.dataclass
class Bench:
    """A fresh namespace on one store kind, the test's own app on it, and its workers."""

    kind: str
    url: str
    options: dict[str, Any]
    app: Durably
    tmp_path: Path
    exec_dir: Path
    workers: list[WorkerProcess] = dataclasses.field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLY_")}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env["DURABLY_TEST_URL"] = self.url
        env["DURABLY_TEST_EXEC_DIR"] = str(self.exec_dir)
        if "schema" in self.options:
            env["DURABLY_TEST_SCHEMA"] = self.options["schema"]
        if "prefix" in self.options:
            env["DURABLY_TEST_PREFIX"] = self.options["prefix"]
        return env

    def start(self, *extra: str) -> WorkerProcess:
        name = f"w{len(self.workers)}"
        stderr = self.tmp_path / f"{name}.err"
        command = [
            sys.executable,
            "-m",
            "durably.cli",
            "worker",
            "--url",
            self.url,
            "--import",
            TASKS,
            *extra,
        ]
        with stderr.open("wb") as err:
            process = subprocess.Popen(
                command, cwd=REPO, env=self.env(), stdout=err, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(name, process, stderr)
        self.workers.append(worker)
        return worker

    def output(self) -> str:
        return "\n".join(w.tail() for w in self.workers)

    def enqueue(self, count: int, payload: dict[str, Any]) -> list[int]:
        ids: list[int] = []
        for start in range(0, count, ENQUEUE_CHUNK):
            specs = [
                JobSpec(handler="record", payload=payload)
                for _ in range(min(ENQUEUE_CHUNK, count - start))
            ]
            ids += [job.id for job in self.app.enqueue_many(specs)]
        assert len(set(ids)) == count
        return ids

    def executions(self) -> Counter[int]:
        """Finished handler runs per job id, from every worker's file."""
        counts: Counter[int] = Counter()
        for path in self.exec_dir.glob("exec-*.log"):
            for line in path.read_text().splitlines():
                counts[int(line.split()[0])] += 1
        return counts

    def executions_per_process(self) -> dict[str, int]:
        return {
            path.name: len(path.read_text().splitlines())
            for path in self.exec_dir.glob("exec-*.log")
        }

    def executed(self) -> int:
        """How many handler runs finished so far (cheap: counts newlines)."""
        return sum(path.read_bytes().count(b"\n") for path in self.exec_dir.glob("exec-*.log"))

    def succeeded(self) -> int:
        return sum(n for (_, status), n in self.app.stats().items() if status is Status.SUCCEEDED)

    def all_jobs(self) -> list[Job]:
        found: list[Job] = []
        after: int | None = None
        for _ in range(10_000):  # pages of 500: far more than any test here enqueues
            page = self.app.jobs(JobFilter(), limit=500, after_id=after)
            if not page:
                return found
            found += page
            after = page[-1].id
        raise AssertionError("paging jobs did not end")

    def wait_for(self, check: Callable[[], bool], what: str, *, live: bool = False) -> None:
        """Poll ``check`` for at most :data:`DRAIN_DEADLINE`; with ``live``, every worker must
        stay up meanwhile."""
        deadline = time.monotonic() + DRAIN_DEADLINE
        while not check():
            if live:
                self.assert_alive(what)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"gave up after {DRAIN_DEADLINE:g}s waiting for {what}\n{self.report()}"
                )
            time.sleep(POLL)

    def assert_alive(self, when: str) -> None:
        dead = [w for w in self.workers if w.process.poll() is not None]
        if dead:
            pytest.fail(f"{len(dead)} worker(s) exited while {when}:\n{self.report()}")

    def report(self) -> str:
        return (
            f"stats: {self.app.stats()}\nexecuted: {self.executed()}\n"
            f"logs in {self.tmp_path}\n{self.output()}"
        )

    def stop_all(self) -> None:
        """SIGTERM every worker; each must exit 0 (a clean, graceful shutdown)."""
        for worker in self.workers:
            worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                code = worker.process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{worker.name} ignored SIGTERM for {STOP_DEADLINE:g}s\n{self.report()}"
                )
            assert code == 0, f"{worker.name} exited {code}\n{self.report()}"


def _drop(url: str, options: dict[str, Any]) -> None:
    async def drop() -> None:
        store = from_url(url, **options)
        await store.open()
        try:
            await drop_namespace(store)
        finally:
            await store.close()

    asyncio.run(drop())


@pytest.fixture
def bench(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bench]:
    kind: str = request.param
    url, options = store_options(kind, tmp_path)
    observer = dict(options)
    if kind == "postgres":
        # The test's own sessions get a name of their own, so the chaos test never cuts them.
        observer["application_name"] = f"durably-load-observer/{options['schema']}"[:63]
    try:
        app = make_app(url, **observer)
    except (ImportError, ConfigError) as exc:  # a store or its driver is not installed
        pytest.skip(f"{kind} store unavailable: {exc}")
    app.store()  # create (and migrate) the namespace before any worker starts
    exec_dir = tmp_path / "executions"
    exec_dir.mkdir()
    bench = Bench(kind, url, options, app, tmp_path, exec_dir)
    try:
        yield bench
    finally:
        for worker in bench.workers:  # only the processes this test started
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait(timeout=STOP_DEADLINE)
        app.close()
        _drop(url, options)


def _assert_exactly_once(bench: Bench, ids: list[int], rng: random.Random) -> None:
    counts = bench.executions()
    assert set(counts) == set(ids), (
        f"{len(set(ids) - set(counts))} jobs never ran, "
        f"{len(set(counts) - set(ids))} unknown ids ran"
    )
    twice = sorted(job_id for job_id, n in counts.items() if n != 1)
    assert not twice, f"{len(twice)} jobs ran more than once, e.g. {twice[:20]}"
    assert sum(counts.values()) == len(ids)
    for job_id in rng.sample(ids, 200):
        job = bench.app.get(job_id)
        assert (job.status, job.attempts, job.lease_token) == (Status.SUCCEEDED, 1, None)
        assert job.result is not None
        assert isinstance(job.result["pid"], int)
        [attempt] = bench.app.attempts(job_id)
        assert (attempt.number, attempt.outcome) == (1, "succeeded")
        assert attempt.finished_at is not None


def _assert_postgres_attempts(bench: Bench, expected: int) -> None:
    """Every job of the schema has exactly one attempt row, which succeeded (all rows, in SQL)."""
    schema = psycopg.sql.Identifier(bench.options["schema"])
    with psycopg.connect(bench.url, autocommit=True) as conn:
        row = conn.execute(
            psycopg.sql.SQL(
                "SELECT count(*), count(DISTINCT job_id), "
                "count(*) FILTER (WHERE outcome = 'succeeded') FROM {}.attempts"
            ).format(schema)
        ).fetchone()
        bad = conn.execute(
            psycopg.sql.SQL(
                "SELECT count(*) FROM {}.jobs WHERE status <> 'succeeded' OR attempts <> 1"
            ).format(schema)
        ).fetchone()
    assert row == (expected, expected, expected)
    assert bad == (0,)


@pytest.mark.parametrize("bench", LOAD_KINDS, indirect=True)
def test_four_workers_drain_twenty_thousand_jobs_each_exactly_once(bench: Bench) -> None:
    total = LOAD_WORKERS * LOAD_JOBS_PER_WORKER
    ids = bench.enqueue(total, {})
    for _ in range(LOAD_WORKERS):
        bench.start(
            "--burst",
            "--concurrency",
            "50",
            "--lease",
            "30",
            "--poll",
            "0.2",
            "--log-level",
            "WARNING",
        )
    deadline = time.monotonic() + DRAIN_DEADLINE
    for worker in bench.workers:
        try:
            code = worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"burst workers still running after {DRAIN_DEADLINE:g}s\n{bench.report()}")
        assert code == 0, f"{worker.name} exited {code}\n{bench.report()}"

    assert bench.app.stats() == {("default", Status.SUCCEEDED): total}, bench.report()
    _assert_exactly_once(bench, ids, random.Random(20_000))
    if bench.kind == "postgres":
        _assert_postgres_attempts(bench, total)
    per_process = bench.executions_per_process()
    assert len([n for n in per_process.values() if n > 0]) > 1, per_process
    for worker in bench.workers:
        log = worker.stderr.read_text(errors="replace")
        assert "Traceback" not in log, worker.tail()
        assert "ERROR" not in log, worker.tail()


def _assert_completed_once(bench: Bench, ids: list[int]) -> dict[str, int]:
    """Nothing lost, every job succeeded exactly once; a job that ran more than once must have
    had an attempt ended by lease expiry for each extra run. Returns a summary for the report."""
    assert bench.app.stats() == {("default", Status.SUCCEEDED): len(ids)}, bench.report()
    counts = bench.executions()
    never = sorted(set(ids) - set(counts))
    assert not never, f"{len(never)} succeeded jobs never ran their handler: {never[:20]}"
    jobs = {job.id: job for job in bench.all_jobs()}
    assert sorted(jobs) == sorted(ids)
    retried = 0
    for job_id in ids:
        job = jobs[job_id]
        assert (job.status, job.lease_token) == (Status.SUCCEEDED, None), job
        history = bench.app.attempts(job_id)
        outcomes = [a.outcome for a in history]
        assert len(history) == job.attempts >= 1, (job_id, outcomes)
        assert outcomes.count("succeeded") == 1, (job_id, outcomes)
        assert outcomes[-1] == "succeeded", (job_id, outcomes)
        assert all(a.outcome == "lease_expired" for a in history[:-1]), (job_id, outcomes)
        assert counts[job_id] <= job.attempts, (job_id, counts[job_id], outcomes)
        retried += job.attempts > 1
    return {
        "jobs": len(ids),
        "executions": sum(counts.values()),
        "ran_twice_or_more": sum(1 for n in counts.values() if n > 1),
        "rescued_attempts": retried,
    }


def _chaos(bench: Bench, ids: list[int], kills: int, cut: Callable[[], int]) -> list[int]:
    """Cut this test's worker sessions ``kills`` times, paced by progress (each cut once another
    slice of the jobs has run since the last one, so the workers reconnected in between), every
    worker checked alive after each cut."""
    step = len(ids) // (kills + 5)
    bench.wait_for(lambda: bench.executed() >= step, "the first jobs to run", live=True)
    cut_counts: list[int] = []
    for i in range(kills):
        cut_counts.append(cut())
        bench.assert_alive(f"their connections were cut ({i + 1} cuts)")
        # From the count after the cut: fast workers ran ahead of a fixed schedule, and cuts
        # then came back to back, before anyone had reconnected.
        target = min(bench.executed() + step, len(ids))
        bench.wait_for(
            lambda t=target: bench.executed() >= t,
            f"{target} executions after cut {i + 1}",
            live=True,
        )
    return cut_counts


def _pg_cutter(bench: Bench) -> tuple[Callable[[], int], Callable[[], None]]:
    # The exact name postgres.py gives every session of the workers' store (pool and LISTEN).
    worker_name = PostgresStore(bench.url, schema=bench.options["schema"]).application_name
    conn = psycopg.connect(bench.url, autocommit=True, application_name="durably-load-killer")

    def cut() -> int:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = %s",
            (worker_name,),
        ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    return cut, conn.close


def _redis_cutter(bench: Bench) -> tuple[Callable[[], int], Callable[[], None]]:
    store = bench.app.store()
    assert isinstance(store, RedisStore)
    observer = store.client_name  # the test's own connections (and ":wait") are spared
    workers = f"durably:{bench.options['prefix']}:"
    client = redis.Redis.from_url(bench.url, decode_responses=True)
    client.client_setname("durably-load-killer")

    def cut() -> int:
        killed = 0
        for entry in client.client_list():
            name = entry.get("name", "")
            if name.startswith(workers) and not name.startswith(observer):
                killed += int(client.client_kill_filter(_id=entry["id"]))
        return killed

    return cut, client.close


@pytest.mark.postgres
@pytest.mark.parametrize("bench", ["postgres"], indirect=True)
def test_postgres_workers_survive_terminated_sessions_and_lose_nothing(bench: Bench) -> None:
    ids = bench.enqueue(2_000, {"sleep": 0.02})
    for _ in range(3):
        bench.start("--concurrency", "8", "--lease", "2", "--poll", "0.2", "--log-level", "INFO")
    cut, close = _pg_cutter(bench)
    try:
        cut_counts = _chaos(bench, ids, 20, cut)
    finally:
        close()
    bench.wait_for(lambda: bench.succeeded() == len(ids), "every job to succeed", live=True)
    bench.stop_all()
    summary = _assert_completed_once(bench, ids)
    # Each cut reached live sessions (every worker keeps its LISTEN session and a pool).
    assert sum(1 for n in cut_counts if n > 0) >= len(cut_counts) // 2, cut_counts
    print(f"\npostgres chaos: sessions cut per kill {cut_counts}; {summary}")


@pytest.mark.redis
@pytest.mark.parametrize("bench", ["redis"], indirect=True)
def test_redis_workers_survive_killed_clients_and_lose_nothing(bench: Bench) -> None:
    ids = bench.enqueue(1_000, {"sleep": 0.02})
    for _ in range(3):
        bench.start("--concurrency", "8", "--lease", "2", "--poll", "0.2", "--log-level", "INFO")
    cut, close = _redis_cutter(bench)
    try:
        cut_counts = _chaos(bench, ids, 10, cut)
    finally:
        close()
    bench.wait_for(lambda: bench.succeeded() == len(ids), "every job to succeed", live=True)
    bench.stop_all()
    summary = _assert_completed_once(bench, ids)
    assert sum(1 for n in cut_counts if n > 0) >= len(cut_counts) // 2, cut_counts
    print(f"\nredis chaos: clients killed per kill {cut_counts}; {summary}")


@pytest.mark.postgres
async def test_postgres_store_reaches_the_server_at_once_after_its_sessions_are_cut(
    pg_url: str,
) -> None:
    schema = unique_name("durably_load_cut")
    name = unique_name("durably-load-cut")
    store = PostgresStore(
        pg_url, schema=schema, min_size=4, max_size=4, connect_timeout=3, application_name=name
    )
    await store.open()
    try:
        with psycopg.connect(pg_url, autocommit=True) as killer:
            [(cut,)] = killer.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                (name,),
            ).fetchall()
        assert cut >= 4  # the whole pool (and the LISTEN session, if one was open)
        # The server is up: one call may fail on a cut session, the next must succeed, both
        # about as fast as a round trip, not after connect_timeout.
        started = time.monotonic()
        outcomes: list[str] = []
        for _ in range(2):
            try:
                await store.counts()
            except StoreUnavailable as exc:
                outcomes.append(f"unavailable after {time.monotonic() - started:.2f}s: {exc}")
                continue
            outcomes.append("ok")
            break
        elapsed = time.monotonic() - started
        assert outcomes[-1] == "ok", (elapsed, outcomes)
        assert elapsed < 1.0, (elapsed, outcomes)
    finally:
        await store.close()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    psycopg.sql.Identifier(schema)
                )
            )
