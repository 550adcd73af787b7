"""Outcome events: what subscribers are told when a job ends.

Stores write events into an outbox table (or Redis list) in the same transaction as the state
change, so an event is never lost and never emitted for a change that rolled back. The
:class:`Publisher` delivers them at least once, in order per job, to sinks: in-process
subscribers, a Redis stream, webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import json
import logging
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from durably.errors import ConfigError
from durably.job import JSON, Event, Job, Status
from durably.policy import RetryPolicy, backoff
from durably.store.base import Store
from durably.telemetry import Telemetry

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Publisher",
    "RedisStreamSink",
    "Sink",
    "Subscribers",
    "WebhookSink",
    "batch_payload",
    "event_type",
    "processed_payload",
]

log = logging.getLogger("durably.events")
_C = TypeVar("_C")

Subscriber = Callable[[Event], Any]
"""A callback taking an :class:`~durably.job.Event`; sync (run in a thread) or async."""


def event_type(scope: str | None, kind: str = "processed") -> str:
    """``<scope>.processed`` (seed 003's ``<eventScope-rock-processed>``)."""
    return f"{scope or 'durably'}.{kind}"


def processed_payload(job: Job) -> dict[str, JSON]:
    """The payload of a job's ``<scope>.processed`` event.

    SQL stores build it in the transaction of the change; Redis stores the job's state in the
    same Lua script and builds it from that when the event is claimed. The contract suite
    checks that every store's payload equals this function's.
    """
    error: JSON = None
    if job.status is not Status.SUCCEEDED and job.last_error is not None:
        error = {
            "type": job.last_error_type,
            "message": job.last_error,
            "classification": job.classification,
        }
    return {
        "job_id": job.id,
        "key": job.key,
        "handler": job.handler,
        "queue": job.queue,
        "status": job.status.value,
        "result": job.result if job.status is Status.SUCCEEDED else None,
        "error": error,
        "attempts": job.attempts,
        "batch_id": job.batch_id,
        "item_index": job.item_index,
        "request_id": job.meta.get("request_id"),
        "trace_id": job.meta.get("trace_id"),
        "operator": job.operator,
        "at": _iso(job.updated_at),
    }


def batch_payload(batch_id: str, counts: Mapping[str, int], at: datetime) -> dict[str, JSON]:
    """The payload of a ``<scope>.batch_completed`` event."""
    return {
        "batch_id": batch_id,
        "total": sum(counts.values()),
        "counts": dict(sorted(counts.items())),
        "at": _iso(at),
    }


def _iso(value: datetime) -> str:
    return value.isoformat()


class Sink(Protocol):
    """Somewhere events go. ``deliver`` raises to ask for a retry."""

    name: str

    async def deliver(self, event: Event) -> None:
        """Deliver one event, or raise."""


class Subscribers:
    """In-process subscribers by scope: ``"orders"`` gets ``orders.*`` events, ``"*"`` all."""

    name = "subscribers"

    def __init__(self) -> None:
        self._by_scope: dict[str, list[Subscriber]] = {}

    def add(self, scope: str, callback: Subscriber) -> None:
        """Call ``callback(event)`` for every event of ``scope`` (``"*"`` for every scope)."""
        if not callable(callback):
            raise ConfigError("a subscriber must be callable")
        self._by_scope.setdefault(scope, []).append(callback)

    def __bool__(self) -> bool:
        return bool(self._by_scope)

    async def deliver(self, event: Event) -> None:
        """Call every matching subscriber; the first failure makes the event retry."""
        scope = event.type.rsplit(".", 1)[0]
        for callback in self._by_scope.get(scope, []) + self._by_scope.get("*", []):
            if inspect.iscoroutinefunction(callback):
                await callback(event)
            else:
                outcome = await asyncio.to_thread(callback, event)
                if inspect.isawaitable(outcome):
                    await outcome


class _PerLoop(Generic[_C]):
    """One client per running event loop, made on first use there.

    A network client's pooled connections belong to the loop that opened them: a sink kept by
    an app outlives an ``asyncio.run`` (a second ``run_worker``, a test), and reusing those
    connections from the next loop fails ("Event loop is closed").
    """

    def __init__(self, make: Callable[[], _C]) -> None:
        self._make = make
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _C] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> _C:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._make()
        return client

    def pop(self) -> _C | None:
        """This loop's client, forgotten (for its owner to close), or None if it made none."""
        return self._clients.pop(asyncio.get_running_loop(), None)


