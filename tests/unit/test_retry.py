"""In-process retry: decorators, give-up reasons, RetryAfter, budgets, logs and cancellation."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from typing import Any

import pytest

from durably.errors import AttemptsExhausted, Cancelled, Permanent, RetryAfter
from durably.policy import RetryPolicy
from durably.retry import CancelToken, Retrying, retry
from durably.testing import FakeClock

POLICY = RetryPolicy(max_attempts=3, initial=1, multiplier=2, cap=10, jitter="none")


def fake(clock: FakeClock, policy: RetryPolicy = POLICY, **options: Any) -> Retrying:
    defaults: dict[str, Any] = {
        "clock": clock.monotonic,
        "sleep": clock.sleep,
        "async_sleep": clock.async_sleep,
    }
    return retry(policy, **{**defaults, **options})


class Failing:
    """Raises the given exceptions in turn, then returns the call count."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.calls


# -- decorators ---------------------------------------------------------------------------------


def test_decorator_on_sync_function_keeps_result_name_and_doc(clock: FakeClock) -> None:
    failures = [ConnectionError("reset")]

    @fake(clock)
    def add(a: int, b: int = 0) -> int:
        """Add two numbers."""
        if failures:
            raise failures.pop()
        return a + b

    assert add(2, b=3) == 5
    assert add.__name__ == "add"
    assert add.__doc__ == "Add two numbers."
    assert str(inspect.signature(add)) == "(a: 'int', b: 'int' = 0) -> 'int'"
    assert not inspect.iscoroutinefunction(add)
    assert clock.sleeps == [1.0]


async def test_decorator_on_async_function_keeps_result_and_name(clock: FakeClock) -> None:
    failures = [ConnectionError("reset"), TimeoutError()]

    @fake(clock)
    async def fetch(key: str) -> str:
        """Fetch a key."""
        if failures:
            raise failures.pop()
        return key.upper()

    assert inspect.iscoroutinefunction(fetch)
    assert await fetch("k") == "K"
    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a key."
    assert clock.sleeps == [1.0, 2.0]


def test_decorated_function_may_take_its_own_cancel_argument(clock: FakeClock) -> None:
    @fake(clock)
    def order(*, cancel: bool = False, deadline: str = "") -> tuple[bool, str]:
        return cancel, deadline

    assert order(cancel=True, deadline="friday") == (True, "friday")


def test_call_passes_arguments_through(clock: FakeClock) -> None:
    assert fake(clock).call(divmod, 7, 2) == (3, 1)
    assert fake(clock).call(dict, a=1) == {"a": 1}


def test_default_policy_is_used_when_none_is_given() -> None:
    assert retry().policy == RetryPolicy()


# -- giving up ----------------------------------------------------------------------------------


async def run(mode: str, retrying: Retrying, fn: Any) -> Any:
    """Run ``fn`` under ``retrying`` directly (sync) or as the body of a coroutine (async)."""
    if mode == "sync":
        return retrying.call(fn)

    async def body() -> Any:
        return fn()

    return await retrying.call_async(body)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_permanent_stops_at_once(mode: str, clock: FakeClock) -> None:
    failing = Failing(Permanent("customer 42 does not exist"))
    with pytest.raises(AttemptsExhausted, match=r"after 1 attempt \(permanent error\)") as info:
        await run(mode, fake(clock), failing)
    assert failing.calls == 1
    assert isinstance(info.value.__cause__, Permanent)
    assert info.value.last is info.value.__cause__
    assert clock.sleeps == []


def test_exception_outside_retry_on_is_not_retried(clock: FakeClock) -> None:
    failing = Failing(ValueError("bad input"))
    retrying = fake(clock, POLICY.replace(retry_on=(ConnectionError,)))
    with pytest.raises(AttemptsExhausted, match=r"permanent error.*ValueError: bad input"):
        retrying.call(failing)
    assert failing.calls == 1


def test_permanent_on_is_not_retried(clock: FakeClock) -> None:
    failing = Failing(FileNotFoundError("x"))
    retrying = fake(clock, POLICY.replace(retry_on=(OSError,), permanent_on=(FileNotFoundError,)))
    with pytest.raises(AttemptsExhausted, match="permanent error"):
        retrying.call(failing)
    assert failing.calls == 1


def test_keyboard_interrupt_passes_through_unwrapped(clock: FakeClock) -> None:
    failing = Failing(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        fake(clock, POLICY.replace(retry_on=(BaseException,))).call(failing)
    assert failing.calls == 1


def test_base_exception_listed_in_retry_on_is_retried(clock: FakeClock) -> None:
    class Stop(BaseException):
        pass

    failing = Failing(Stop())
    assert fake(clock, POLICY.replace(retry_on=(Stop,))).call(failing) == 2


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(7.0, 7.0), (1000.0, 10.0), (-5.0, 0.0), (0.0, 0.0)],
)
def test_retry_after_sets_the_next_delay_clamped_to_cap(
    clock: FakeClock, seconds: float, expected: float
) -> None:
    failing = Failing(RetryAfter(seconds))
    assert fake(clock).call(failing) == 2
    assert clock.sleeps == [expected]


