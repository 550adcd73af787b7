"""Seed 000 ported: an HTTP call retried 3 times with 1 s then 2 s backoff, checking the context
(here a CancelToken and a deadline) before every attempt and during every wait.

Each of the seed's six scenarios runs against ``durably.retry`` in sync and async form. Time is
a FakeClock: sleeps are recorded and advance it, nothing waits.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from durably.errors import AttemptsExhausted, Cancelled
from durably.policy import RetryPolicy
from durably.retry import CancelToken, Retrying, retry
from durably.testing import FakeClock

SEED_POLICY = RetryPolicy(max_attempts=3, initial=1, multiplier=2, jitter="none")


class ServerError(Exception):
    """The stream server answered with a non-200 status."""


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def retrier(clock: FakeClock, **options: Any) -> Retrying:
    return retry(
        SEED_POLICY,
        clock=clock.monotonic,
        sleep=clock.sleep,
        async_sleep=clock.async_sleep,
        **options,
    )


async def run(mode: str, retrying: Retrying, fn: Callable[[], Any], **options: Any) -> Any:
    """Run ``fn`` under ``retrying`` directly (sync) or as the body of a coroutine (async)."""
    if mode == "sync":
        return retrying.call(fn, **options)

    async def body() -> Any:
        return fn()

    return await retrying.call_async(body, **options)


class Flaky:
    """Fails ``failures`` times (as a non-200 answer would), then returns ``"ok"``."""

    def __init__(self, failures: int, clock: FakeClock | None = None, takes: float = 0.0) -> None:
        self.failures = failures
        self.calls = 0
        self.clock = clock
        self.takes = takes

    def __call__(self) -> str:
        self.calls += 1
        if self.clock is not None and self.takes:
            self.clock.advance(self.takes)
        if self.calls <= self.failures:
            raise ServerError(f"stream server returned 503 on call {self.calls}")
        return "ok"


# 1. TestStreamService_StartProcessing_RetryOnFailure
async def test_retry_on_failure_then_success(mode: str, clock: FakeClock) -> None:
    flaky = Flaky(failures=2)
    assert await run(mode, retrier(clock), flaky) == "ok"
    assert flaky.calls == 3


# 2. TestStreamService_StartProcessing_MaxRetriesExceeded
async def test_max_retries_exceeded(mode: str, clock: FakeClock) -> None:
    flaky = Flaky(failures=100)
    with pytest.raises(AttemptsExhausted, match="after 3 attempts") as info:
        await run(mode, retrier(clock), flaky)
    assert flaky.calls == 3
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, ServerError)
    assert "returned 503 on call 3" in str(info.value)
    assert clock.sleeps == [1.0, 2.0]  # no wait after the last attempt


# 3. TestStreamService_StartProcessing_RetryOnNetworkError
class _HangUp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # Counted before the server closes the socket, so the client cannot see the close first.
        self.server.connections += 1  # type: ignore[attr-defined]


@pytest.fixture
def hang_up_server() -> Iterator[socketserver.TCPServer]:
    """A real local TCP server that accepts each connection and closes it without answering."""
    server = socketserver.TCPServer(("127.0.0.1", 0), _HangUp)
    server.connections = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


async def test_retry_on_network_error(
    mode: str, clock: FakeClock, hang_up_server: socketserver.TCPServer
) -> None:
    host, port = hang_up_server.server_address[:2]
    url = f"http://{host!s}:{port}/process"
    calls = 0
    errors: list[BaseException] = []

    def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
        errors.append(exc)

    retrying = retrier(clock, on_retry=on_retry)
    if mode == "sync":
        with httpx.Client() as client:

            def post() -> httpx.Response:
                nonlocal calls
                calls += 1
                return client.post(url, json={"track_id": 1})

            with pytest.raises(AttemptsExhausted, match="after 3 attempts") as info:
                retrying.call(post)
    else:
        async with httpx.AsyncClient() as aclient:

            async def apost() -> httpx.Response:
                nonlocal calls
                calls += 1
                return await aclient.post(url, json={"track_id": 1})

            with pytest.raises(AttemptsExhausted, match="after 3 attempts") as info:
                await retrying.call_async(apost)
    assert calls == 3
    assert hang_up_server.connections == 3  # type: ignore[attr-defined]
    assert isinstance(info.value.__cause__, httpx.TransportError)
    assert all(isinstance(e, httpx.TransportError) for e in errors)
    assert len(errors) == 2
    assert clock.sleeps == [1.0, 2.0]


# 4. TestStreamService_StartProcessing_ContextTimeout
async def test_deadline_passed_during_a_slow_attempt(mode: str, clock: FakeClock) -> None:
    slow = Flaky(failures=100, clock=clock, takes=2.0)  # the server takes 2 s, then fails
    deadline = clock.monotonic() + 0.5
    with pytest.raises(Cancelled, match="deadline reached before attempt 2") as info:
        await run(mode, retrier(clock), slow, deadline=deadline)
    assert slow.calls == 1
    assert isinstance(info.value.__cause__, ServerError)
    assert clock.sleeps == []


async def test_deadline_stops_a_wait_that_would_pass_it(mode: str, clock: FakeClock) -> None:
    flaky = Flaky(failures=100)
    deadline = clock.monotonic() + 1.5  # room for the 1 s wait, not for the 2 s one
    with pytest.raises(Cancelled, match="deadline") as info:
        await run(mode, retrier(clock), flaky, deadline=deadline)
    assert "before attempt 3" in str(info.value)
    assert flaky.calls == 2
    assert clock.sleeps == [1.0]


async def test_deadline_already_passed_makes_no_attempt(mode: str, clock: FakeClock) -> None:
    flaky = Flaky(failures=0)
    with pytest.raises(Cancelled, match="deadline reached before attempt 1") as info:
        await run(mode, retrier(clock), flaky, deadline=clock.monotonic())
    assert flaky.calls == 0
    assert info.value.__cause__ is None


# 5. TestStreamService_StartProcessing_ContextCancelledDuringBackoff
async def test_cancelled_during_backoff(mode: str, clock: FakeClock) -> None:
    token = CancelToken()
    flaky = Flaky(failures=100)

    def cancel_after_first_failure(attempt: int, exc: BaseException, delay: float) -> None:
        assert (attempt, delay) == (1, 1.0)
        token.cancel()

    retrying = retrier(clock, on_retry=cancel_after_first_failure)
    with pytest.raises(Cancelled, match="cancelled during backoff after attempt 1") as info:
        await run(mode, retrying, flaky, cancel=token)
    assert flaky.calls == 1
    assert isinstance(info.value.__cause__, ServerError)
    assert clock.sleeps == []  # the wait never started


async def test_cancelled_before_first_attempt(mode: str, clock: FakeClock) -> None:
    token = CancelToken()
    token.cancel()
    flaky = Flaky(failures=0)
    with pytest.raises(Cancelled, match="cancelled before attempt 1"):
        await run(mode, retrier(clock), flaky, cancel=token)
    assert flaky.calls == 0


# 6. TestStreamService_StartProcessing_BackoffTiming
async def test_backoff_timing(mode: str, clock: FakeClock) -> None:
    flaky = Flaky(failures=2)
    start = clock.monotonic()
    assert await run(mode, retrier(clock), flaky) == "ok"
    assert clock.sleeps == [1.0, 2.0]
    assert clock.monotonic() - start == 3.0
