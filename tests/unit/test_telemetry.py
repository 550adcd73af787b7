"""Telemetry hooks fed by a real worker on SQLite: Prometheus counters, FanOut, custom hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

import durably
from durably import Durably, RetryPolicy
from durably.job import JSON, Completion, Event, Job, Outcome, Status
from durably.telemetry import FanOut, PrometheusTelemetry, Telemetry

BOUND = 10.0
# A retry far away: a burst worker leaves the job retrying.
LATER = RetryPolicy(max_attempts=3, initial=1000.0, cap=1000.0, jitter="none")


class Recorder(Telemetry):
    """Remembers every call."""

    def __init__(self) -> None:
        self.started: list[tuple[int, float]] = []
        self.finished: list[tuple[int, Outcome, str | None, bool]] = []
        self.delivered: list[int] = []
        self.failed: list[tuple[int, str]] = []
        self.counts: list[dict[tuple[str, Status], int]] = []

    def job_started(self, job: Job, latency: float) -> None:
        self.started.append((job.id, latency))

    def attempt_finished(self, job: Job, completion: Completion, applied: bool) -> None:
        self.finished.append((job.id, completion.outcome, completion.classification, applied))

    def events_delivered(self, events: Sequence[Event]) -> None:
        self.delivered.extend(e.id for e in events)

    def event_failed(self, event: Event, error: BaseException) -> None:
        self.failed.append((event.id, str(error)))

    def job_counts(self, counts: Mapping[tuple[str, Status], int]) -> None:
        self.counts.append(dict(counts))


def running_job(job_id: int, now: datetime) -> Job:
    return Job(
        id=job_id,
        queue="default",
        handler="ok",
        payload=None,
        status=Status.RUNNING,
        attempts=1,
        max_attempts=3,
        policy={},
        run_at=now,
        version=2,
        created_at=now,
        updated_at=now,
    )


def register(app: Durably) -> None:
    @app.operation("ok")
    def ok(payload: JSON) -> JSON:
        return payload

    @app.operation("flaky", policy=LATER)
    def flaky(payload: JSON) -> None:
        raise ConnectionError("upstream down")

    @app.operation("bad", policy=LATER)
    def bad(payload: JSON) -> None:
        raise durably.Permanent("no such customer")

    @app.operation("once", policy=RetryPolicy(max_attempts=1))
    def once(payload: JSON) -> None:
        raise ConnectionError("upstream down")


async def run_burst(app: Durably) -> None:
    """3 ``ok``, 2 ``flaky`` (retry scheduled), 1 ``bad`` (permanent), 1 ``once`` (exhausted)."""
    register(app)
    await app.enqueue_many_async(
        [{"handler": "ok", "payload": i} for i in range(3)]
        + [{"handler": "flaky", "payload": i} for i in range(2)]
        + [{"handler": "bad", "payload": 0}, {"handler": "once", "payload": 0}]
    )
    await asyncio.wait_for(app.worker(burst=True, poll_interval=0.02).run(), BOUND)


async def test_prometheus_counts_attempts_retries_dead_letters_and_run_times(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    app = Durably(f"sqlite:///{tmp_path / 't.db'}", telemetry=PrometheusTelemetry(registry))
    try:
        await run_burst(app)
        statuses = {j.handler: j.status for j in await app.jobs_async()}
        assert statuses == {
            "ok": Status.SUCCEEDED,
            "flaky": Status.RETRYING,
            "bad": Status.DEAD_LETTER,
            "once": Status.DEAD_LETTER,
        }
        once = next(j for j in await app.jobs_async() if j.handler == "once")
    finally:
        await app.close_async()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    attempts = "durably_attempts_total"
    assert value(attempts, handler="ok", outcome="succeeded", classification="") == 3
    assert value(attempts, handler="flaky", outcome="retry", classification="transient") == 2
    assert value(attempts, handler="bad", outcome="dead_letter", classification="permanent") == 1
    assert once.classification is not None
    assert (
        value(attempts, handler="once", outcome="dead_letter", classification=once.classification)
        == 1
    )
    assert value("durably_retries_scheduled_total", handler="flaky") == 2
    assert value("durably_retries_scheduled_total", handler="ok") is None
    assert value("durably_dead_letters_total", handler="bad", classification="permanent") == 1
    assert (
        value("durably_dead_letters_total", handler="once", classification=once.classification) == 1
    )
    assert value("durably_dead_letters_total", handler="flaky", classification="transient") is None
    assert value("durably_stale_writes_total") == 0
    for handler, count in (("ok", 3), ("flaky", 2), ("bad", 1), ("once", 1)):
        assert value("durably_run_seconds_count", handler=handler) == count
        run_time = value("durably_run_seconds_sum", handler=handler)
        assert run_time is not None
        assert run_time >= 0
    assert value("durably_start_latency_seconds_count", queue="default") == 7


async def test_a_custom_hook_sees_every_start_and_attempt(tmp_path: Path) -> None:
    recorder = Recorder()
    app = Durably(f"sqlite:///{tmp_path / 't.db'}", telemetry=recorder)
    try:
        await run_burst(app)
        jobs = {j.id: j for j in await app.jobs_async()}
    finally:
        await app.close_async()

    assert sorted(job_id for job_id, _ in recorder.started) == sorted(jobs)
    assert all(latency >= 0 for _, latency in recorder.started)
    outcomes = sorted(
        (jobs[job_id].handler, outcome.value, classification, applied)
        for job_id, outcome, classification, applied in recorder.finished
    )
    once = next(j for j in jobs.values() if j.handler == "once")
    assert outcomes == sorted(
        [("ok", "succeeded", None, True)] * 3
        + [("flaky", "retry", "transient", True)] * 2
        + [
            ("bad", "dead_letter", "permanent", True),
            ("once", "dead_letter", once.classification, True),
        ]
    )


async def test_the_publisher_reports_deliveries_and_failures(tmp_path: Path) -> None:
    recorder = Recorder()
    app = Durably(f"sqlite:///{tmp_path / 't.db'}", telemetry=recorder, strict=False)
    refuse = {"on": True}

    def subscriber(event: Event) -> None:
        if refuse["on"]:
            raise RuntimeError("not now")

    app.subscribe("orders", subscriber)
    try:
        job = await app.enqueue_async("x", {}, event_scope="orders")
        await app.cancel_async(job.id)
        publisher = await app.publisher_async(rand=lambda: 0.0)  # a retry due at once
        assert await publisher.run_once() == 0
        refuse["on"] = False
        assert await publisher.run_once() == 1
    finally:
        await app.close_async()

    [(failed_id, error)] = recorder.failed
    assert error == "not now"
    assert recorder.delivered == [failed_id]


def test_fan_out_calls_every_hook_with_the_same_arguments() -> None:
    first, second = Recorder(), Recorder()
    fan = FanOut(first, second)
    now = datetime.now(UTC)
    job = running_job(5, now)
    completion = Completion(
        job_id=5, lease_token="t", attempt=1, outcome=Outcome.RETRY, classification="transient"
    )
    event = Event(id=9, type="orders.processed", payload={}, created_at=now, job_id=5)

    fan.job_started(job, 0.25)
    fan.attempt_finished(job, completion, False)
    fan.events_delivered([event])
    fan.event_failed(event, RuntimeError("boom"))
    fan.job_counts({("default", Status.PENDING): 4})

    for hook in (first, second):
        assert hook.started == [(5, 0.25)]
        assert hook.finished == [(5, Outcome.RETRY, "transient", False)]
        assert hook.delivered == [9]
        assert hook.failed == [(9, "boom")]
        assert hook.counts == [{("default", Status.PENDING): 4}]


def test_prometheus_counts_a_stale_write_and_the_census() -> None:
    registry = CollectorRegistry()
    telemetry = PrometheusTelemetry(registry)
    now = datetime.now(UTC)
    job = running_job(1, now)
    telemetry.attempt_finished(
        job, Completion(job_id=1, lease_token="t", attempt=1, outcome=Outcome.SUCCEEDED), False
    )
    telemetry.job_counts({("default", Status.PENDING): 4, ("mail", Status.DEAD_LETTER): 1})

    assert registry.get_sample_value("durably_stale_writes_total") == 1
    assert (
        registry.get_sample_value(
            "durably_attempts_total",
            {"handler": "ok", "outcome": "succeeded", "classification": ""},
        )
        is None
    )
    assert registry.get_sample_value("durably_jobs", {"queue": "default", "status": "pending"}) == 4
    assert (
        registry.get_sample_value("durably_jobs", {"queue": "mail", "status": "dead_letter"}) == 1
    )