async def test_retry_after_is_honoured_in_async(clock: FakeClock) -> None:
    failing = Failing(RetryAfter(4.5), ConnectionError())

    async def body() -> int:
        return failing()

    assert await fake(clock).call_async(body) == 3
    assert clock.sleeps == [4.5, 2.0]  # the RetryAfter wait does not skip the backoff step


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_budget_stops_when_the_next_attempt_would_start_past_it(
    mode: str, clock: FakeClock
) -> None:
    failing = Failing(*[ConnectionError(str(n)) for n in range(10)])
    retrying = fake(clock, POLICY.replace(max_attempts=None, budget=2.5))
    with pytest.raises(AttemptsExhausted, match=r"after 2 attempts \(retry budget of 2\.5s"):
        await run(mode, retrying, failing)
    # attempt 1 at 0 s, waits 1 s; attempt 2 at 1 s would wait 2 s and start at 3 s > 2.5 s
    assert failing.calls == 2
    assert clock.sleeps == [1.0]


def test_budget_counts_time_spent_in_attempts(clock: FakeClock) -> None:
    calls = 0

    def slow() -> None:
        nonlocal calls
        calls += 1
        clock.advance(5)
        raise ConnectionError("slow and failing")

    with pytest.raises(AttemptsExhausted, match="budget"):
        fake(clock, POLICY.replace(budget=5.5)).call(slow)
    assert calls == 1


def test_initial_delay_waits_before_the_first_attempt_and_not_on_the_budget(
    clock: FakeClock,
) -> None:
    failing = Failing(ConnectionError())
    retrying = fake(clock, POLICY.replace(initial_delay=30, budget=2))
    assert retrying.call(failing) == 2
    assert clock.sleeps == [30.0, 1.0]


def test_cancel_during_initial_delay(clock: FakeClock) -> None:
    token = CancelToken()
    failing = Failing()
    retrying = fake(clock, POLICY.replace(initial_delay=30), sleep=lambda _: token.cancel())
    with pytest.raises(Cancelled, match="cancelled before attempt 1"):
        retrying.call(failing, cancel=token)
    assert failing.calls == 0


def test_initial_delay_past_the_deadline_is_refused(clock: FakeClock) -> None:
    failing = Failing()
    retrying = fake(clock, POLICY.replace(initial_delay=30))
    with pytest.raises(Cancelled, match="deadline reached before attempt 1"):
        retrying.call(failing, deadline=clock.monotonic() + 10)
    assert (failing.calls, clock.sleeps) == (0, [])


def test_on_retry_gets_attempt_error_and_delay(clock: FakeClock) -> None:
    seen: list[tuple[int, str, float]] = []
    errors = [ConnectionError("a"), ConnectionError("b")]
    failing = Failing(*errors)
    fake(clock, on_retry=lambda n, e, d: seen.append((n, str(e), d))).call(failing)
    assert seen == [(1, "a", 1.0), (2, "b", 2.0)]


def test_jitter_uses_the_injected_random_source(clock: FakeClock) -> None:
    failing = Failing(ConnectionError(), ConnectionError())
    fake(clock, POLICY.replace(jitter="full"), rand=lambda: 0.25).call(failing)
    assert clock.sleeps == [0.25, 0.5]


# -- logging ------------------------------------------------------------------------------------


