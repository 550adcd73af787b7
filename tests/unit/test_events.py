"""Outcome events with real parts: the SQLite outbox, the publisher, in-process subscribers, a
local HTTP server for webhooks and a real Redis for streams."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import durably
from conftest import unique_name
from durably import Durably, RetryPolicy
from durably.errors import ConfigError
from durably.events import Publisher, RedisStreamSink, WebhookSink, processed_payload
from durably.job import JSON, Event
from durably.testing import FakeClock
from flaky_server import FlakyServer, Reply

BOUND = 10.0
# Failed deliveries come back after exactly 5 s: full jitter with rand() = 0.5 of a 10 s base.
EVENT_POLICY = RetryPolicy(max_attempts=None, initial=10.0, cap=10.0)


def half() -> float:
    return 0.5


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Durably]:
    app = Durably(f"sqlite:///{tmp_path / 'e.db'}", strict=False)
    yield app
    await app.close_async()


@pytest.fixture
async def clocked(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Durably]:
    app = Durably(f"sqlite:///{tmp_path / 'e.db'}", clock=clock.now, strict=False)
    yield app
    await app.close_async()


async def publisher(app: Durably) -> Publisher:
    return await app.publisher_async(policy=EVENT_POLICY, rand=half)


async def cancelled_job(app: Durably, scope: str, actor: str = "alice", **options: Any) -> int:
    """A job whose cancellation writes one ``<scope>.processed`` event; returns its id."""
    job = await app.enqueue_async("anything", {"n": 1}, event_scope=scope, **options)
    await app.cancel_async(job.id, actor=actor)
    return job.id


async def outbox(app: Durably) -> list[Event]:
    """Every due event still in the outbox (claimed briefly and handed straight back)."""
    store = await app.store_async()
    events = await store.claim_events(1000, 60.0)
    for event in events:
        await store.retry_event(event, 0.0, "peeked by the test")
    return events


# -- subscribers, through a worker ---------------------------------------------------------------


async def test_a_burst_worker_delivers_processed_events_to_sync_and_async_subscribers(
    app: Durably,
) -> None:
    @app.operation("charge")
    def charge(payload: JSON) -> JSON:
        return {"charged": payload}

    @app.operation("refuse", policy=RetryPolicy(max_attempts=1))
    def refuse(payload: JSON) -> None:
        raise durably.Permanent(f"card {payload} declined")

    sync_got: list[Event] = []
    async_got: list[Event] = []
    everything: list[Event] = []

    def on_order(event: Event) -> None:
        sync_got.append(event)

    async def on_order_async(event: Event) -> None:
        async_got.append(event)

    def on_any(event: Event) -> None:
        everything.append(event)

    app.subscribe("orders", on_order)
    app.subscribe("orders", on_order_async)
    app.subscribe("*", on_any)

    good = await app.enqueue_async(
        "charge",
        7,
        event_scope="orders",
        key="order-7",
        meta={"request_id": "req-7", "trace_id": "trace-7"},
    )
    bad = await app.enqueue_async("refuse", 8, event_scope="orders", key="order-8")
    refund = await app.enqueue_async("charge", 9, event_scope="refunds")
    silent = await app.enqueue_async("charge", 10)  # no scope: no event

    worker = app.worker(burst=True, poll_interval=0.02)
    await asyncio.wait_for(worker.run(), BOUND)

    by_job = {event.job_id: event for event in sync_got}
    assert set(by_job) == {good.id, bad.id}
    assert [e.id for e in async_got] == [e.id for e in sync_got]
    ok = by_job[good.id]
    assert ok.type == "orders.processed"
    assert {k: ok.payload[k] for k in ("status", "result", "error", "key", "handler")} == {
        "status": "succeeded",
        "result": {"charged": 7},
        "error": None,
        "key": "order-7",
        "handler": "charge",
    }
    assert (ok.payload["request_id"], ok.payload["trace_id"]) == ("req-7", "trace-7")
    failed = by_job[bad.id]
    assert failed.payload["status"] == "dead_letter"
    assert failed.payload["result"] is None
    assert failed.payload["error"] == {
        "type": "Permanent",
        "message": "card 8 declined",
        "classification": "permanent",
    }
    assert (failed.payload["key"], failed.payload["request_id"]) == ("order-8", None)
    # "*" sees every scope, and only jobs that opted in have events.
    assert {(e.type, e.job_id) for e in everything} == {
        ("orders.processed", good.id),
        ("orders.processed", bad.id),
        ("refunds.processed", refund.id),
    }
    assert silent.id not in {e.job_id for e in everything}
    assert worker.publisher is not None
    assert (worker.publisher.delivered, worker.publisher.failed) == (3, 0)
    assert await outbox(app) == []


async def test_the_payload_is_the_jobs_state_when_it_ended(app: Durably) -> None:
    got: list[Event] = []
    app.subscribe("orders", got.append)
    job_id = await cancelled_job(app, "orders", actor="carol")

    await (await publisher(app)).run_once()

    [event] = got
    job = await app.get_async(job_id)
    assert event.payload == processed_payload(job)
    assert (event.payload["status"], event.payload["operator"]) == ("cancelled", "carol")


# -- retries and order ---------------------------------------------------------------------------


async def test_a_failing_subscriber_retries_the_event_and_holds_back_only_its_jobs_later_events(
    clocked: Durably, clock: FakeClock
) -> None:
    delivered: list[tuple[int | None, JSON]] = []
    refuse = {"on": True}

    def subscriber(event: Event) -> None:
        if refuse["on"] and event.payload["operator"] == "alice":
            raise RuntimeError("subscriber is down")
        delivered.append((event.job_id, event.payload["operator"]))

    clocked.subscribe("orders", subscriber)
    # Job A ends twice (cancelled by alice, requeued, cancelled by bob); job B once.
    a = await cancelled_job(clocked, "orders", actor="alice")
    await clocked.requeue_async(a, actor="alice")
    await clocked.cancel_async(a, actor="bob")
    b = await cancelled_job(clocked, "orders", actor="dave")
    pub = await publisher(clocked)

    assert await pub.run_once() == 1
    assert delivered == [(b, "dave")]  # A's failure does not block B
    assert (pub.delivered, pub.failed) == (1, 1)

    refuse["on"] = False
    clock.advance(4.9)  # the retry is due after 5 s; bob's event waits behind alice's
    assert await pub.run_once() == 0
    assert delivered == [(b, "dave")]

    clock.advance(0.2)
    assert await pub.run_once() == 1
    assert await pub.run_once() == 1
    assert delivered == [(b, "dave"), (a, "alice"), (a, "bob")]
    assert (pub.delivered, pub.failed) == (3, 1)
    assert await pub.run_once() == 0


async def test_a_failed_event_keeps_failing_with_its_attempts_counted(
    clocked: Durably, clock: FakeClock
) -> None:
    attempts: list[int] = []

    def down(event: Event) -> None:
        attempts.append(event.attempts)
        raise ConnectionError("still down")

    clocked.subscribe("orders", down)
    await cancelled_job(clocked, "orders")
    pub = await publisher(clocked)
    for _ in range(3):
        assert await pub.run_once() == 0
        clock.advance(5.0)

    assert attempts == [1, 2, 3]
    assert (pub.delivered, pub.failed) == (0, 3)
    [waiting] = await outbox(clocked)
    assert waiting.type == "orders.processed"


async def test_a_publisher_killed_mid_delivery_has_its_events_delivered_after_the_lease(
    clocked: Durably, clock: FakeClock
) -> None:
    got: list[Event] = []
    clocked.subscribe("orders", got.append)
    job_id = await cancelled_job(clocked, "orders")
    store = await clocked.store_async()

    # A publisher claims the event and dies before acknowledging it.
    [claimed] = await store.claim_events(10, 30.0)
    assert claimed.job_id == job_id

    pub = await publisher(clocked)
    assert await pub.run_once() == 0  # still leased to the dead publisher
    clock.advance(31)
    assert await pub.run_once() == 1

    [event] = got
    assert (event.id, event.job_id, event.attempts) == (claimed.id, job_id, 2)
    assert pub.delivered == 1
    assert await outbox(clocked) == []
    # The dead publisher waking up late cannot acknowledge what it no longer leases.
    assert await store.ack_events([claimed]) == 0


# -- webhooks ------------------------------------------------------------------------------------


def expected_signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


async def test_a_webhook_receives_the_signed_event_and_a_500_makes_it_retry(
    clocked: Durably, clock: FakeClock
) -> None:
    with FlakyServer([Reply(500), Reply(204)]) as server:
        sink = WebhookSink(server.url("/hooks/durably"), "s3cret", clock=lambda: 1_767_225_600.0)
        clocked.add_sink(sink)
        try:
            job_id = await cancelled_job(
                clocked, "orders", meta={"request_id": "req-1", "trace_id": "trace-1"}
            )
            pub = await publisher(clocked)

            assert await pub.run_once() == 0  # the 500 raised: the event retries
            assert (pub.delivered, pub.failed) == (0, 1)
            assert len(await outbox(clocked)) == 0  # not due yet
            clock.advance(5)
            assert await pub.run_once() == 1
            assert await outbox(clocked) == []
        finally:
            await sink.close()

    assert [r.method for r in server.requests] == ["POST", "POST"]
    first, second = server.requests
    assert first.path == "/hooks/durably"
    for request, attempts in ((first, 1), (second, 2)):
        body = request.json
        assert body["type"] == "orders.processed"
        assert (body["job_id"], body["attempts"]) == (job_id, attempts)
        assert body["payload"]["status"] == "cancelled"
        assert body["payload"]["request_id"] == "req-1"
        headers = request.headers
        assert headers["content-type"] == "application/json"
        assert headers["x-durably-event"] == "orders.processed"
        assert headers["x-durably-event-id"] == str(body["id"])
        assert headers["x-durably-timestamp"] == "1767225600"
        assert headers["x-durably-signature"] == expected_signature(
            "s3cret", "1767225600", request.body
        )
        assert headers["x-durably-signature"] != expected_signature(
            "other", "1767225600", request.body
        )
    assert first.json["id"] == second.json["id"]


async def test_a_webhook_answering_500_raises_from_deliver() -> None:
    event = Event(
        id=1, type="orders.processed", payload={"n": 1}, created_at=datetime.now(UTC), job_id=3
    )
    with FlakyServer([Reply(500)]) as server:
        sink = WebhookSink(server.url("/"), "s3cret")
        try:
            with pytest.raises(RuntimeError, match="500"):
                await sink.deliver(event)
        finally:
            await sink.close()
    [request] = server.requests
    assert json.loads(request.body) == event.to_dict()
    timestamp = request.headers["x-durably-timestamp"]
    assert request.headers["x-durably-signature"] == sink.sign(timestamp, request.body)
    assert sink.sign(timestamp, request.body) == expected_signature(
        "s3cret", timestamp, request.body
    )


async def test_a_webhook_closes_only_the_client_it_made() -> None:
    given = httpx.AsyncClient()
    try:
        await WebhookSink("https://example.com/hook", "s3cret", client=given).close()
        assert not given.is_closed  # the caller's, to close
    finally:
        await given.aclose()
    made = WebhookSink("https://example.com/hook", "s3cret")
    client = made._clients.get()
    await made.close()
    assert client.is_closed
    fresh = made._clients.get()  # a later delivery gets a fresh one
    assert fresh is not client
    await made.close()
    assert fresh.is_closed


def _deliver_in_a_new_loop(sink: WebhookSink | RedisStreamSink, event: Event) -> None:
    async def deliver() -> None:
        try:
            await sink.deliver(event)
        finally:
            await sink.close()

    asyncio.run(deliver())


async def test_sinks_deliver_from_one_event_loop_after_another(
    redis_url: str, redis_client: Any, stream: str
) -> None:
    # An app's sinks outlive an asyncio.run (a second run_worker, a script's): pooled
    # connections of a closed loop must not be reused ("Event loop is closed").
    event = Event(id=1, type="t.processed", payload={"n": 1}, created_at=datetime.now(UTC))
    with FlakyServer([Reply(204), Reply(204)]) as server:
        webhook = WebhookSink(server.url("/"), "s3cret")
        for _ in range(2):
            await asyncio.to_thread(_deliver_in_a_new_loop, webhook, event)
    assert len(server.requests) == 2
    streamed = RedisStreamSink(redis_url, stream)
    for _ in range(2):
        await asyncio.to_thread(_deliver_in_a_new_loop, streamed, event)
    assert await redis_client.xlen(stream) == 2


@pytest.mark.parametrize(
    ("url", "secret", "message"),
    [
        ("ftp://example.com/hook", "s3cret", "http"),
        ("example.com/hook", "s3cret", "http"),
        ("https://example.com/hook", "", "secret"),
    ],
)
def test_a_webhook_refuses_bad_settings(url: str, secret: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WebhookSink(url, secret)


# -- Redis streams -------------------------------------------------------------------------------


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def stream(redis_client: Any) -> AsyncIterator[str]:
    name = unique_name("durably-test-stream")
    yield name
    await redis_client.delete(name)


async def test_a_redis_stream_gets_each_event_with_its_fields(
    app: Durably, redis_url: str, redis_client: Any, stream: str
) -> None:
    sink = RedisStreamSink(redis_url, stream)
    app.add_sink(sink)
    try:
        traced = await cancelled_job(
            app, "orders", meta={"request_id": "req-1", "trace_id": "trace-1"}
        )
        plain = await cancelled_job(app, "refunds")
        assert await (await publisher(app)).run_once() == 2
    finally:
        await sink.close()

    entries = await redis_client.xrange(stream)
    fields = [{k.decode(): v.decode() for k, v in entry.items()} for _, entry in entries]
    assert [(f["event_type"], f["job_id"]) for f in fields] == [
        ("orders.processed", str(traced)),
        ("refunds.processed", str(plain)),
    ]
    first, second = fields
    assert set(first) == {"event_type", "event_id", "payload", "job_id", "request_id", "trace_id"}
    assert (first["request_id"], first["trace_id"]) == ("req-1", "trace-1")
    assert set(second) == {"event_type", "event_id", "payload", "job_id"}
    assert int(first["event_id"]) < int(second["event_id"])
    payload = json.loads(first["payload"])
    assert payload == processed_payload(await app.get_async(traced))


async def test_a_redis_stream_is_trimmed_to_about_maxlen(
    redis_url: str, redis_client: Any, stream: str
) -> None:
    sink = RedisStreamSink(redis_url, stream, maxlen=10)
    now = datetime.now(UTC)
    try:
        for i in range(1, 301):
            await sink.deliver(Event(id=i, type="t.processed", payload={"i": i}, created_at=now))
    finally:
        await sink.close()

    length = await redis_client.xlen(stream)
    # "MAXLEN ~" trims whole stream nodes (100 entries by default): bounded, not exact.
    assert 10 <= length <= 200
    newest = await redis_client.xrevrange(stream, count=1)
    assert newest[0][1][b"event_id"] == b"300"


@pytest.mark.parametrize(
    ("stream_name", "maxlen", "message"), [(" ", 10, "empty"), ("s", 0, "positive")]
)
def test_a_redis_stream_refuses_bad_settings(stream_name: str, maxlen: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RedisStreamSink("redis://127.0.0.1:6379/0", stream_name, maxlen=maxlen)
