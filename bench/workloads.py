"""The benchmark's workloads (W1 to W4), each run against one store in a namespace of its own.

Every workload starts real worker processes (``python -m durably.cli worker --import
bench.tasks``), checks that every job ran exactly once (from the store and from the handlers' own
execution logs), and raises :class:`BenchFailure` when it did not. Timings are wall-clock
(``time.perf_counter``) in the benchmark process unless a field says it comes from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from bench import tasks
from durably import Durably
from durably.job import Attempt, Job, JobFilter, Status
from durably.store import from_url

__all__ = [
    "PG_URL",
    "REDIS_URL",
    "STORE_KINDS",
    "BenchFailure",
    "Namespace",
    "namespace",
    "w1_drain",
    "w2_retry",
    "w3_latency",
    "w4_backlog",
]

PG_URL = os.environ.get("DURABLY_BENCH_PG_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DURABLY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
STORE_KINDS = ("sqlite", "postgres", "redis")
REPO = Path(__file__).resolve().parent.parent
ENQUEUE_CHUNK = 5000
"""Jobs per ``enqueue_many`` call: one round trip each."""
PAGE = 1000


class BenchFailure(AssertionError):
    """A correctness check failed: a job was lost, duplicated, or ran when it must not."""


@dataclasses.dataclass(frozen=True)
class Namespace:
    """One store namespace: a temporary SQLite file, a PostgreSQL schema or a Redis prefix."""

    kind: str
    url: str
    options: dict[str, Any]
    workdir: Path

    def app(self) -> Durably:
        """The benchmark process's app on this namespace."""
        return tasks.build_app(self.url, **self.options)

    def env(self, exec_dir: Path) -> dict[str, str]:
        """The environment of a worker process on this namespace."""
        env = dict(os.environ)
        env.update(
            DURABLY_BENCH_URL=self.url,
            DURABLY_BENCH_OPTIONS=json.dumps(self.options),
            DURABLY_BENCH_EXEC_DIR=str(exec_dir),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        env.pop("DURABLY_URL", None)
        return env


@contextlib.asynccontextmanager
async def namespace(kind: str) -> AsyncIterator[Namespace]:
    """A fresh namespace of ``kind``, removed afterwards (schema or keys dropped, file deleted)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"durably-bench-{kind}-"))
    tag = f"{os.getpid()}_{secrets.token_hex(4)}"
    if kind == "sqlite":
        ns = Namespace(kind, f"sqlite:///{workdir / 'bench.db'}", {}, workdir)
    elif kind == "postgres":
        ns = Namespace(kind, PG_URL, {"schema": f"durably_bench_{tag}"}, workdir)
    elif kind == "redis":
        ns = Namespace(kind, REDIS_URL, {"prefix": f"durably-bench-{tag}"}, workdir)
    else:
        raise ValueError(f"unknown store kind {kind!r}; choose from {', '.join(STORE_KINDS)}")
    try:
        yield ns
    finally:
        if kind != "sqlite":
            store = from_url(ns.url, **ns.options)
            await store.open()
            try:
                await store.drop_namespace()  # type: ignore[attr-defined]
            finally:
                await store.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- worker processes -----------------------------------------------------------------------


class WorkerProcess:
    """One ``durably worker`` process, with its peak RSS (``VmHWM``, sampled every 20 ms)."""

    def __init__(self, ns: Namespace, exec_dir: Path, *, concurrency: int, burst: bool) -> None:
        args = [
            sys.executable,
            "-m",
            "durably.cli",
            "worker",
            "--import",
            "bench.tasks",
            "--concurrency",
            str(concurrency),
            "--log-level",
            "WARNING",
        ]
        if burst:
            args.append("--burst")
        self._log: TextIO = open(  # noqa: SIM115 - closed in wait()
            ns.workdir / f"worker-{secrets.token_hex(3)}.log", "w"
        )
        self.log_path = Path(self._log.name)
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=ns.env(exec_dir),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.returncode: int | None = None
        self.max_rss_kb = 0

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def poll(self) -> bool:
        """True once the process has exited (and was reaped); samples its peak RSS meanwhile."""
        if self.returncode is not None:
            return True
        self._sample_rss()
        pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # reaped here: Popen must not wait again
        self._log.close()
        return True

    def _sample_rss(self) -> None:
        # VmHWM is the peak of this process's own memory since exec. (wait4's ru_maxrss is not
        # used: on Linux it also counts the parent's memory the child had before exec.)
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.max_rss_kb = max(self.max_rss_kb, int(line.split()[1]))
                return

    async def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the exit; kill the process after that."""
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                self.kill()
                raise BenchFailure(
                    f"worker {self.pid} did not finish within {timeout:.0f}s (log: {self.tail()})"
                )
            await asyncio.sleep(0.02)
        return self.returncode or 0

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown), then wait."""
        if not self.poll():
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    def kill(self) -> None:
        """Kill the process at once and reap it."""
        if self.poll():
            return
        self.proc.kill()
        for _ in range(500):
            if self.poll():
                return
            time.sleep(0.01)

    def tail(self, lines: int = 15) -> str:
        """The end of the process's output, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.asynccontextmanager