def test_one_warning_per_failed_attempt(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    failing = Failing(*[ConnectionError(f"reset {n}") for n in (1, 2, 3)])
    caplog.set_level(logging.WARNING, logger="durably.retry")
    with pytest.raises(AttemptsExhausted):
        fake(clock).call(failing)
    records = [r for r in caplog.records if r.name == "durably.retry"]
    assert [r.levelno for r in records] == [logging.WARNING] * 3
    assert [r.attempt for r in records] == [1, 2, 3]  # type: ignore[attr-defined]
    assert {r.max_attempts for r in records} == {3}  # type: ignore[attr-defined]
    assert [r.error for r in records] == [  # type: ignore[attr-defined]
        repr(ConnectionError(f"reset {n}")) for n in (1, 2, 3)
    ]
    messages = [r.getMessage() for r in records]
    assert "failed on attempt 1 of 3" in messages[0]
    assert "retrying in 1s" in messages[0]
    assert "giving up (no attempts left)" in messages[2]


def test_injected_logger_is_used(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.retry.custom")
    caplog.set_level(logging.WARNING, logger="tests.retry.custom")
    fake(clock, logger=logger).call(Failing(ConnectionError()))
    assert [r.name for r in caplog.records] == ["tests.retry.custom"]


# -- cancellation -------------------------------------------------------------------------------


def cancel_when_set(event: threading.Event, token: CancelToken) -> None:
    event.wait()
    token.cancel()


@pytest.mark.parametrize("with_token", [False, True])
async def test_task_cancellation_during_async_backoff_propagates(
    clock: FakeClock, with_token: bool
) -> None:
    sleeping = asyncio.Event()
    never = asyncio.Event()
    delays: list[float] = []

    async def held_sleep(delay: float) -> None:
        delays.append(delay)
        sleeping.set()
        await never.wait()

    failing = Failing(ConnectionError())

    async def body() -> int:
        return failing()

    retrying = retry(POLICY, clock=clock.monotonic, async_sleep=held_sleep)
    token = CancelToken() if with_token else None
    task = asyncio.create_task(retrying.call_async(body, cancel=token))
    await sleeping.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert failing.calls == 1
    assert delays == [1.0]


def test_sync_wait_wakes_at_once_when_another_thread_cancels() -> None:
    # No sleep injected: the retrier waits on the token for an hour unless cancel wakes it.
    token = CancelToken()
    failing = Failing(ConnectionError())
    waiting = threading.Event()
    retrying = retry(
        RetryPolicy(initial=3600, cap=3600, jitter="none"),
        on_retry=lambda *_: waiting.set(),
    )
    canceller = threading.Thread(target=cancel_when_set, args=(waiting, token))
    canceller.start()
    with pytest.raises(Cancelled, match="cancelled during backoff after attempt 1"):
        retrying.call(failing, cancel=token)
    canceller.join()
    assert failing.calls == 1


async def test_async_wait_wakes_at_once_when_another_thread_cancels() -> None:
    token = CancelToken()
    failing = Failing(ConnectionError())
    waiting = threading.Event()

    async def body() -> int:
        return failing()

    retrying = retry(
        RetryPolicy(initial=3600, cap=3600, jitter="none"),
        on_retry=lambda *_: waiting.set(),
    )
    canceller = threading.Thread(target=cancel_when_set, args=(waiting, token))
    canceller.start()
    with pytest.raises(Cancelled, match="cancelled during backoff after attempt 1") as info:
        await retrying.call_async(body, cancel=token)
    canceller.join()
    assert failing.calls == 1
    assert isinstance(info.value.__cause__, ConnectionError)


async def test_injected_async_sleep_failure_fails_the_call(clock: FakeClock) -> None:
    async def broken_sleep(delay: float) -> None:
        raise RuntimeError("no sleep for you")

    async def body() -> int:
        raise ConnectionError

    retrying = retry(POLICY, clock=clock.monotonic, async_sleep=broken_sleep)
    with pytest.raises(RuntimeError, match="no sleep for you"):
        await retrying.call_async(body, cancel=CancelToken())


def test_cancel_token_is_idempotent_and_wait_reports_it() -> None:
    token = CancelToken()
    before = token.cancelled
    assert before is False
    assert token.wait(0) is False
    token.cancel()
    token.cancel()
    assert token.cancelled
    assert token.wait(0) is True


# -- per-attempt timeout ------------------------------------------------------------------------


async def test_async_attempts_run_under_the_policy_timeout(clock: FakeClock) -> None:
    never = asyncio.Event()
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await never.wait()

    # A timeout this small expires at the first suspension point: nothing waits for real.
    retrying = fake(clock, POLICY.replace(max_attempts=2, timeout=1e-9))
    with pytest.raises(AttemptsExhausted, match="after 2 attempts") as info:
        await retrying.call_async(hangs)
    assert calls == 2
    assert isinstance(info.value.__cause__, TimeoutError)
    assert clock.sleeps == [1.0]


def test_deadline_refusal_is_logged_and_skips_on_retry(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []
    failing = Failing(ConnectionError(), ConnectionError())
    caplog.set_level(logging.WARNING, logger="durably.retry")
    retrying = fake(clock, on_retry=lambda n, e, d: seen.append(n))
    with pytest.raises(Cancelled, match=r"deadline reached before attempt 2: it would start in 1s"):
        retrying.call(failing, deadline=clock.monotonic() + 0.5)
    assert seen == []
    assert failing.calls == 1
    assert clock.sleeps == []
    (record,) = caplog.records
    assert "stopping (deadline reached before attempt 2" in record.getMessage()
    assert record.attempt == 1  # type: ignore[attr-defined]
