"""Dramatiq 2.2 with its RedisBroker, run through the side-by-side harness.

Settings, and why:

* Workers: ``dramatiq bench.peers.dramatiq_peer --processes 1 --threads 32`` per harness worker
  process (the harness's "2 proc" runs two of them, the same as ``--processes 2``). Threads tried
  on this 2-core machine (W1, 4,000-6,000 no-ops, 1 process, processed/s, noisy: other jobs
  shared the cores): 1: ~240, 2: ~500, 4: ~850-1,040, 8: ~1,750-2,360, 16: ~2,030-2,770,
  32: ~2,890-3,030, 64: ~2,670-2,720. Throughput grows with threads well past the core count
  because the consumer only prefetches ``2 x threads`` messages and sleeps (see below) whenever
  that many are outstanding; 32 was the best.
* Polling: the RedisBroker has no blocking fetch. An idle consumer sleeps a jittered, doubling
  backoff capped by the worker timeout, ``dramatiq_worker_timeout`` (an environment variable
  in Dramatiq's reference; default 1000 ms, so ~0.5-1 s idle latency). It is set to 10 ms here
  for the lowest latency: each poll then sleeps 5-10 ms. Its price is idle CPU: a worker
  measured here used ~13% of a core while idle at 10 ms (100 ms: ~2%, 1000 ms: ~0.2%).
* Retries: the ``Retries`` middleware with ``max_retries=2``, ``min_backoff=max_backoff=10``
  ms. Dramatiq's backoff is ``min_backoff * 2**retries`` times a jitter drawn uniformly from
  [1, 2), and when that exceeds ``max_backoff`` it becomes ``max_backoff`` times a jitter drawn
  from [0.5, 1), truncated to whole ms. Jitter cannot be turned off through the middleware, so
  here the first retry waits 10 ms only when the first draw is below 1.1 (about 1 in 10) and
  5-9 ms otherwise, and the second retry always waits 5-9 ms: never a fixed 10 ms, so a retry
  can start before the 10 ms the harness expects (negative lateness). A delayed message goes
  to the ``.DQ`` delay queue; the worker's delay-queue consumer fetches it (same polling),
  keeps it in memory until its eta, then re-enqueues it on the main queue behind whatever is
  waiting there. The attempt number is Dramatiq's own
  ``message.options["retries"] + 1``, read through the ``CurrentMessage`` middleware (added
  for that; the rest is Dramatiq's default middleware).
* Bulk enqueue: Dramatiq has no batch enqueue; ``group(...).run()`` is a loop of
  ``broker.enqueue``, one Lua script call per message. Measured for 10,000 messages: a plain
  ``broker.enqueue`` loop ~4,450/s, ``group.run()`` ~4,090/s, a thread pool of 2/4/8 senders
  ~2,570-3,300/s (the per-message work is Python, under the GIL). So: the plain loop. W4's
  backlog is the same loop with ``delay`` (ms): messages on the delay queue, which each worker
  prefetches (up to ``1000 x threads`` of them) and holds in memory until due.
* Namespace: ``RedisBroker(namespace=...)`` holding the run's tag; every key the broker writes
  is ``<namespace>:...``, so teardown deletes exactly ``SCAN MATCH <namespace>:*``.
* Stop: SIGTERM is Dramatiq's graceful shutdown (prefetched messages go back to Redis).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, Middleware, Retries, default_middleware

from bench.peers import harness

__all__ = [
    "NAMESPACE_ENV",
    "URL_ENV",
    "RedisAdapter",
    "broker",
    "build_broker",
    "flaky",
    "later",
    "noop",
    "stamp",
]

URL_ENV = "DURABLY_DRAMATIQ_URL"
"""The Redis URL a worker process connects to."""
NAMESPACE_ENV = "DURABLY_DRAMATIQ_NAMESPACE"
"""The broker's key namespace (it holds the run's tag)."""
DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "durably_bench_unset"
WORKER_TIMEOUT_MS = 10
"""Dramatiq's idle poll ceiling (``dramatiq_worker_timeout``, default 1000 ms): see the module."""
RETRY_MS = round(harness.RETRY_FIXED * 1000)
SCAN_COUNT = 1_000


def build_broker(url: str, namespace: str) -> RedisBroker:
    """Dramatiq's default middleware, Retries set to a fixed 10 ms, plus CurrentMessage."""
    middleware: list[Middleware] = []
    for kind in default_middleware:
        if kind is Retries:
            middleware.append(
                Retries(
                    max_retries=harness.SUCCEED_ON - 1, min_backoff=RETRY_MS, max_backoff=RETRY_MS
                )
            )
        else:
            middleware.append(kind())
    # The tasks read Dramatiq's own retry counter from the message being processed.
    middleware.append(CurrentMessage())
    return RedisBroker(  # type: ignore[no-untyped-call]  # Dramatiq leaves it unannotated
        url=url, namespace=namespace, middleware=middleware
    )