async def workers(
    ns: Namespace, exec_dir: Path, count: int, *, concurrency: int, burst: bool
) -> AsyncIterator[list[WorkerProcess]]:
    """Start ``count`` worker processes; kill whichever is still alive on the way out."""
    procs: list[WorkerProcess] = []
    try:
        for _ in range(count):
            procs.append(WorkerProcess(ns, exec_dir, concurrency=concurrency, burst=burst))
        yield procs
    finally:
        for proc in procs:
            proc.kill()


def _check_exit(procs: Iterable[WorkerProcess]) -> None:
    for proc in procs:
        if proc.returncode != 0:
            raise BenchFailure(f"worker {proc.pid} exited with {proc.returncode}:\n{proc.tail()}")


# -- helpers --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def enqueue_bulk(app: Durably, specs: Sequence[dict[str, Any]]) -> float:
    """Enqueue ``specs`` with ``enqueue_many`` in chunks; return the seconds it took."""
    started = time.perf_counter()
    for i in range(0, len(specs), ENQUEUE_CHUNK):
        await app.enqueue_many_async(specs[i : i + ENQUEUE_CHUNK])
    return time.perf_counter() - started


async def all_jobs(app: Durably, handler: str) -> list[Job]:
    """Every job of ``handler`` (paged by id)."""
    found: list[Job] = []
    after: int | None = None
    for _ in range(10_000):  # a bound: 10 million jobs
        page = await app.jobs_async(JobFilter(handler=handler), limit=PAGE, after_id=after)
        if not page:
            break
        found += page
        after = page[-1].id
    return found


async def gather_limited(
    factories: Sequence[Callable[[], Coroutine[Any, Any, Any]]], limit: int = 50
) -> list[Any]:
    """Run coroutines at most ``limit`` at a time, keeping their order."""
    out: list[Any] = []
    for i in range(0, len(factories), limit):
        out += await asyncio.gather(*(f() for f in factories[i : i + limit]))
    return out


