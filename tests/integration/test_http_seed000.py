"""Seed 000 end to end: the stream-server POST as a durable job on the built-in HTTP operation.

The seed retried a POST 3 times with 1 s then 2 s backoff, checking its context before each
attempt and during backoff. Here every scenario runs through a SQLite app, a burst worker and a
real local flaky server; the policy keeps the seed's shape (3 attempts, multiplier 2, no jitter)
with millisecond delays, so nothing sleeps for the backoff.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from durably import Durably
from durably.http import HTTP_OPERATION, http_payload, register_http
from durably.job import TERMINAL, Job, Status
from durably.policy import RetryPolicy
from durably.testing import FakeClock
from flaky_server import FlakyServer, Reply

FAST = RetryPolicy(max_attempts=3, initial=0.001, multiplier=2, cap=0.002, jitter="none")
TRACK = {"track_id": 42, "source": "upload"}
SETTLED = TERMINAL | {Status.DEAD_LETTER}


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with FlakyServer() as flaky:
        yield flaky


def make_app(tmp_path: Path, policy: RetryPolicy = FAST, **options: object) -> Durably:
    app = Durably(f"sqlite:///{tmp_path}/j.db", **options)
    register_http(app, policy=policy)
    return app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Durably]:
    with make_app(tmp_path) as durable:
        yield durable


def enqueue(app: Durably, server: FlakyServer, timeout: float = 5.0, path: str = "/jobs") -> Job:
    return app.enqueue(
        HTTP_OPERATION, http_payload(server.url(path), TRACK, timeout=timeout), key=f"stream{path}"
    )


def drain(app: Durably) -> None:
    """Run a burst worker until no job is due within its poll interval (0.5 s).

    The interval stays above every backoff the tests schedule (at most 0.4 s), so a burst only
    ends on the deliberate 60 s backoff of the cancel test.
    """
    app.run_worker(burst=True, poll_interval=0.5)


def settle(app: Durably, job: Job) -> Job:
    """Drain until ``job`` is finished.

    A burst worker can stop while a just-failed attempt's retry is not yet written (it checks
    the schedule, then sees no running job); the job then waits, due, for the next burst.
    """
    for _ in range(10):
        drain(app)
        current = app.get(job.id)
        if current.status in SETTLED:
            return current
    raise AssertionError(f"job {job.id} did not finish: {app.get(job.id)}")


# -- seed test 1: RetryOnFailure --------------------------------------------------------------


def test_fails_twice_then_succeeds(app: Durably, server: FlakyServer) -> None:
    server.script(Reply(500, body="down"), Reply(503), Reply(200, body={"stream_id": "s-1"}))
    job = enqueue(app, server)
    done = settle(app, job)
    assert done.status is Status.SUCCEEDED
    assert done.result == {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": {"stream_id": "s-1"},
    }
    assert server.count == 3
    assert all(r.json == TRACK and r.method == "POST" for r in server.requests)
    attempts = app.attempts(job.id)
    assert [a.outcome for a in attempts] == ["failed", "failed", "succeeded"]
    assert [a.classification for a in attempts[:2]] == ["transient", "transient"]


# -- seed test 2: MaxRetriesExceeded ----------------------------------------------------------


def test_always_503_dead_letters_exhausted_after_three_requests(
    app: Durably, server: FlakyServer
) -> None:
    server.script(Reply(503, body="unavailable"))
    job = enqueue(app, server)
    dead = settle(app, job)
    assert dead.status is Status.DEAD_LETTER
    assert dead.classification == "exhausted"
    assert dead.attempts == 3
    assert "answered 503: unavailable" in (dead.last_error or "")
    assert server.count == 3
    attempts = app.attempts(job.id)
    assert [a.number for a in attempts] == [1, 2, 3]
    assert {a.error_type for a in attempts} == {"HttpStatusError"}


def test_retry_after_is_honoured_but_capped_by_the_policy(
    app: Durably, server: FlakyServer
) -> None:
    # The server asks for an hour; the policy's cap (2 ms) wins, so the burst still drains.
    server.script(Reply(503, headers={"Retry-After": "3600"}), Reply(200))
    job = enqueue(app, server)
    assert settle(app, job).status is Status.SUCCEEDED
    assert [a.classification for a in app.attempts(job.id)] == ["rate_limited", None]


# -- seed test 3: RetryOnNetworkError ---------------------------------------------------------


def test_connection_reset_twice_then_succeeds(app: Durably, server: FlakyServer) -> None:
    server.script(Reply.reset_connection(), Reply.reset_connection(), Reply(200, body="ok"))
    job = enqueue(app, server)
    done = settle(app, job)
    assert done.status is Status.SUCCEEDED
    assert done.result is not None
    assert done.result["body"] == "ok"
    assert server.count == 3
    attempts = app.attempts(job.id)
    assert [a.error_type for a in attempts[:2]] == ["HttpTransportError"] * 2
    assert [a.classification for a in attempts[:2]] == ["transient", "transient"]


# -- seed test 4: ContextTimeout --------------------------------------------------------------


def test_per_attempt_timeout_is_classified_timeout(app: Durably, server: FlakyServer) -> None:
    server.script(Reply(200, delay=10.0))
    job = enqueue(app, server, timeout=0.05)
    dead = settle(app, job)
    assert dead.status is Status.DEAD_LETTER
    assert dead.classification == "exhausted"
    assert server.count == 3
    attempts = app.attempts(job.id)
    # Every row keeps why that attempt failed; the job carries the verdict (exhausted).
    assert [a.classification for a in attempts] == ["timeout", "timeout", "timeout"]
    assert {a.error_type for a in attempts} == {"HttpTimeoutError"}
    assert all("timed out after 0.05s" in (a.error_message or "") for a in attempts)


# -- seed test 5: ContextCancelledDuringBackoff -----------------------------------------------


def test_cancel_during_backoff_stops_further_requests(tmp_path: Path, server: FlakyServer) -> None:
    # A fake store clock: the 60 s backoff ends the burst, and then passes without waiting.
    clock = FakeClock()
    slow = RetryPolicy(max_attempts=3, initial=60, multiplier=2, jitter="none")
    with make_app(tmp_path, slow, clock=clock.now) as app:
        server.script(Reply(503))
        cancelled = enqueue(app, server, path="/cancelled")
        control = enqueue(app, server, path="/control")
        drain(app)
        assert app.get(cancelled.id).status is Status.RETRYING
        assert app.get(control.id).status is Status.RETRYING
        assert server.count == 2

        assert app.cancel(cancelled.id).status is Status.CANCELLED
        clock.advance(61)
        drain(app)

        paths = [r.path for r in server.requests]
        assert paths.count("/cancelled") == 1
        assert paths.count("/control") == 2  # the backoff really ended: the control retried
        assert app.get(cancelled.id).status is Status.CANCELLED
        assert len(app.attempts(cancelled.id)) == 1


# -- seed test 6: BackoffTiming ---------------------------------------------------------------


def test_attempt_gaps_follow_the_exponential_backoff(tmp_path: Path, server: FlakyServer) -> None:
    # 0.2 s then 0.4 s: the seed's 1 s / 2 s shape, scaled down. Shorter delays drown in the
    # worker's wake-up latency on a loaded machine and make the ratio check flaky.
    timed = RetryPolicy(max_attempts=3, initial=0.2, multiplier=2, jitter="none")
    with make_app(tmp_path, timed) as app:
        server.script(Reply(503), Reply(503), Reply(200))
        job = enqueue(app, server)
        assert settle(app, job).status is Status.SUCCEEDED
        first, second, third = (a.started_at for a in app.attempts(job.id))
        gap1 = (second - first).total_seconds()
        gap2 = (third - second).total_seconds()
        # Lower bounds only: a loaded machine may be slower, never faster than the schedule.
        assert gap1 >= 0.2
        assert gap2 >= 0.4
        assert gap2 >= gap1 * 1.5
        sent = [r.at for r in server.requests]
        assert sent[1] - sent[0] >= 0.2
        assert sent[2] - sent[1] >= 0.4


# -- the seed treated every non-200 alike; a 4xx is not worth retrying -------------------------


def test_400_dead_letters_http_4xx_after_one_request(app: Durably, server: FlakyServer) -> None:
    server.script(Reply(400, body={"error": "track_id missing"}))
    job = enqueue(app, server)
    dead = settle(app, job)
    assert dead.status is Status.DEAD_LETTER
    assert dead.classification == "http_4xx"
    assert "answered 400" in (dead.last_error or "")
    assert "track_id missing" in (dead.last_error or "")
    assert server.count == 1
    assert len(app.attempts(job.id)) == 1