class RedisStreamSink:
    """``XADD`` each event to a Redis stream trimmed with ``MAXLEN ~ maxlen`` (seed 002).

    Fields: ``event_type``, ``event_id``, ``payload`` (JSON), ``job_id``, and ``request_id`` /
    ``trace_id`` when the job carried them.
    """

    name = "redis-stream"

    def __init__(self, url: str, stream: str, *, maxlen: int = 10_000) -> None:
        if not stream.strip():
            raise ConfigError("the Redis stream name must not be empty")
        if maxlen <= 0:
            raise ConfigError(f"maxlen must be positive, not {maxlen}")
        import redis.asyncio as aioredis

        self.stream = stream
        self.maxlen = maxlen
        self._clients = _PerLoop(lambda: aioredis.Redis.from_url(url))

    async def deliver(self, event: Event) -> None:
        """Append the event to the stream."""
        fields: dict[str, str | int] = {
            "event_type": event.type,
            "event_id": str(event.id),
            "payload": json.dumps(dict(event.payload), separators=(",", ":")),
        }
        if event.job_id is not None:
            fields["job_id"] = event.job_id
        for name in ("request_id", "trace_id"):
            value = event.payload.get(name)
            if value:
                fields[name] = str(value)
        await self._clients.get().xadd(
            self.stream,
            fields,  # type: ignore[arg-type]
            maxlen=self.maxlen,
            approximate=True,
        )

    async def close(self) -> None:
        """Close this event loop's connection pool (another loop's closes with its loop)."""
        client = self._clients.pop()
        if client is not None:
            await client.aclose()


class WebhookSink:
    """POST each event as JSON, signed: ``X-Durably-Signature: sha256=<hmac>``.

    The signature is HMAC-SHA256 with ``secret`` over ``"<timestamp>.<body>"``, the timestamp
    being ``X-Durably-Timestamp``; receivers should check both and reject old timestamps.
    Any non-2xx answer or network error makes the event retry.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"a webhook URL must be http(s), not {url!r}")
        if not secret:
            raise ConfigError("a webhook needs a signing secret")
        import httpx  # here, not at module level: workers without webhooks start faster

        self.url = url
        self._secret = secret.encode()
        # A client passed in is its owner's to scope and close; ours are one per event loop.
        self._given = client
        self._clients = _PerLoop(lambda: httpx.AsyncClient(timeout=timeout))
        self._clock = clock

    def sign(self, timestamp: str, body: bytes) -> str:
        """The signature header value for ``body`` sent at ``timestamp``."""
        mac = hmac.new(self._secret, timestamp.encode() + b"." + body, hashlib.sha256)
        return f"sha256={mac.hexdigest()}"

    async def deliver(self, event: Event) -> None:
        """POST the event; raise on anything but 2xx."""
        body = json.dumps(event.to_dict(), separators=(",", ":")).encode()
        timestamp = str(int(self._clock()))
        client = self._given if self._given is not None else self._clients.get()
        response = await client.post(
            self.url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Durably-Event": event.type,
                "X-Durably-Event-Id": str(event.id),
                "X-Durably-Timestamp": timestamp,
                "X-Durably-Signature": self.sign(timestamp, body),
            },
        )
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"webhook answered {response.status_code}")

    async def close(self) -> None:
        """Close the HTTP client this sink made for this event loop; a ``client`` passed in
        stays its owner's."""
        client = self._clients.pop()
        if client is not None:
            await client.aclose()


class Publisher:
    """Delivers outbox events to sinks, at least once and in order per job.

    A failed delivery is retried with ``policy`` backoff (unlimited attempts by default); a
    job's later events wait behind its failed one. Runs beside the worker, so a slow sink never
    blocks job processing. ``run_once`` is for tests and cron-style use.
    """

    def __init__(
        self,
        store: Store,
        sinks: Sequence[Sink],
        *,
        batch_size: int = 100,
        lease_seconds: float = 60.0,
        policy: RetryPolicy | None = None,
        rand: Callable[[], float] = random.random,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store = store
        self.sinks = list(sinks)
        self.telemetry = telemetry or Telemetry()
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.policy = policy or RetryPolicy(max_attempts=None, initial=1.0, cap=300.0)
        self.rand = rand
        self.delivered = 0
        self.failed = 0

    async def run_once(self) -> int:
        """Deliver one batch of due events; return how many were delivered."""
        events = await self.store.claim_events(self.batch_size, self.lease_seconds)
        done: list[Event] = []
        blocked: set[int] = set()
        for event in events:
            if event.job_id is not None and event.job_id in blocked:
                await self.store.retry_event(event, 0.0, "an earlier event of its job failed")
                continue
            try:
                for sink in self.sinks:
                    await sink.deliver(event)
            except Exception as exc:
                self.failed += 1
                self.telemetry.event_failed(event, exc)
                delay = backoff(self.policy, max(1, event.attempts), self.rand)
                log.warning(
                    "event %s (%s) not delivered (attempt %d): %s; retry in %.1fs",
                    event.id,
                    event.type,
                    event.attempts,
                    exc,
                    delay,
                    extra={"event_id": event.id, "job_id": event.job_id},
                )
                await self.store.retry_event(event, delay, f"{type(exc).__name__}: {exc}")
                if event.job_id is not None:
                    blocked.add(event.job_id)
                continue
            done.append(event)
        if done:
            await self.store.ack_events(done)
            self.delivered += len(done)
            self.telemetry.events_delivered(done)
        return len(done)

    async def run(self, stop: asyncio.Event, *, poll_interval: float = 0.5) -> None:
        """Deliver until ``stop`` is set; store errors are logged and retried."""
        while not stop.is_set():
            try:
                delivered = await self.run_once()
            except Exception as exc:  # never let the publisher die: events wait in the outbox
                log.error("event publisher: %s", exc)
                delivered = 0
            if delivered < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=poll_interval)
