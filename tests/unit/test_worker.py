"""The worker against a real SQLite store: exactly-once draining, limits, cancels, fencing,
rescue, graceful stop and the jobs it cannot run."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from durably import Durably, JobContext, Rescuer, RetryPolicy, Status, Worker
from durably.errors import StoreError
from durably.job import JSON, Action, Job
from durably.store.base import ClaimRequest, Lease
from durably.telemetry import Telemetry
from durably.testing import FakeClock

# Waits are bounds on something that happens at once, never a way to synchronise.
BOUND = 10.0
NO_RETRY_SOON = RetryPolicy(max_attempts=3, initial=1000.0, cap=1000.0, jitter="none")


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Durably]:
    app = Durably(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield app
    await app.close_async()


@pytest.fixture
async def clocked(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Durably]:
    app = Durably(f"sqlite:///{tmp_path / 'clocked.db'}", clock=clock.now)
    yield app
    await app.close_async()


def quick_worker(app: Durably, **options: Any) -> Worker:
    options.setdefault("poll_interval", 0.02)
    options.setdefault("burst", True)
    return app.worker(**options)


async def bounded(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, BOUND)


async def test_burst_drains_every_job_exactly_once(app: Durably) -> None:
    calls: Counter[int] = Counter()

    @app.operation("count")
    async def count(payload: JSON, context: JobContext) -> int:
        calls[context.job.id] += 1
        await asyncio.sleep(0)
        return int(payload["i"])

    jobs = await app.enqueue_many_async(
        {"handler": "count", "payload": {"i": i}} for i in range(200)
    )
    worker = quick_worker(app, concurrency=10)

    await bounded(worker.run())

    assert calls == Counter({job.id: 1 for job in jobs})
    assert worker.stats["succeeded"] == 200
    assert worker.stats["claimed"] == 200
    store = await app.store_async()
    assert await store.counts() == {("default", Status.SUCCEEDED): 200}
    done = await store.get(jobs[123].id)
    assert (done.result, done.attempts, done.lease_token) == (123, 1, None)


async def test_no_more_handlers_run_at_once_than_the_concurrency(app: Durably) -> None:
    limit = 4
    active = 0
    highest = 0
    full = asyncio.Event()

    @app.operation("busy")
    async def busy(payload: JSON) -> None:
        nonlocal active, highest
        active += 1
        highest = max(highest, active)
        if active == limit:
            full.set()
        await full.wait()  # the first handlers hold their slots until every slot is taken
        active -= 1

    await app.enqueue_many_async({"handler": "busy", "payload": {"i": i}} for i in range(30))
    worker = quick_worker(app, concurrency=limit, prefetch=3)

    await bounded(worker.run())

    assert highest == limit
    assert worker.stats["succeeded"] == 30


async def test_sync_handlers_run_in_threads_and_async_ones_on_the_loop(app: Durably) -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    @app.operation("blocking")
    def blocking(payload: JSON) -> None:
        seen["sync"] = threading.get_ident()

    @app.operation("nonblocking")
    async def nonblocking(payload: JSON) -> None:
        assert asyncio.get_running_loop() is loop
        seen["async"] = threading.get_ident()

    loop = asyncio.get_running_loop()
    await app.enqueue_async("blocking", {})
    await app.enqueue_async("nonblocking", {})

    await bounded(quick_worker(app).run())

    assert seen["async"] == loop_thread
    assert seen["sync"] != loop_thread


async def test_an_operator_cancel_reaches_a_running_job_through_the_heartbeat(
    app: Durably,
) -> None:
    started = asyncio.Event()
    never = asyncio.Event()
    stopped = asyncio.Event()

    @app.operation("hang")
    async def hang(payload: JSON) -> None:
        started.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            stopped.set()
            raise

    job = await app.enqueue_async("hang", {})
    worker = quick_worker(app, lease_seconds=0.3, heartbeat_interval=0.1)
    running = asyncio.create_task(worker.run())
    await bounded(started.wait())

    asked = await app.act_async(job.id, Action.CANCEL, actor="ops", notes="not needed")
    assert asked.status is Status.RUNNING
    assert asked.cancel_requested

    await bounded(running)
    after = await app.get_async(job.id)
    assert stopped.is_set()
    assert after.status is Status.CANCELLED
    assert after.classification == "cancelled"
    assert worker.stats["cancelled"] == 1
    [attempt] = await app.attempts_async(job.id)
    assert attempt.outcome == "cancelled"


async def test_a_prefetched_job_cancelled_before_it_starts_never_runs(
    app: Durably, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()
    finish = asyncio.Event()
    seen_cancel = asyncio.Event()
    ran: list[int] = []

    @app.operation("step")
    async def step(payload: JSON) -> None:
        ran.append(int(payload["i"]))
        started.set()
        await finish.wait()

    first, second = await app.enqueue_many_async(
        {"handler": "step", "payload": {"i": i}} for i in range(2)
    )
    store = await app.store_async()
    heartbeat = store.heartbeat

    async def heartbeat_and_signal(leases: Sequence[Lease], seconds: float) -> Any:
        result = await heartbeat(leases, seconds)
        if second.id in result.cancel_requested:
            seen_cancel.set()
        return result

    monkeypatch.setattr(store, "heartbeat", heartbeat_and_signal)
    worker = quick_worker(
        app, concurrency=1, prefetch=1, lease_seconds=0.3, heartbeat_interval=0.05
    )
    running = asyncio.create_task(worker.run())
    await bounded(started.wait())
    waiting = await store.get(second.id)
    assert waiting.status is Status.RUNNING  # prefetched, not started

    await app.act_async(second.id, Action.CANCEL, actor="ops")
    await bounded(seen_cancel.wait())
    finish.set()
    await bounded(running)

    assert ran == [0]
    assert (await store.get(first.id)).status is Status.SUCCEEDED
    cancelled = await store.get(second.id)
    assert (cancelled.status, cancelled.classification) == (Status.CANCELLED, "cancelled")


async def test_a_worker_whose_lease_was_rescued_cannot_complete(
    clocked: Durably, clock: FakeClock
) -> None:
    started = asyncio.Event()
    finish = asyncio.Event()

    @clocked.operation("slow", policy=NO_RETRY_SOON)
    async def slow(payload: JSON) -> str:
        started.set()
        await finish.wait()
        return "too late"

    job = await clocked.enqueue_async("slow", {})
    # No heartbeat or rescue of its own during the test: the fake clock decides expiry.
    worker = quick_worker(clocked, lease_seconds=30, heartbeat_interval=29, rescue_interval=3600)
    running = asyncio.create_task(worker.run())
    await bounded(started.wait())
    store = await clocked.store_async()

    clock.advance(31)
    assert await Rescuer(store, clocked.operations).run_once() == 1
    rescued = await store.get(job.id)
    assert rescued.status is Status.RETRYING

    finish.set()
    await bounded(running)

    assert worker.stats["stale_writes"] == 1
    assert worker.stats["succeeded"] == 0
    after = await store.get(job.id)
    assert after == rescued  # the late success changed nothing
    [attempt] = await store.attempts(job.id)
    assert attempt.outcome == "lease_expired"


async def test_rescue_retries_an_expired_lease_then_dead_letters_it_as_poison(
    clocked: Durably, clock: FakeClock
) -> None:
    @clocked.operation("crashy", policy=RetryPolicy(max_attempts=2, initial=5, jitter="none"))
    def crashy(payload: JSON) -> None:
        raise AssertionError("never run: the test plays the crashing worker")

    job = await clocked.enqueue_async("crashy", {})
    store = await clocked.store_async()
    rescuer = Rescuer(store, clocked.operations, rand=lambda: 0.5)
    claim = ClaimRequest(("default",), "doomed", 1, 10.0)

    [held] = await store.claim(claim)
    assert await rescuer.run_once() == 0  # the lease still runs
    clock.advance(11)
    assert await rescuer.run_once() == 1
    first = await store.get(job.id)
    assert first.status is Status.RETRYING
    assert first.classification == "lease_expired"
    assert (first.run_at - clock.now()).total_seconds() == pytest.approx(5.0)

    clock.advance(5)
    [again] = await store.claim(claim)
    assert again.attempts == 2
    assert again.lease_token != held.lease_token
    clock.advance(11)
    assert await rescuer.run_once() == 1

    dead = await store.get(job.id)
    assert dead.status is Status.DEAD_LETTER
    assert dead.classification == "poison"
    history = await store.attempts(job.id)
    assert [(a.number, a.outcome, a.classification) for a in history] == [
        (1, "lease_expired", "lease_expired"),
        (2, "lease_expired", "lease_expired"),  # the verdict is on the job
    ]


async def test_graceful_stop_finishes_the_running_job_and_hands_back_the_rest(
    app: Durably, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()
    finish = asyncio.Event()
    released = asyncio.Event()

    @app.operation("step")
    async def step(payload: JSON) -> int:
        started.set()
        await finish.wait()
        return int(payload["i"])

    first, second, third = await app.enqueue_many_async(
        {"handler": "step", "payload": {"i": i}} for i in range(3)
    )
    store = await app.store_async()
    release = store.release

    async def release_and_signal(leases: Sequence[Lease]) -> int:
        count = await release(leases)
        released.set()
        return count

    monkeypatch.setattr(store, "release", release_and_signal)
    worker = app.worker(
        concurrency=1, prefetch=2, batch_size=3, poll_interval=0.02, shutdown_timeout=BOUND
    )
    running = asyncio.create_task(worker.run())
    await bounded(started.wait())
    assert (await store.get(third.id)).status is Status.RUNNING  # prefetched: claimed

    worker.stop()
    await bounded(released.wait())
    finish.set()
    await bounded(running)

    done = await store.get(first.id)
    assert (done.status, done.result) == (Status.SUCCEEDED, 0)
    assert worker.stats["released"] == 2
    for job in (second, third):
        back = await store.get(job.id)
        assert (back.status, back.attempts, back.lease_token) == (Status.PENDING, 0, None)
        assert await store.attempts(job.id) == []


async def test_stop_before_any_job_returns_at_once(app: Durably) -> None:
    @app.operation("idle")
    async def idle(payload: JSON) -> None:
        raise AssertionError("no job was enqueued")

    worker = app.worker(poll_interval=3600)
    running = asyncio.create_task(worker.run())
    await asyncio.sleep(0)
    worker.stop()
    await bounded(running)
    assert worker.stats["claimed"] == 0


async def test_an_unknown_handler_is_dead_lettered_and_the_worker_carries_on(
    tmp_path: Path,
) -> None:
    app = Durably(f"sqlite:///{tmp_path / 'lenient.db'}", strict=False)
    try:

        @app.operation("known")
        async def known(payload: JSON) -> str:
            return "ran"

        stranger = await app.enqueue_async("not_registered_here", {})
        good = await app.enqueue_async("known", {})

        worker = quick_worker(app, concurrency=1)
        await bounded(worker.run())

        lost = await app.get_async(stranger.id)
        assert (lost.status, lost.classification) == (Status.DEAD_LETTER, "unknown_handler")
        assert "not_registered_here" in (lost.last_error or "")
        assert (await app.get_async(good.id)).status is Status.SUCCEEDED
    finally:
        await app.close_async()


async def test_a_payload_that_is_not_json_is_dead_lettered_and_the_worker_carries_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "raw.db"
    app = Durably(f"sqlite:///{path}")
    try:
        calls: list[JSON] = []

        @app.operation("eat")
        async def eat(payload: JSON) -> None:
            calls.append(payload)

        broken = await app.enqueue_async("eat", {"will": "break"})
        good = await app.enqueue_async("eat", {"fine": True})
        with sqlite3.connect(path) as conn:  # a row written by something else, badly
            conn.execute("UPDATE jobs SET payload = ? WHERE id = ?", ("{not json", broken.id))
        conn.close()

        await bounded(quick_worker(app, concurrency=1).run())

        dead = await app.get_async(broken.id)
        assert (dead.status, dead.classification) == (Status.DEAD_LETTER, "bad_payload")
        assert (await app.get_async(good.id)).status is Status.SUCCEEDED
        assert calls == [{"fine": True}]
    finally:
        await app.close_async()


async def test_a_failing_job_is_retried_when_due_and_recorded_per_attempt(
    clocked: Durably, clock: FakeClock
) -> None:
    outcomes = iter([ConnectionError("flaky"), None])

    @clocked.operation("flaky", policy=RetryPolicy(max_attempts=3, initial=60, jitter="none"))
    async def flaky(payload: JSON) -> str:
        error = next(outcomes)
        if error is not None:
            raise error
        return "ok"

    job = await clocked.enqueue_async("flaky", {})
    first = quick_worker(clocked)
    await bounded(first.run())  # the retry is a minute away: burst ends
    waiting = await clocked.get_async(job.id)
    assert (waiting.status, waiting.classification) == (Status.RETRYING, "transient")
    assert first.stats["retry"] == 1

    clock.advance(60)
    await bounded(quick_worker(clocked).run())
    done = await clocked.get_async(job.id)
    assert (done.status, done.attempts, done.result) == (Status.SUCCEEDED, 2, "ok")
    assert [a.outcome for a in await clocked.attempts_async(job.id)] == ["failed", "succeeded"]


async def test_a_claimed_job_starts_before_the_worker_reads_the_schedule(app: Durably) -> None:
    # The idle path's store round trip must not sit between a claim and the handler's start.
    started: list[int] = []
    started_when_read: list[list[int]] = []

    @app.operation("mark")
    async def mark(payload: JSON) -> None:
        started.append(int(payload["i"]))

    store = await app.store_async()
    read_schedule = store.next_due_in

    async def spying(queues: Sequence[str]) -> float | None:
        started_when_read.append(list(started))
        return await read_schedule(queues)

    store.next_due_in = spying  # type: ignore[method-assign]
    await app.enqueue_async("mark", {"i": 1})
    await bounded(quick_worker(app).run())

    assert started_when_read[0] == [1]


async def test_claims_shrink_while_retries_are_due_soon(app: Durably) -> None:
    # Whole-room claims while jobs do not retry (each claim is a commit); a quarter of the
    # concurrency, but at least 10 jobs, once this worker scheduled a retry due within seconds,
    # so it is claimed promptly without the worker becoming claim-bound.
    limits: list[tuple[int, list[tuple[str, int]]]] = []

    @app.operation("flaky", policy=RetryPolicy(max_attempts=3, fixed=0.001, jitter="none"))
    async def flaky(payload: JSON, context: JobContext) -> None:
        if context.attempt == 1:
            raise ConnectionError("first attempt fails")

    @app.operation("fine")
    async def fine(payload: JSON) -> None:
        await asyncio.sleep(0)

    store = await app.store_async()
    claim = store.claim

    async def spying(request: ClaimRequest) -> list[Job]:
        jobs = await claim(request)
        limits.append((request.limit, [(j.handler, j.attempts) for j in jobs]))
        return jobs

    store.claim = spying  # type: ignore[method-assign]
    await app.enqueue_many_async([{"handler": "fine"}] * 30)
    await bounded(quick_worker(app, concurrency=60, prefetch=60).run())
    # Small until the first endings show whether jobs retry; whole-room once they show none.
    assert limits[0][0] == 15
    assert max(limit for limit, _ in limits) == 120

    limits.clear()
    await app.enqueue_async("flaky")
    await app.enqueue_many_async([{"handler": "fine"}] * 30)
    await bounded(quick_worker(app, concurrency=60, prefetch=60).run())
    (retry_claim,) = [limit for limit, got in limits if ("flaky", 2) in got]
    assert retry_claim == 15

    # A small worker's claims do not shrink below 10 jobs (nor beyond its whole room).
    limits.clear()
    await app.enqueue_async("flaky")
    await bounded(quick_worker(app, concurrency=8, prefetch=8).run())
    (retry_claim,) = [limit for limit, got in limits if ("flaky", 2) in got]
    assert retry_claim == 10
    limits.clear()
    await app.enqueue_async("flaky")
    await bounded(quick_worker(app, concurrency=3, prefetch=3).run())
    (retry_claim,) = [limit for limit, got in limits if ("flaky", 2) in got]
    assert retry_claim == 6


async def test_retries_are_logged_as_info_and_dead_letters_as_warnings(
    clocked: Durably, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Operators alert on warnings: a retry is the policy doing its job, a dead letter is not.
    @clocked.operation("doomed", policy=RetryPolicy(max_attempts=2, initial=60, jitter="none"))
    async def doomed(payload: JSON) -> None:
        raise ConnectionError("still down")

    caplog.set_level(logging.INFO, logger="durably.worker")
    job = await clocked.enqueue_async("doomed", {})
    await bounded(quick_worker(clocked).run())
    clock.advance(60)
    await bounded(quick_worker(clocked).run())

    assert (await clocked.get_async(job.id)).status is Status.DEAD_LETTER
    endings = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "durably.worker" and f"job {job.id} attempt" in r.getMessage()
    ]
    assert [level for level, _ in endings] == [logging.INFO, logging.WARNING], endings
    assert "retry (transient: still down), next in 60.00s" in endings[0][1]
    assert "dead_letter" in endings[1][1]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    from durably.errors import ConfigError

    app = Durably(f"sqlite:///{tmp_path / 'cfg.db'}")
    for options in (
        {"concurrency": 0},
        {"lease_seconds": 0},
        {"poll_interval": 0},
        {"lease_seconds": 1, "heartbeat_interval": 1},
    ):
        with pytest.raises(ConfigError):
            app.worker(**options)


async def test_a_claimed_retry_runs_before_fresh_jobs_already_waiting(tmp_path: Path) -> None:
    # One runner, fresh jobs prefetched behind it: a retry claimed after them must not wait for
    # all of them (the store claims retries first; the worker's own queue keeps that order).
    changed = asyncio.Event()
    claims: list[tuple[str, int]] = []
    order: list[tuple[str, int]] = []

    class Claims(Telemetry):
        def job_started(self, job: Job, latency: float) -> None:
            claims.append((job.handler, job.attempts))
            changed.set()

    async def until(predicate: Callable[[], bool]) -> None:
        while True:
            changed.clear()
            if predicate():
                return
            await changed.wait()

    app = Durably(f"sqlite:///{tmp_path / 'jobs.db'}", telemetry=Claims())
    first_gate, fresh_gate = asyncio.Event(), asyncio.Event()

    @app.operation("flaky", policy=RetryPolicy(max_attempts=3, fixed=0.001, jitter="none"))
    async def flaky(payload: JSON, context: JobContext) -> None:
        order.append(("flaky", context.attempt))
        changed.set()
        if context.attempt == 1:
            await first_gate.wait()
            raise RuntimeError("first attempt fails")

    @app.operation("fresh")
    async def fresh(payload: JSON, context: JobContext) -> None:
        order.append(("fresh", int(payload["i"])))
        changed.set()
        if payload["i"] == 1:
            await fresh_gate.wait()

    try:
        await app.enqueue_async("flaky")
        worker = app.worker(concurrency=1, prefetch=3, poll_interval=0.02)
        running = asyncio.ensure_future(worker.run())
        await bounded(until(lambda: ("flaky", 1) in order))
        for i in (1, 2, 3):
            await app.enqueue_async("fresh", {"i": i})
        await bounded(until(lambda: claims.count(("fresh", 1)) == 3))
        first_gate.set()  # attempt 1 fails; fresh 1 starts and holds the only runner
        await bounded(until(lambda: ("flaky", 2) in claims))  # claimed behind fresh 2 and 3
        assert order == [("flaky", 1), ("fresh", 1)]
        fresh_gate.set()
        await bounded(until(lambda: len(order) == 5))
        worker.stop()
        await bounded(running)
    finally:
        await app.close_async()
    assert order == [("flaky", 1), ("fresh", 1), ("flaky", 2), ("fresh", 2), ("fresh", 3)]


async def test_shutdown_survives_a_service_whose_store_call_ate_its_cancellation(
    app: Durably,
) -> None:
    """A driver may turn a cancellation into a dropped-connection error (seen with redis-py
    under CLIENT KILL): the periodic service must still end, or stop() never returns."""
    worker = app.worker(poll_interval=0.02, rescue_interval=0.01)
    calls = 0
    inside = asyncio.Event()

    async def rescue() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            return  # the rescue at start-up
        inside.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise StoreError("connection closed by server") from None

    worker._rescue = rescue  # type: ignore[method-assign]
    running = asyncio.create_task(worker.run())
    await bounded(inside.wait())
    worker.stop()
    await bounded(running)
    assert calls >= 2
    # The service ended with the worker: not left looping behind it.
    leftover = [t for t in asyncio.all_tasks() if "_every" in repr(t.get_coro())]
    assert leftover == []


async def test_stop_cuts_short_an_idle_wait(app: Durably) -> None:
    """stop() cancels the store's wait: it does not sit out the 30 s poll interval."""
    ran = asyncio.Event()

    async def hello(payload: JSON, context: JobContext) -> None:
        ran.set()

    app.register("hello", hello)
    worker = app.worker(poll_interval=30.0)
    running = asyncio.create_task(worker.run())
    await app.enqueue_async("hello")
    await bounded(ran.wait())

    async def idle_again() -> None:  # loop turns, no sleeping: the store's thread answers
        while not worker._on_stop:
            await asyncio.sleep(0)

    await bounded(idle_again())
    worker.stop()
    await bounded(running)
    assert worker.stats["succeeded"] == 1
    assert worker._on_stop == set()  # each wait unregisters its hook: none pile up
