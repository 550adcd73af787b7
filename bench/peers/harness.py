"""The side-by-side harness: durably's four workloads, run against other Python job queues.

Each peer on each store is an :class:`Adapter`. Its module is also what the peer's own worker
processes import: the tasks there call :func:`record` as they start, which appends one line per
call to a file of the worker process's own (``task key attempt started enqueued_at``). The
harness counts those lines to know when a workload is done, and checks them afterwards: every job
ran exactly once (W2: exactly three attempts), nothing scheduled ahead ran early. The peers'
workers are started with their own command lines at the concurrency each adapter names as the
peer's best on this machine.

The figures have the same names as ``bench.workloads``' so the same table renders both. Where a
peer cannot tell when an attempt ended, W2's lateness is measured start to start (a failing
attempt of this workload raises at once, so the difference is microseconds).
"""

from __future__ import annotations

import abc
import contextlib
import importlib.metadata
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TextIO

from bench.workloads import BenchFailure, percentile

__all__ = [
    "EXEC_DIR_ENV",
    "RETRY_FIXED",
    "SUCCEED_ON",
    "WARMUP_KEY",
    "Adapter",
    "ExecLog",
    "Execution",
    "PeerProcess",
    "record",
    "w1_drain",
    "w2_retry",
    "w3_latency",
    "w4_backlog",
]

EXEC_DIR_ENV = "DURABLY_PEER_EXEC_DIR"
REPO = Path(__file__).resolve().parents[2]
RETRY_FIXED = 0.01
"""W2's backoff: every peer is configured for a fixed 10 ms between attempts."""
SUCCEED_ON = 3
"""W2's task fails its first two attempts and succeeds on this one."""
WARMUP_KEY = -1

_log_fd: tuple[int, int] | None = None  # (pid, fd): reopened after a fork


