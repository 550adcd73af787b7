"""Telemetry at one seam: the worker and the publisher report to a :class:`Telemetry` hook.

``Telemetry`` is a plain class whose methods do nothing: subclass it and override what you need
(StatsD, OpenTelemetry, ...). :class:`PrometheusTelemetry` exposes everything for Prometheus.

>>> app = durably.Durably(telemetry=durably.PrometheusTelemetry())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from durably.job import Completion, Event, Job, Outcome, Status

__all__ = ["FanOut", "PrometheusTelemetry", "Telemetry"]


class Telemetry:
    """Hooks called by workers and publishers. Every method must be cheap and never raise."""

    def job_started(self, job: Job, latency: float) -> None:
        """A claimed job starts; ``latency`` is seconds from when it was due to its claim."""

    def attempt_finished(self, job: Job, completion: Completion, applied: bool) -> None:
        """An attempt ended; ``applied`` is False for a stale write the store rejected."""

    def events_delivered(self, events: Sequence[Event]) -> None:
        """Outcome events reached every sink."""

    def event_failed(self, event: Event, error: BaseException) -> None:
        """An outcome event could not be delivered; it will be retried."""

    def job_counts(self, counts: Mapping[tuple[str, Status], int]) -> None:
        """A fresh census of jobs per (queue, status)."""


class FanOut(Telemetry):
    """Several hooks as one."""

    def __init__(self, *hooks: Telemetry) -> None:
        self.hooks = hooks

    def job_started(self, job: Job, latency: float) -> None:
        for hook in self.hooks:
            hook.job_started(job, latency)

    def attempt_finished(self, job: Job, completion: Completion, applied: bool) -> None:
        for hook in self.hooks:
            hook.attempt_finished(job, completion, applied)

    def events_delivered(self, events: Sequence[Event]) -> None:
        for hook in self.hooks:
            hook.events_delivered(events)

    def event_failed(self, event: Event, error: BaseException) -> None:
        for hook in self.hooks:
            hook.event_failed(event, error)

    def job_counts(self, counts: Mapping[tuple[str, Status], int]) -> None:
        for hook in self.hooks:
            hook.job_counts(counts)


class PrometheusTelemetry(Telemetry):
    """Prometheus metrics (needs the ``metrics`` extra: ``prometheus-client``).

    Counters: ``durably_attempts_total{handler,outcome,classification}``,
    ``durably_retries_scheduled_total{handler}``,
    ``durably_dead_letters_total{handler,classification}``, ``durably_stale_writes_total``,
    ``durably_events_delivered_total``, ``durably_events_failed_total``. Gauge:
    ``durably_jobs{queue,status}``. Histograms: ``durably_run_seconds{handler}``,
    ``durably_start_latency_seconds{queue}``. Pass a ``registry`` to keep them apart (tests).
    """

    def __init__(self, registry: Any = None, namespace: str = "durably") -> None:
        import prometheus_client as prom

        kw: dict[str, Any] = {"namespace": namespace}
        if registry is not None:
            kw["registry"] = registry
        self.attempts = prom.Counter(
            "attempts", "Attempts by outcome", ["handler", "outcome", "classification"], **kw
        )
        self.retries = prom.Counter("retries_scheduled", "Retries scheduled", ["handler"], **kw)
        self.dead_letters = prom.Counter(
            "dead_letters", "Jobs dead-lettered", ["handler", "classification"], **kw
        )
        self.stale_writes = prom.Counter("stale_writes", "Stale worker writes rejected", **kw)
        self.delivered = prom.Counter("events_delivered", "Outcome events delivered", **kw)
        self.failed = prom.Counter("events_failed", "Outcome event deliveries failed", **kw)
        self.jobs = prom.Gauge("jobs", "Jobs by queue and status", ["queue", "status"], **kw)
        self.run_seconds = prom.Histogram("run_seconds", "Attempt run time", ["handler"], **kw)
        self.start_latency = prom.Histogram(
            "start_latency_seconds",
            "Delay from due to start",
            ["queue"],
            buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
            **kw,
        )

    def job_started(self, job: Job, latency: float) -> None:
        self.start_latency.labels(job.queue).observe(max(0.0, latency))

    def attempt_finished(self, job: Job, completion: Completion, applied: bool) -> None:
        if not applied:
            self.stale_writes.inc()
            return
        classification = completion.classification or ""
        self.attempts.labels(job.handler, completion.outcome.value, classification).inc()
        if completion.duration is not None:
            self.run_seconds.labels(job.handler).observe(completion.duration)
        if completion.outcome is Outcome.RETRY:
            self.retries.labels(job.handler).inc()
        elif completion.outcome is Outcome.DEAD_LETTER:
            self.dead_letters.labels(job.handler, classification).inc()

    def events_delivered(self, events: Sequence[Event]) -> None:
        self.delivered.inc(len(events))

    def event_failed(self, event: Event, error: BaseException) -> None:
        self.failed.inc()

    def job_counts(self, counts: Mapping[tuple[str, Status], int]) -> None:
        for (queue, status), count in counts.items():
            self.jobs.labels(queue, status.value).set(count)