async def wait_until(
    check: Callable[[], Coroutine[Any, Any, bool]], timeout: float, what: str
) -> None:
    """Poll ``check`` every 20 ms until it is true; BenchFailure after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise BenchFailure(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def count_status(app: Durably, status: Status) -> int:
    """Jobs in ``status`` over every queue."""
    return sum(n for (_, st), n in (await app.stats_async()).items() if st == status)


def check_exactly_once(
    jobs: Sequence[Job],
    expected: int,
    executions: Sequence[tuple[str, int, int]],
    handler: str,
    attempts_each: int = 1,
) -> None:
    """Every job succeeded after exactly ``attempts_each`` attempts, each run exactly once."""
    problems: list[str] = []
    if len(jobs) != expected:
        problems.append(f"{len(jobs)} jobs stored, {expected} enqueued")
    bad = [j for j in jobs if j.status != Status.SUCCEEDED or j.attempts != attempts_each]
    if bad:
        sample = ", ".join(f"#{j.id} {j.status} x{j.attempts}" for j in bad[:5])
        problems.append(f"{len(bad)} jobs not succeeded after {attempts_each} attempt(s): {sample}")
    runs = Counter((job_id, attempt) for h, job_id, attempt in executions if h == handler)
    duplicated = [key for key, n in runs.items() if n > 1]
    if duplicated:
        problems.append(f"{len(duplicated)} attempts executed more than once: {duplicated[:5]}")
    ids = {j.id for j in jobs}
    ran = {job_id for job_id, _ in runs}
    if ran != ids:
        problems.append(
            f"executed job ids differ from stored ones: {len(ids - ran)} never ran, "
            f"{len(ran - ids)} unknown"
        )
    total = sum(runs.values())
    if total != expected * attempts_each:
        problems.append(f"{total} handler calls, expected {expected * attempts_each}")
    if problems:
        raise BenchFailure(f"{handler}: " + "; ".join(problems))


def _span(jobs: Sequence[Job]) -> float:
    starts = [j.first_attempt_at for j in jobs if j.first_attempt_at is not None]
    ends = [j.finished_at for j in jobs if j.finished_at is not None]
    if not starts or not ends:
        return float("nan")
    return (max(ends) - min(starts)).total_seconds()


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


# -- W1 drain -------------------------------------------------------------------------------


async def w1_drain(
    kind: str, *, jobs: int = 20_000, processes: int = 1, concurrency: int = 100
) -> dict[str, Any]:
    """Bulk-enqueue ``jobs`` no-ops, then drain them with ``processes`` burst workers."""
    async with namespace(kind) as ns:
        app = ns.app()
        try:
            await app.store_async()  # open and migrate before the clock starts
            enqueue_s = await enqueue_bulk(app, [{"handler": "noop"}] * jobs)
            exec_dir = ns.workdir / "exec"
            exec_dir.mkdir()
            started = time.perf_counter()
            async with workers(
                ns, exec_dir, processes, concurrency=concurrency, burst=True
            ) as procs:
                for proc in procs:
                    await proc.wait(timeout=60 + jobs / 50)
            wall_s = time.perf_counter() - started
            _check_exit(procs)
            stored = await all_jobs(app, "noop")
            check_exactly_once(stored, jobs, tasks.read_executions(exec_dir), "noop")
            pids = {p.pid for p in procs}
            foreign = [j.id for j in stored if j.result not in pids]
            if foreign:
                raise BenchFailure(f"{len(foreign)} results name no worker process: {foreign[:5]}")
            span_s = _span(stored)
            per_worker = Counter(j.result for j in stored)
            return {
                "jobs": jobs,
                "processes": processes,
                "concurrency": concurrency,
                "enqueue_s": enqueue_s,
                "enqueue_jobs_per_s": _rate(jobs, enqueue_s),
                "wall_s": wall_s,
                "wall_jobs_per_s": _rate(jobs, wall_s),
                "store_span_s": span_s,
                "processed_jobs_per_s": _rate(jobs, span_s),
                "jobs_per_process": sorted(per_worker.values()),
                "peak_rss_mb": max(p.max_rss_kb for p in procs) / 1024,
                "correct": True,
            }
        finally:
            await app.close_async()


# -- W2 retry -------------------------------------------------------------------------------


def retry_lateness(attempts: Sequence[Attempt], fixed: float) -> list[float]:
    """Seconds each retry started after it was due (the previous ending plus ``fixed``)."""
    ordered = sorted(attempts, key=lambda a: a.number)
    late: list[float] = []
    for before, after in itertools.pairwise(ordered):
        if before.finished_at is None:
            continue
        late.append((after.started_at - before.finished_at).total_seconds() - fixed)
    return late


async def w2_retry(kind: str, *, jobs: int = 3_000, concurrency: int = 100) -> dict[str, Any]:
    """``jobs`` that fail twice and succeed on the third attempt (fixed 10 ms retry wait)."""
    async with namespace(kind) as ns:
        app = ns.app()
        try:
            await app.store_async()
            enqueue_s = await enqueue_bulk(app, [{"handler": "flaky"}] * jobs)
            exec_dir = ns.workdir / "exec"
            exec_dir.mkdir()
            started = time.perf_counter()
            async with workers(ns, exec_dir, 1, concurrency=concurrency, burst=True) as procs:
                await procs[0].wait(timeout=60 + jobs / 20)
            wall_s = time.perf_counter() - started
            _check_exit(procs)
            stored = await all_jobs(app, "flaky")
            executions = tasks.read_executions(exec_dir)
            check_exactly_once(stored, jobs, executions, "flaky", attempts_each=tasks.SUCCEED_ON)
            history: list[list[Attempt]] = await gather_limited(
                [functools.partial(app.attempts_async, j.id) for j in stored]
            )
            rows = sum(len(h) for h in history)
            expected = jobs * tasks.SUCCEED_ON
            if rows != expected:
                raise BenchFailure(f"flaky: {rows} attempt rows stored, expected {expected}")
            outcomes = Counter(a.outcome for h in history for a in h)
            if outcomes != Counter({"failed": 2 * jobs, "succeeded": jobs}):
                raise BenchFailure(f"flaky: attempt outcomes {dict(outcomes)}")
            late = [x for h in history for x in retry_lateness(h, tasks.RETRY_FIXED)]
            return {
                "jobs": jobs,
                "concurrency": concurrency,
                "enqueue_s": enqueue_s,
                "wall_s": wall_s,
                "wall_jobs_per_s": _rate(jobs, wall_s),
                "store_span_s": _span(stored),
                "processed_jobs_per_s": _rate(jobs, _span(stored)),
                "attempts": rows,
                "handler_calls": len(executions),
                "retry_lateness_p50_ms": percentile(late, 50) * 1000,
                "retry_lateness_p99_ms": percentile(late, 99) * 1000,
                "retry_lateness_max_ms": max(late, default=float("nan")) * 1000,
                "peak_rss_mb": procs[0].max_rss_kb / 1024,
                "correct": True,
            }
        finally:
            await app.close_async()


# -- W3 latency and W4 backlog --------------------------------------------------------------


async def _latency(
    ns: Namespace,
    app: Durably,
    *,
    jobs: int,
    interval: float,
    concurrency: int,
    after: Callable[[Durably, list[tuple[str, int, int]]], Coroutine[Any, Any, dict[str, Any]]]
    | None = None,
) -> dict[str, Any]:
    exec_dir = ns.workdir / "exec"
    exec_dir.mkdir()
    async with workers(ns, exec_dir, 1, concurrency=concurrency, burst=False) as procs:
        worker = procs[0]
        # A warm-up job proves the worker is up and idle before the measured series starts.
        warm = await app.enqueue_async("stamp", {"warmup": True})

        async def warmed() -> bool:
            if worker.poll():
                raise BenchFailure(f"worker {worker.pid} died:\n{worker.tail()}")
            return (await app.get_async(warm.id)).status == Status.SUCCEEDED

        await wait_until(warmed, 60, "the warm-up job")
        await asyncio.sleep(0.2)  # let the worker go back to its idle wait
        base = time.perf_counter()
        committed: dict[int, float] = {}  # job id -> wall time when enqueue returned
        for i in range(jobs):
            delay = base + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            job = await app.enqueue_async("stamp", {"enqueued_at": time.time()})
            committed[job.id] = time.time()

        async def done() -> bool:
            return await count_status(app, Status.SUCCEEDED) >= jobs + 1

        await wait_until(done, 60, f"{jobs} latency jobs")
        await worker.stop()
    _check_exit(procs)
    executions = tasks.read_executions(exec_dir)
    stored = [j for j in await all_jobs(app, "stamp") if j.id != warm.id]
    check_exactly_once(
        stored, jobs, [e for e in executions if e[1] != warm.id], "stamp", attempts_each=1
    )
    latencies: list[float] = []
    after_commit: list[float] = []
    for job in stored:
        if not isinstance(job.payload, dict) or not isinstance(job.result, dict):
            raise BenchFailure(f"stamp job {job.id} has payload {job.payload!r}")
        started = float(job.result["started"])
        latencies.append(started - float(job.payload["enqueued_at"]))
        # The handler may start before enqueue() returns to its caller: clamp at zero.
        after_commit.append(max(0.0, started - committed[job.id]))
    out: dict[str, Any] = {
        "jobs": jobs,
        "interval_ms": interval * 1000,
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
        "latency_max_ms": max(latencies) * 1000,
        # Start minus enqueue()'s return: the wake-up and claim alone, without the enqueue's
        # own commit (an fsync on SQLite and PostgreSQL).
        "after_commit_p50_ms": percentile(after_commit, 50) * 1000,
        "after_commit_p99_ms": percentile(after_commit, 99) * 1000,
        "peak_rss_mb": worker.max_rss_kb / 1024,
        "correct": True,
    }
    if after is not None:
        out.update(await after(app, executions))
    return out


async def w3_latency(
    kind: str, *, jobs: int = 200, interval: float = 0.02, concurrency: int = 100
) -> dict[str, Any]:
    """An idle worker; ``jobs`` enqueued one by one ``interval`` apart; start minus enqueue."""
    async with namespace(kind) as ns:
        app = ns.app()
        try:
            await app.store_async()
            return await _latency(ns, app, jobs=jobs, interval=interval, concurrency=concurrency)
        finally:
            await app.close_async()


async def w4_backlog(
    kind: str,
    *,
    jobs: int = 200,
    backlog: int = 200_000,
    interval: float = 0.02,
    concurrency: int = 100,
) -> dict[str, Any]:
    """W3 with ``backlog`` jobs scheduled an hour ahead in the same queue; none may run."""
    async with namespace(kind) as ns:
        app = ns.app()
        try:
            await app.store_async()
            backlog_s = await enqueue_bulk(app, [{"handler": "later", "delay": 3600}] * backlog)

            async def untouched(
                app: Durably, executions: list[tuple[str, int, int]]
            ) -> dict[str, Any]:
                ran = [e for e in executions if e[0] == "later"]
                if ran:
                    raise BenchFailure(f"{len(ran)} backlog jobs ran an hour early: {ran[:5]}")
                pending = await count_status(app, Status.PENDING)
                if pending != backlog:
                    raise BenchFailure(f"{pending} jobs pending, expected the {backlog} backlog")
                return {
                    "backlog": backlog,
                    "backlog_enqueue_s": backlog_s,
                    "backlog_enqueue_jobs_per_s": _rate(backlog, backlog_s),
                }

            return await _latency(
                ns,
                app,
                jobs=jobs,
                interval=interval,
                concurrency=concurrency,
                after=untouched,
            )
        finally:
            await app.close_async()


def median_of(runs: Sequence[dict[str, Any]], field: str) -> float:
    """The median of ``field`` over runs (NaN when absent)."""
    values = [float(r[field]) for r in runs if isinstance(r.get(field), int | float)]
    return statistics.median(values) if values else float("nan")