def record(task: str, key: int, attempt: int, enqueued_at: float = 0.0) -> None:
    """Called by a peer's task as it starts: one line, written at once (one ``write`` call).

    ``O_APPEND`` makes each line land whole even when several threads of the process write.
    """
    global _log_fd
    started = time.time()
    pid = os.getpid()
    if _log_fd is None or _log_fd[0] != pid:
        directory = os.environ[EXEC_DIR_ENV]
        fd = os.open(
            os.path.join(directory, f"exec-{pid}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND
        )
        _log_fd = (pid, fd)
    os.write(_log_fd[1], f"{task} {key} {attempt} {started:.6f} {enqueued_at:.6f}\n".encode())


class Execution(NamedTuple):
    """One task call, as its worker recorded it."""

    task: str
    key: int
    attempt: int
    started: float
    enqueued_at: float


class ExecLog:
    """Reads the worker processes' execution files incrementally (only the bytes added)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = defaultdict(bytes)
        self.executions: list[Execution] = []
        self.counts: Counter[str] = Counter()

    def poll(self) -> Counter[str]:
        """Read what was appended since the last poll; the calls per task so far."""
        for path in sorted(self.directory.glob("exec-*.txt")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
            if not data:
                continue
            self._offsets[path] = offset + len(data)
            data = self._partial.pop(path, b"") + data
            lines = data.split(b"\n")
            if lines[-1]:
                self._partial[path] = lines[-1]  # a line still being written
            for line in lines[:-1]:
                task, key, attempt, started, enqueued = line.decode().split()
                execution = Execution(task, int(key), int(attempt), float(started), float(enqueued))
                self.executions.append(execution)
                self.counts[task] += 1
        return self.counts


class PeerProcess:
    """One peer worker process; its peak RSS is the largest sum over it and its children."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self._log: TextIO = open(log_path, "w")  # noqa: SIM115 - closed when reaped
        self.log_path = log_path
        self.proc = subprocess.Popen(
            list(argv),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the whole tree can be killed together
        )
        self.returncode: int | None = None
        self.max_rss_kb = 0

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def _tree(self) -> list[int]:
        pids = [self.proc.pid]
        for pid in pids:  # grows while walking: breadth-first over the children
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                    pids += [int(c) for c in children]
        return pids

    def sample_rss(self) -> None:
        """Add up the resident memory of the process and its descendants now."""
        total = 0
        for pid in self._tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        self.max_rss_kb = max(self.max_rss_kb, total)

    def poll(self) -> bool:
        """True once the process has exited (and was reaped)."""
        if self.returncode is not None:
            return True
        if self.proc.poll() is None:
            return False
        self.returncode = self.proc.returncode
        self._log.close()
        return True

    def signal(self, sig: int) -> None:
        """Send ``sig`` unless the process has exited."""
        if not self.poll():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def finish(self, timeout: float = 30.0) -> None:
        """Wait up to ``timeout`` seconds for the exit, then kill whatever is left of the group."""
        deadline = time.monotonic() + timeout
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.kill()

    def kill(self) -> None:
        """Kill the process group at once and reap the process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.poll()

    def tail(self, lines: int = 15) -> str:
        """The end of the process's output, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Adapter(abc.ABC):
    """One peer on one store, in a namespace of its own that :meth:`teardown` removes.

    Subclasses live in modules that the peer's worker processes also import; those modules
    define the tasks ``noop(key)``, ``flaky(key)`` (fails attempts 1 and 2, retried after a
    fixed :data:`RETRY_FIXED`), ``stamp(key, enqueued_at)`` and ``later(key)``, each calling
    :func:`record` first.
    """

    peer: ClassVar[str]
    """The peer's name, as its users know it."""
    store: ClassVar[str]
    """``sqlite``, ``postgres`` or ``redis``."""
    distribution: ClassVar[str]
    """The PyPI distribution, for its version."""
    concurrency: ClassVar[int]
    """The peer's best concurrency per worker process on this machine (see the module)."""
    stop_signal: ClassVar[int] = signal.SIGTERM
    """The signal that shuts the peer's worker down gracefully."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tag = f"{os.getpid()}_{secrets.token_hex(4)}"

    @property
    def name(self) -> str:
        """``peer version``."""
        return f"{self.peer} {self.version()}"

    @classmethod
    def version(cls) -> str:
        """The installed version of the peer."""
        return importlib.metadata.version(cls.distribution)

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Create the namespace (a schema, a database file); the default needs none."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Remove everything :meth:`setup` and the workload created, and nothing else."""

    @abc.abstractmethod
    def env(self) -> dict[str, str]:
        """Environment variables that give a worker process this namespace."""

    @abc.abstractmethod
    def worker_argv(self, concurrency: int) -> list[str]:
        """The command line of one worker process (``sys.executable`` first)."""

    @abc.abstractmethod
    def enqueue_bulk(self, task: str, keys: Sequence[int]) -> None:
        """Enqueue one ``task`` job per key with the peer's fastest bulk API."""

    @abc.abstractmethod
    def enqueue_stamp(self, key: int, enqueued_at: float) -> None:
        """Enqueue one ``stamp`` job, the way an application enqueues a single job."""

    @abc.abstractmethod
    def schedule_later(self, keys: Sequence[int], delay: float) -> None:
        """Enqueue one ``later`` job per key, due ``delay`` seconds from now (bulk if possible)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the harness process's clients."""


@contextlib.contextmanager
def opened(adapter_type: type[Adapter]) -> Iterator[Adapter]:
    """A set-up adapter in a fresh working directory; torn down and closed on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix=f"durably-peer-{adapter_type.peer}-"))
    adapter = adapter_type(workdir)
    try:
        adapter.setup()
        yield adapter
    finally:
        try:
            adapter.teardown()
        finally:
            adapter.close()
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def workers(
    adapter: Adapter, exec_dir: Path, count: int, concurrency: int
) -> Iterator[list[PeerProcess]]:
    """Start ``count`` worker processes; stop (then kill) them on the way out."""
    env = dict(os.environ)
    env.update(adapter.env())
    env[EXEC_DIR_ENV] = str(exec_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs: list[PeerProcess] = []
    try:
        for n in range(count):
            log = adapter.workdir / f"worker-{n}-{secrets.token_hex(3)}.log"
            procs.append(PeerProcess(adapter.worker_argv(concurrency), env, log))
        yield procs
    finally:
        for proc in procs:
            proc.kill()


def stop_all(adapter: Adapter, procs: Sequence[PeerProcess]) -> None:
    """Stop every worker gracefully (all signalled first, so they shut down together)."""
    for proc in procs:
        proc.signal(adapter.stop_signal)
    for proc in procs:
        proc.finish()


def wait_for(
    log: ExecLog,
    done: Callable[[Counter[str]], bool],
    procs: Sequence[PeerProcess],
    timeout: float,
    what: str,
) -> float:
    """Poll the log every 5 ms until ``done``; the ``perf_counter`` time it became true."""
    deadline = time.monotonic() + timeout
    polls = 0
    while not done(log.poll()):
        for proc in procs:
            if proc.poll():
                raise BenchFailure(f"worker {proc.pid} exited early:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise BenchFailure(f"timed out after {timeout:.0f}s waiting for {what}: {log.counts}")
        if polls % 4 == 0:
            for proc in procs:
                proc.sample_rss()
        polls += 1
        time.sleep(0.005)
    return time.perf_counter()


def check_runs(
    executions: Sequence[Execution], task: str, keys: Sequence[int], attempts_each: int = 1
) -> list[Execution]:
    """Every key ran attempts ``1..attempts_each`` exactly once each; the task's executions."""
    mine = [e for e in executions if e.task == task and e.key != WARMUP_KEY]
    runs = Counter(e.key for e in mine)
    problems: list[str] = []
    missing = set(keys) - set(runs)
    if missing:
        problems.append(f"{len(missing)} jobs never ran: {sorted(missing)[:5]}")
    unknown = set(runs) - set(keys)
    if unknown:
        problems.append(f"{len(unknown)} unknown jobs ran: {sorted(unknown)[:5]}")
    wrong = [k for k, n in runs.items() if n != attempts_each]
    if wrong:
        problems.append(
            f"{len(wrong)} jobs ran other than {attempts_each} time(s): "
            + ", ".join(f"{k} x{runs[k]}" for k in wrong[:5])
        )
    if attempts_each > 1:
        numbering = Counter(e.attempt for e in mine)
        if sorted(numbering) != list(range(1, attempts_each + 1)):
            problems.append(f"attempt numbers {dict(numbering)}")
    if problems:
        raise BenchFailure(f"{task}: " + "; ".join(problems))
    return mine


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def _settle(log: ExecLog, procs: Sequence[PeerProcess]) -> None:
    """Give a duplicate a moment to show up before the workers stop."""
    time.sleep(0.2)
    log.poll()
    for proc in procs:
        proc.sample_rss()


# -- the workloads ----------------------------------------------------------------------------


def w1_drain(
    adapter_type: type[Adapter], *, jobs: int = 20_000, processes: int = 1, concurrency: int = 0
) -> dict[str, Any]:
    """Bulk-enqueue ``jobs`` no-ops, then drain them with ``processes`` workers."""
    concurrency = concurrency or adapter_type.concurrency
    with opened(adapter_type) as adapter:
        keys = range(jobs)
        started = time.perf_counter()
        adapter.enqueue_bulk("noop", keys)
        enqueue_s = time.perf_counter() - started
        exec_dir = adapter.workdir / "exec"
        exec_dir.mkdir()
        log = ExecLog(exec_dir)
        started = time.perf_counter()
        with workers(adapter, exec_dir, processes, concurrency) as procs:
            done_at = wait_for(
                log, lambda c: c["noop"] >= jobs, procs, 60 + jobs / 20, f"{jobs} no-ops"
            )
            _settle(log, procs)
            stop_all(adapter, procs)
        mine = check_runs(log.executions, "noop", keys)
        starts = [e.started for e in mine]
        span = max(starts) - min(starts)
        return {
            "system": adapter.name,
            "jobs": jobs,
            "processes": processes,
            "concurrency": concurrency,
            "enqueue_s": enqueue_s,
            "enqueue_jobs_per_s": _rate(jobs, enqueue_s),
            "wall_s": done_at - started,
            "wall_jobs_per_s": _rate(jobs, done_at - started),
            "span_s": span,
            "processed_jobs_per_s": _rate(jobs, span),
            "peak_rss_mb": max(p.max_rss_kb for p in procs) / 1024,
            "correct": True,
        }


def w2_retry(
    adapter_type: type[Adapter], *, jobs: int = 3_000, concurrency: int = 0
) -> dict[str, Any]:
    """``jobs`` tasks that fail twice, retried after a fixed 10 ms: time and lateness."""
    concurrency = concurrency or adapter_type.concurrency
    with opened(adapter_type) as adapter:
        keys = range(jobs)
        adapter.enqueue_bulk("flaky", keys)
        exec_dir = adapter.workdir / "exec"
        exec_dir.mkdir()
        log = ExecLog(exec_dir)
        expected = jobs * SUCCEED_ON
        started = time.perf_counter()
        with workers(adapter, exec_dir, 1, concurrency) as procs:
            done_at = wait_for(
                log, lambda c: c["flaky"] >= expected, procs, 120 + jobs / 5, f"{expected} attempts"
            )
            _settle(log, procs)
            stop_all(adapter, procs)
        mine = check_runs(log.executions, "flaky", keys, attempts_each=SUCCEED_ON)
        by_key: dict[int, list[Execution]] = defaultdict(list)
        for e in mine:
            by_key[e.key].append(e)
        late = [
            after.started - before.started - RETRY_FIXED
            for runs in by_key.values()
            for before, after in itertools.pairwise(sorted(runs, key=lambda e: e.attempt))
        ]
        wall = done_at - started
        return {
            "system": adapter.name,
            "jobs": jobs,
            "concurrency": concurrency,
            "attempts": len(mine),
            "wall_s": wall,
            "wall_jobs_per_s": _rate(jobs, wall),
            "retry_lateness_p50_ms": percentile(late, 50) * 1000,
            "retry_lateness_p99_ms": percentile(late, 99) * 1000,
            "peak_rss_mb": procs[0].max_rss_kb / 1024,
            "correct": True,
        }


def _latency(
    adapter: Adapter, *, jobs: int, interval: float, concurrency: int
) -> tuple[dict[str, Any], ExecLog]:
    exec_dir = adapter.workdir / "exec"
    exec_dir.mkdir()
    log = ExecLog(exec_dir)
    with workers(adapter, exec_dir, 1, concurrency) as procs:
        # A warm-up job proves the worker is up and idle before the measured series starts.
        adapter.enqueue_stamp(WARMUP_KEY, time.time())
        wait_for(log, lambda c: c["stamp"] >= 1, procs, 60, "the warm-up job")
        time.sleep(0.2)  # let the worker go back to its idle wait
        returned: dict[int, float] = {}
        base = time.perf_counter()
        for i in range(jobs):
            delay = base + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            adapter.enqueue_stamp(i, time.time())
            returned[i] = time.time()
            if i % 10 == 0:
                procs[0].sample_rss()
        wait_for(log, lambda c: c["stamp"] >= jobs + 1, procs, 60, f"{jobs} latency jobs")
        _settle(log, procs)
        stop_all(adapter, procs)
    mine = check_runs(log.executions, "stamp", range(jobs))
    latencies = [e.started - e.enqueued_at for e in mine]
    after_commit = [max(0.0, e.started - returned[e.key]) for e in mine]
    return {
        "system": adapter.name,
        "jobs": jobs,
        "interval_ms": interval * 1000,
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
        "latency_max_ms": max(latencies) * 1000,
        "after_commit_p50_ms": percentile(after_commit, 50) * 1000,
        "after_commit_p99_ms": percentile(after_commit, 99) * 1000,
        "peak_rss_mb": procs[0].max_rss_kb / 1024,
        "correct": True,
    }, log


def w3_latency(
    adapter_type: type[Adapter], *, jobs: int = 200, interval: float = 0.02, concurrency: int = 0
) -> dict[str, Any]:
    """An idle worker; ``jobs`` enqueued one by one ``interval`` apart; start minus enqueue."""
    with opened(adapter_type) as adapter:
        out, _ = _latency(
            adapter,
            jobs=jobs,
            interval=interval,
            concurrency=concurrency or adapter_type.concurrency,
        )
        return out


def w4_backlog(
    adapter_type: type[Adapter],
    *,
    jobs: int = 200,
    backlog: int = 200_000,
    interval: float = 0.02,
    concurrency: int = 0,
) -> dict[str, Any]:
    """W3 with ``backlog`` jobs scheduled an hour ahead; none may run."""
    with opened(adapter_type) as adapter:
        started = time.perf_counter()
        adapter.schedule_later(range(backlog), 3600)
        backlog_s = time.perf_counter() - started
        out, log = _latency(
            adapter,
            jobs=jobs,
            interval=interval,
            concurrency=concurrency or adapter_type.concurrency,
        )
        ran = [e for e in log.executions if e.task == "later"]
        if ran:
            raise BenchFailure(f"{len(ran)} backlog jobs ran an hour early: {ran[:5]}")
        out.update(
            backlog=backlog,
            backlog_enqueue_s=backlog_s,
            backlog_enqueue_jobs_per_s=_rate(backlog, backlog_s),
        )
        return out