broker = build_broker(
    os.environ.get(URL_ENV, DEFAULT_URL), os.environ.get(NAMESPACE_ENV, DEFAULT_NAMESPACE)
)
"""The broker ``dramatiq bench.peers.dramatiq_peer`` finds; its namespace comes from the env."""
dramatiq.set_broker(broker)


@dramatiq.actor
def noop(key: int) -> None:
    """W1's job: only records that it ran."""
    harness.record("noop", key, 1)


@dramatiq.actor
def flaky(key: int) -> None:
    """W2's job: fails until Dramatiq's own retry counter says this is attempt 3."""
    message = CurrentMessage.get_current_message()
    # Retries adds 1 to ``options["retries"]`` each time it re-enqueues a failed message.
    retries = int(message.options.get("retries", 0)) if message is not None else 0
    attempt = retries + 1
    harness.record("flaky", key, attempt)
    if attempt < harness.SUCCEED_ON:
        raise RuntimeError(f"flaky job {key}: failing attempt {attempt} on purpose")


@dramatiq.actor
def stamp(key: int, enqueued_at: float) -> None:
    """W3/W4's job: records with the time it was enqueued."""
    harness.record("stamp", key, 1, enqueued_at)


@dramatiq.actor
def later(key: int) -> None:
    """W4's backlog job, due an hour ahead: must never run during the benchmark."""
    harness.record("later", key, 1)


ACTORS: dict[str, dramatiq.Actor[..., None]] = {
    "noop": noop,
    "flaky": flaky,
    "stamp": stamp,
    "later": later,
}


class RedisAdapter(harness.Adapter):
    """Dramatiq's RedisBroker in a key namespace named after the run's tag."""

    peer: ClassVar[str] = "dramatiq"
    store: ClassVar[str] = "redis"
    distribution: ClassVar[str] = "dramatiq"
    concurrency: ClassVar[int] = 32
    stop_signal: ClassVar[int] = signal.SIGTERM

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.url = os.environ.get(URL_ENV, DEFAULT_URL)
        self.namespace = f"durably_bench_{self.tag}"
        self.broker = build_broker(self.url, self.namespace)

    def env(self) -> dict[str, str]:
        """The Redis URL, the namespace and Dramatiq's idle poll ceiling."""
        return {
            URL_ENV: self.url,
            NAMESPACE_ENV: self.namespace,
            "dramatiq_worker_timeout": str(WORKER_TIMEOUT_MS),
        }

    def worker_argv(self, concurrency: int) -> list[str]:
        """``dramatiq bench.peers.dramatiq_peer`` with one process of ``concurrency`` threads."""
        return [
            sys.executable,
            "-m",
            "dramatiq",
            __name__,
            "--processes",
            "1",
            "--threads",
            str(concurrency),
        ]

    def _send(self, messages: Sequence[dramatiq.Message[Any]], delay: int | None = None) -> None:
        enqueue: Callable[..., Any] = self.broker.enqueue
        for message in messages:
            enqueue(message, delay=delay)

    def enqueue_bulk(self, task: str, keys: Sequence[int]) -> None:
        """One ``broker.enqueue`` per message: Dramatiq has no batch enqueue (see the module)."""
        actor = ACTORS[task]
        self._send([actor.message(key) for key in keys])

    def enqueue_stamp(self, key: int, enqueued_at: float) -> None:
        """``actor.send``, as an application sends one message (here on the run's broker)."""
        self.broker.enqueue(stamp.message(key, enqueued_at))

    def schedule_later(self, keys: Sequence[int], delay: float) -> None:
        """Messages enqueued with ``delay`` (ms): they wait on the delay queue."""
        self._send([later.message(key) for key in keys], delay=round(delay * 1000))

    def teardown(self) -> None:
        """Delete every key under the run's namespace (``SCAN MATCH namespace:*``)."""
        client = self.broker.client
        keys = list(client.scan_iter(match=f"{self.namespace}:*", count=SCAN_COUNT))
        for start in range(0, len(keys), SCAN_COUNT):
            client.delete(*keys[start : start + SCAN_COUNT])

    def close(self) -> None:
        """Close the harness-side broker's Redis connections."""
        with contextlib.suppress(Exception):
            self.broker.close()
            self.broker.client.close()
