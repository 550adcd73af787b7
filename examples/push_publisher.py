"""Seed 002 rebuilt: the push publisher, its outcomes on a Redis stream trimmed by MAXLEN ~.

The Go original scanned a sorted set of due routes, leased each with a worker token, computed a
capped exponential backoff, dead-lettered after max attempts with a classification, and XADDed
to a trimmed stream, all by hand. Here each notification route is a durable job:

- due-time scheduling is ``delay=``; leases with fencing, conflicts and the poll-or-loop
  rhythm are the worker's;
- capped backoff and the dead-letter rule are one :class:`durably.RetryPolicy`;
- a failure's classification is the exception's ``classification`` (or ``Permanent``);
- every terminal outcome becomes a ``push.processed`` event written in the same transaction
  as the state change, then delivered at least once by :class:`RedisStreamSink` with
  ``XADD ... MAXLEN ~``, carrying the request and trace ids given at enqueue.

Run it (Redis needed): ``python examples/push_publisher.py [--url URL] [--redis-url URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from typing import Any

import redis

import durably
from durably.events import RedisStreamSink
from durably.job import LIVE

# The seed's routeBackoffDelay: doubling from a minimum, capped (here 10 ms to 20 ms).
POLICY = durably.RetryPolicy(max_attempts=4, initial=0.01, multiplier=2.0, cap=0.02, jitter="none")


class InvalidDeviceToken(durably.Permanent):
    """The push gateway refused the device token: never retried (``permanent``)."""


class GatewayUnavailable(Exception):
    """The push gateway did not answer: retried with backoff."""

    classification = "gateway_unavailable"


# notification id -> how the (simulated) gateway treats it, and the delay before it is due.
NOTIFICATIONS: list[dict[str, Any]] = [
    {"notification_id": "n-1", "user_id": 7, "script": "ok", "delay": 0.0},
    {"notification_id": "n-2", "user_id": 8, "script": "flaky", "delay": 0.0},
    {"notification_id": "n-3", "user_id": 9, "script": "bad-token", "delay": 0.0},
    {"notification_id": "n-4", "user_id": 10, "script": "down", "delay": 0.0},
    {"notification_id": "n-5", "user_id": 11, "script": "ok", "delay": 0.05},  # due later
]


def build_app(url: str) -> durably.Durably:
    """The app with the ``push`` operation (the seed's publishRoute)."""
    app = durably.Durably(url)

    @app.operation("push", policy=POLICY)
    async def push(route: dict[str, Any], context: durably.JobContext) -> dict[str, Any]:
        script = route["script"]
        if script == "bad-token":
            raise InvalidDeviceToken(f"device token of user {route['user_id']} is invalid")
        if script == "down" or (script == "flaky" and context.attempt < 3):
            raise GatewayUnavailable("push gateway unavailable")
        return {"delivered_to": route["user_id"], "attempt": context.attempt}

    return app


async def _drain(app: durably.Durably, ids: list[int], rounds: int = 20) -> list[durably.Job]:
    """Run burst workers until every job is finished (a burst may end before a retry is due)."""
    for _ in range(rounds):
        await app.worker(burst=True, poll_interval=0.2).run()
        jobs = [await app.get_async(job_id) for job_id in ids]
        if all(job.status not in LIVE for job in jobs):
            return jobs
    raise RuntimeError("the notifications did not finish")


async def run(
    url: str, redis_url: str, *, stream: str, maxlen: int, bulk: int
) -> list[tuple[durably.Job, list[durably.Attempt]]]:
    """Publish the notifications (and ``bulk`` plain ones); deliver their outcome events."""
    app = build_app(url)
    sink = RedisStreamSink(redis_url, stream, maxlen=maxlen)
    app.add_sink(sink)
    try:
        routes = NOTIFICATIONS + [
            {"notification_id": f"bulk-{i}", "user_id": 1000 + i, "script": "ok", "delay": 0.0}
            for i in range(bulk)
        ]
        jobs = await app.enqueue_many_async(
            {
                "handler": "push",
                "payload": {k: v for k, v in route.items() if k != "delay"},
                "key": f"push:{route['notification_id']}",
                "delay": route["delay"],
                "event_scope": "push",
                "meta": {
                    "request_id": f"req-{route['notification_id']}",
                    "trace_id": f"trace-{route['notification_id']}",
                },
            }
            for route in routes
        )
        finished = await _drain(app, [job.id for job in jobs])
        # The worker's publisher stops with it; deliver what its last completions wrote.
        publisher = await app.publisher_async()
        while await publisher.run_once():
            pass
        return [(job, await app.attempts_async(job.id)) for job in finished]
    finally:
        await sink.close()
        await app.close_async()


def main(
    url: str,
    redis_url: str,
    *,
    stream: str = "durably:push-outcomes",
    maxlen: int = 10_000,
    bulk: int = 0,
) -> dict[str, Any]:
    """Run the publisher; return each notification's ending and what reached the stream."""
    finished = asyncio.run(run(url, redis_url, stream=stream, maxlen=maxlen, bulk=bulk))
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        entries = [fields for _, fields in client.xrange(stream)]
        length = client.xlen(stream)
    return {
        "jobs": {
            str(job.payload["notification_id"]): {
                "status": job.status.value,
                "attempts": job.attempts,
                "classification": job.classification,
                "attempt_classifications": [attempt.classification for attempt in attempts],
            }
            for job, attempts in finished
        },
        "backoff": [durably.backoff(POLICY, n, lambda: 0.0) for n in (1, 2, 3)],
        "entries": entries,
        "xlen": length,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Seed 002: the push publisher.")
    parser.add_argument("--url", default=f"sqlite:///{tempfile.mkdtemp()}/durably.db")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stream", default="durably:push-outcomes")
    args = parser.parse_args()
    print(json.dumps(main(args.url, args.redis_url, stream=args.stream), indent=2))
