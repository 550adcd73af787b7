"""``durably demo``: a few hundred deliveries to a local flaky HTTP endpoint, end to end.

The endpoint answers each request by a fate scripted from the seed, the item and the attempt
number, so a run is deterministic: most items succeed first time, some after retries (503 with or
without ``Retry-After``, 429, connection resets), a few are refused for good (400, dead-lettered
as ``http_4xx``) and a few fail on every attempt (dead-lettered as ``exhausted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import durably
from durably.app import Durably, JobSpec
from durably.executor import JobContext
from durably.job import JSON, TERMINAL, Job, JobFilter, Status
from durably.policy import RetryPolicy
from durably.store import mask_url
from durably.worker import Rescuer

__all__ = [
    "DEFAULT_URL",
    "POLICY",
    "DemoSummary",
    "Fate",
    "FlakyServer",
    "HttpStatusError",
    "build_app",
    "expected_outcomes",
    "fate",
    "run_demo",
    "script",
]

DEFAULT_URL = "sqlite:///demo.db"
QUEUE = "demo"
BATCH_ID = "demo-batch"
POLICY = RetryPolicy(max_attempts=4, initial=0.05, cap=0.5, jitter="full")
ATTEMPT_TIMEOUT = 2.0
LEASE_SECONDS = 5.0
DONE: frozenset[Status] = TERMINAL | {Status.DEAD_LETTER}

log = logging.getLogger("durably.demo")


# -- the script: what the endpoint answers --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Fate:
    """One scripted answer: an HTTP status (``None``: reset the connection) and Retry-After."""

    status: int | None
    retry_after: str | None = None

    @property
    def label(self) -> str:
        """A short description for logs."""
        if self.status is None:
            return "connection reset"
        return f"{self.status}" + (f" Retry-After {self.retry_after}" if self.retry_after else "")


OK = Fate(200)
BAD_REQUEST = Fate(400)
_TRANSIENT = (Fate(503, "0"), Fate(503, "1"), Fate(429, "0"), Fate(503), Fate(None))


def script(seed: int, item: int) -> tuple[Fate, ...]:
    """The answers to ``item``'s attempts 1, 2, ...; every later attempt gets 200.

    70 % succeed first time, 16 % after one or two transient failures, 7 % are refused (400)
    and 7 % fail transiently on every attempt the policy allows.
    """
    # A string seed is hashed with SHA-512: the same in every process and on every run.
    rng = random.Random(f"durably-demo:{seed}:{item}")
    draw = rng.random()
    if draw < 0.70:
        return (OK,)
    if draw < 0.86:
        return (*(rng.choice(_TRANSIENT) for _ in range(rng.randint(1, 2))), OK)
    if draw < 0.93:
        return (BAD_REQUEST,)
    return tuple(rng.choice(_TRANSIENT) for _ in range(cast(int, POLICY.max_attempts)))


def fate(seed: int, item: int, attempt: int) -> Fate:
    """What the endpoint answers to ``item``'s attempt number ``attempt`` (1-based)."""
    planned = script(seed, item)
    return planned[attempt - 1] if 1 <= attempt <= len(planned) else OK


def expected_outcomes(seed: int, items: int) -> dict[str, int]:
    """How a run of ``items`` items must end: counts by outcome, from the script alone."""
    max_attempts = cast(int, POLICY.max_attempts)
    counts: Counter[str] = Counter()
    for item in range(items):
        for attempt in range(1, max_attempts + 1):
            answer = fate(seed, item, attempt)
            if answer.status == 200:
                counts["succeeded_first_time" if attempt == 1 else "succeeded_after_retries"] += 1
                break
            if answer.status == 400:
                counts["http_4xx"] += 1
                break
        else:
            counts["exhausted"] += 1
    return dict(counts)


# -- the flaky endpoint ---------------------------------------------------------------------------


class _FlakyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    seed = 0
    requests = 0
    lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that vanish mid-request (a killed worker) are part of the demo, not bugs."""
        log.debug("client %s went away", client_address, exc_info=True)


class _FlakyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's pool is exercised

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the demo prints a summary instead of an access log."""

    def do_POST(self) -> None:
        """Answer by the scripted fate of the (item, attempt) in the JSON body."""
        server = cast(_FlakyHTTPServer, self.server)
        with server.lock:
            server.requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
            answer = fate(server.seed, int(body["item"]), int(body["attempt"]))
        except (ValueError, TypeError, KeyError):
            answer = BAD_REQUEST
        if answer.status is None:
            # SO_LINGER 0 makes close() send RST: the client sees a reset, not a clean close.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        data = json.dumps({"status": answer.status}).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if answer.retry_after is not None:
            self.send_header("Retry-After", answer.retry_after)
        self.end_headers()
        self.wfile.write(data)


class FlakyServer:
    """The demo's HTTP endpoint on 127.0.0.1 (ephemeral port), served from a thread.

    >>> with FlakyServer(seed=1) as server:  # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(self, seed: int) -> None:
        self._server = _FlakyHTTPServer(("127.0.0.1", 0), _FlakyHandler)
        self._server.seed = seed
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="durably-demo-http",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """Where to POST deliveries."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/deliver"

    @property
    def requests(self) -> int:
        """Requests answered so far."""
        return self._server.requests

    def start(self) -> FlakyServer:
        """Serve in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> FlakyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the operation ------------------------------------------------------------------------------


class HttpStatusError(durably.Permanent):
    """The endpoint refused the request (4xx other than 429): retrying cannot help."""

    classification = "http_4xx"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpUnavailable(Exception):
    """The endpoint answered 429 or 5xx without Retry-After: retry on the policy's backoff."""

    classification = "transient"


class NetworkError(ConnectionError):
    """The request did not get an answer (refused, reset, timed out)."""


class _Clients:
    """One ``httpx.AsyncClient`` per event loop, so connections are reused across jobs."""

    def __init__(self) -> None:
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT)
        return client

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


def _seconds(retry_after: str | None) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is not used by the demo endpoint)."""
    if retry_after is None:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return None


def build_app(url: str, endpoint: str) -> tuple[Durably, _Clients]:
    """The demo's app with the ``deliver`` operation posting to ``endpoint``."""
    app = Durably(url)
    clients = _Clients()

    async def deliver(payload: Mapping[str, JSON], context: JobContext) -> dict[str, int]:
        """POST the item to the endpoint; map the answer onto durably's retry signals."""
        body = {"item": payload["item"], "order": payload["order"], "attempt": context.attempt}
        try:
            response = await clients.get().post(endpoint, json=body)
        except httpx.TransportError as exc:
            raise NetworkError(f"{type(exc).__name__} from {endpoint}: {exc}") from exc
        code = response.status_code
        if 200 <= code < 300:
            return {"status": code}
        if code == 429 or code >= 500:
            retry_after = response.headers.get("Retry-After")
            seconds = _seconds(retry_after)
            if seconds is not None:
                raise durably.RetryAfter(seconds, f"HTTP {code}, Retry-After {retry_after}")
            raise HttpUnavailable(f"HTTP {code} from {endpoint}")
        if 400 <= code < 500:
            raise HttpStatusError(code, f"HTTP {code} from {endpoint}: {response.text[:200]}")
        raise durably.Permanent(f"unexpected HTTP {code} from {endpoint}")

    app.register("deliver", deliver, policy=POLICY, queue=QUEUE)
    return app, clients


async def _work(url: str, endpoint: str, concurrency: int) -> dict[str, int]:
    app, clients = build_app(url, endpoint)
    # poll_interval above the policy's cap: a burst worker waits for due retries, not exits.
    # A short lease: if a worker process dies, its jobs are rescued within seconds.
    worker = app.worker(
        burst=True, concurrency=concurrency, poll_interval=1.0, lease_seconds=LEASE_SECONDS
    )
    try:
        await worker.run(install_signals=True)
    finally:
        await clients.aclose()
        await app.close_async()
    return dict(worker.stats)


def _worker_process(url: str, endpoint: str, concurrency: int) -> None:
    """A spawned worker process: work the demo queue until it is drained."""
    level = os.environ.get("DURABLY_DEMO_LOG_LEVEL", "ERROR").upper()
    logging.basicConfig(
        level=level, format=f"%(asctime)s worker {os.getpid()} %(levelname)s: %(message)s"
    )
    asyncio.run(_work(url, endpoint, concurrency))


# -- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class DemoSummary:
    """How a demo run ended."""

    url: str
    seed: int
    total: int
    succeeded_first_time: int
    succeeded_after_retries: int
    dead_letter: dict[str, int]
    other: dict[str, int]
    elapsed: float
    jobs_per_second: float
    requests: int
    complete: bool
    as_scripted: bool
    example_dead_letter: int | None = None

    @property
    def dead_lettered(self) -> int:
        """Dead-lettered jobs, whatever the classification."""
        return sum(self.dead_letter.values())


def _fresh_sqlite(url: str) -> None:
    """Delete the SQLite file behind ``url`` (and its WAL files) so the demo starts empty."""
    path = urlsplit(url).path[1:]
    if not path or path == ":memory:":
        return
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)


def _specs(jobs: int, seed: int) -> list[JobSpec]:
    batch_size = max(1, jobs // 3)
    specs = []
    for item in range(jobs):
        spec = JobSpec(
            handler="deliver",
            payload={"item": item, "order": f"ORD-{seed}-{item:05d}"},
            meta={"request_id": f"demo-{seed}-{item}"},
        )
        if item < batch_size:  # a third of the run is one compensation-style batch
            spec.update(batch_id=BATCH_ID, item_index=item)
        specs.append(spec)
    return specs


def _done(app: Durably) -> int:
    return sum(n for (queue, status), n in app.stats().items() if queue == QUEUE and status in DONE)


def _our_jobs(app: Durably, ids: set[int]) -> list[Job]:
    found: list[Job] = []
    after: int | None = None
    while True:
        page = app.jobs(JobFilter(queue=QUEUE), limit=500, after_id=after)
        if not page:
            return found
        found.extend(job for job in page if job.id in ids)
        after = page[-1].id


async def _rescue(app: Durably) -> None:
    """End the attempts of crashed workers (burst workers exit before their rescuer runs)."""
    try:
        await Rescuer(await app.store_async(), app.operations).run_once()
    finally:
        await app.close_async()


def _start_workers(url: str, endpoint: str, workers: int) -> list[BaseProcess]:
    context = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    for n in range(workers):
        proc = context.Process(
            target=_worker_process,
            args=(url, endpoint, 10),
            name=f"durably-demo-worker-{n}",
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    return procs


def _stop_workers(procs: Sequence[BaseProcess], *, wait: float = 10.0) -> None:
    """Let workers end (``wait`` seconds), then SIGTERM them (they hand back what they hold),
    and SIGKILL what is still there 10 s later."""
    for proc in procs:
        proc.join(timeout=wait)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_demo(
    *,
    url: str | None = None,
    jobs: int = 300,
    workers: int = 2,
    seed: int = 42,
    console: Console | None = None,
    quiet: bool = False,
    deadline: float = 120.0,
) -> DemoSummary:
    """Enqueue ``jobs`` deliveries, run ``workers`` worker processes, and summarise.

    ``quiet`` prints nothing (the caller prints the returned summary, e.g. as JSON).
    """
    console = console or Console()
    with _sigterm_interrupts():
        return _run(url, jobs, workers, seed, console, quiet, deadline)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Make SIGTERM interrupt the demo like Ctrl-C does, so its cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    url: str | None,
    jobs: int,
    workers: int,
    seed: int,
    console: Console,
    quiet: bool,
    deadline: float,
) -> DemoSummary:
    out = Console(quiet=True) if quiet else console
    if url is None:
        url = DEFAULT_URL
        _fresh_sqlite(url)
    started = time.monotonic()
    procs: list[BaseProcess] = []
    with FlakyServer(seed) as server:
        app, _clients = build_app(url, server.url)
        try:
            before = _done(app)
            ids = {job.id for job in app.enqueue_many(_specs(jobs, seed))}
            out.print(
                f"enqueued {len(ids)} deliveries on {mask_url(url)}; endpoint {server.url}; "
                f"{workers} worker process{'es' if workers != 1 else ''}"
            )
            progress = Progress(
                TextColumn("[bold]delivering"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=out,
                transient=False,
            )
            with progress:
                task = progress.add_task("deliver", total=len(ids), detail="")
                procs = _start_workers(url, server.url, workers)
                last_spawn = time.monotonic()
                while True:
                    done = _done(app) - before
                    progress.update(task, completed=done, detail=f"{server.requests} requests")
                    if done >= len(ids) or time.monotonic() - started > deadline:
                        break
                    if not any(p.is_alive() for p in procs) and time.monotonic() - last_spawn > 1:
                        # Every worker is gone but work is left (a worker crashed, say): end the
                        # attempts whose lease expired, then start successors.
                        asyncio.run(_rescue(app))
                        procs = _start_workers(url, server.url, workers)
                        last_spawn = time.monotonic()
                    time.sleep(0.1)
            _stop_workers(procs)
            procs = []
            summary = _summarise(app, ids, url, seed, started, server.requests)
        finally:
            _stop_workers(procs, wait=0)  # only still set when interrupted
            app.close()
    if not quiet:
        _print_summary(console, summary)
    return summary


def _summarise(
    app: Durably, ids: set[int], url: str, seed: int, started: float, requests: int
) -> DemoSummary:
    found = _our_jobs(app, ids)
    elapsed = time.monotonic() - started
    first = sum(1 for j in found if j.status is Status.SUCCEEDED and j.attempts == 1)
    later = sum(1 for j in found if j.status is Status.SUCCEEDED and j.attempts > 1)
    dead = Counter(j.classification or "unknown" for j in found if j.status is Status.DEAD_LETTER)
    other = Counter(
        j.status.value for j in found if j.status not in (Status.SUCCEEDED, Status.DEAD_LETTER)
    )
    actual = {"succeeded_first_time": first, "succeeded_after_retries": later, **dead}
    expected = expected_outcomes(seed, len(ids))
    example = min((j.id for j in found if j.status is Status.DEAD_LETTER), default=None)
    return DemoSummary(
        url=mask_url(url),
        seed=seed,
        total=len(found),
        succeeded_first_time=first,
        succeeded_after_retries=later,
        dead_letter=dict(sorted(dead.items())),
        other=dict(sorted(other.items())),
        elapsed=round(elapsed, 3),
        jobs_per_second=round(len(found) / elapsed, 1) if elapsed > 0 else 0.0,
        requests=requests,
        complete=len(found) == len(ids) and all(j.status in DONE for j in found),
        as_scripted={k: v for k, v in actual.items() if v} == expected and not other,
        example_dead_letter=example,
    )


def _print_summary(console: Console, summary: DemoSummary) -> None:
    table = Table(title="durably demo")
    table.add_column("outcome")
    table.add_column("jobs", justify="right")
    table.add_row("succeeded first time", str(summary.succeeded_first_time), style="green")
    table.add_row("succeeded after retries", str(summary.succeeded_after_retries), style="yellow")
    for classification, n in summary.dead_letter.items():
        table.add_row(f"dead-lettered: {classification}", str(n), style="red")
    for status, n in summary.other.items():
        table.add_row(status, str(n))
    table.add_row("total", str(summary.total), style="bold")
    console.print(table)
    dead = " ".join(f"{k}={v}" for k, v in summary.dead_letter.items())
    console.print(
        f"summary: total={summary.total} succeeded_first_time={summary.succeeded_first_time} "
        f"succeeded_after_retries={summary.succeeded_after_retries} "
        f"dead_letter={summary.dead_lettered} ({dead or 'none'}) "
        f"elapsed={summary.elapsed:.2f}s rate={summary.jobs_per_second:.1f} jobs/s "
        f"requests={summary.requests}",
        soft_wrap=True,
    )
    if not summary.complete:
        console.print("[bold red]the demo did not finish: some jobs are still live[/]")
    elif summary.as_scripted:
        console.print(f"every job ended as seed {summary.seed} scripted it")
    example = summary.example_dead_letter if summary.example_dead_letter is not None else "ID"
    url = summary.url
    console.print("inspect them:", soft_wrap=True)
    for command in (
        f"durably jobs ls --url {url} --status dead_letter",
        f"durably jobs show {example} --url {url}",
        f"durably jobs retry {example} --url {url} --actor you",
        f"durably jobs resolve {example} --url {url} --actor you --notes 'fixed by hand'",
        f"durably stats --url {url}",
    ):
        console.print(f"  {command}", soft_wrap=True, markup=False)
