"""In-process retry for sync and async code, with cancellation and deadlines (no store).

>>> @retry(RetryPolicy(max_attempts=3, retry_on=(ConnectionError,)))
... def fetch() -> bytes: ...

The rules (what is retryable, how long to wait, when to give up) are
:func:`durably.policy.decide`, the same function durable jobs use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, overload

from durably.errors import AttemptsExhausted, Cancelled, RetryAfter
from durably.job import Classification, Outcome
from durably.policy import Decision, RetryPolicy, decide

__all__ = ["CancelToken", "Retrying", "retry"]

P = ParamSpec("P")
R = TypeVar("R")

_LOGGER = logging.getLogger("durably.retry")

# Never swallowed, whatever retry_on says: they mean "stop", not "this attempt failed".
_PASS_THROUGH: tuple[type[BaseException], ...] = (
    asyncio.CancelledError,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
)


class CancelToken:
    """A thread-safe flag that stops a retry loop: before the next attempt or during a wait.

    >>> token = CancelToken()
    >>> token.cancel()
    >>> token.cancelled
    True
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        """Ask every loop using this token to stop. Idempotent; callable from any thread."""
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds (forever if ``None``); True if cancelled."""
        return self._event.wait(timeout)

    def _subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` once on cancel (at once if already cancelled); returns an undo."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)

                def unsubscribe() -> None:
                    with self._lock:
                        if callback in self._callbacks:
                            self._callbacks.remove(callback)

                return unsubscribe
        callback()
        return lambda: None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Retrying:
    """Retries a callable under a :class:`~durably.policy.RetryPolicy`. Build it with :func:`retry`.

    Use it as a decorator (on sync or async functions), or call :meth:`call` /
    :meth:`call_async` to pass a :class:`CancelToken` or a deadline.
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        on_retry: Callable[[int, BaseException, float], object] | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], object] | None = None,
        async_sleep: Callable[[float], Awaitable[object]] | None = None,
        rand: Callable[[], float] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.policy = policy if policy is not None else RetryPolicy()
        self._on_retry = on_retry
        self._clock = clock if clock is not None else time.monotonic
        self._sleep = sleep
        self._async_sleep = async_sleep if async_sleep is not None else asyncio.sleep
        self._rand = rand if rand is not None else random.random
        self._logger = logger if logger is not None else _LOGGER

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate ``fn`` (sync or ``async def``) so that every call is retried."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self._run_async(fn, args, kwargs, None, None)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            return self._run(fn, args, kwargs, None, None)

        return wrapper

    # -- sync -----------------------------------------------------------------------------------

    def call(
        self,
        fn: Callable[..., R],
        /,
        *args: Any,
        cancel: CancelToken | None = None,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> R:
        """Call ``fn(*args, **kwargs)`` until it succeeds or the policy gives up.

        ``deadline`` is an absolute time on the retrier's clock (``time.monotonic`` unless one
        was injected). Raises :class:`~durably.errors.AttemptsExhausted` when giving up and
        :class:`~durably.errors.Cancelled` when ``cancel`` or ``deadline`` stops the loop.
        ``policy.timeout`` is not enforced here: a sync call cannot be interrupted safely.
        """
        return self._run(fn, args, kwargs, cancel, deadline)

    def _run(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cancel: CancelToken | None,
        deadline: float | None,
    ) -> R:
        name = _name_of(fn)
        if self.policy.initial_delay > 0:
            refusal = self._deadline_refusal(self.policy.initial_delay, 1, deadline)
            if refusal is not None:
                raise Cancelled(refusal)
            if self._wait_sync(self.policy.initial_delay, cancel):
                raise Cancelled("cancelled before attempt 1")
        attempt = 1
        started: float | None = None
        last: BaseException | None = None
        while True:
            self._check_start(attempt, last, cancel, deadline)
            if started is None:
                started = self._clock()
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                if not self._catches(exc):
                    raise
                last = exc
            delay = self._after_failure(name, attempt, last, started, deadline)
            if self._wait_sync(delay, cancel):
                raise Cancelled(f"cancelled during backoff after attempt {attempt}") from last
            attempt += 1

    def _wait_sync(self, delay: float, cancel: CancelToken | None) -> bool:
        """Wait ``delay`` seconds; True if ``cancel`` fired (waking the wait at once)."""
        if cancel is not None and cancel.cancelled:
            return True
        if self._sleep is not None:
            self._sleep(delay)
        elif cancel is not None:
            return cancel.wait(delay)
        else:
            time.sleep(delay)
        return cancel is not None and cancel.cancelled

    # -- async ----------------------------------------------------------------------------------

    async def call_async(
        self,
        fn: Callable[..., Awaitable[R]],
        /,
        *args: Any,
        cancel: CancelToken | None = None,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> R:
        """Await ``fn(*args, **kwargs)`` until it succeeds or the policy gives up.

        Like :meth:`call`; besides, each attempt runs under ``asyncio.timeout(policy.timeout)``
        when the policy sets one, and cancelling the task (during an attempt or a wait) raises
        :class:`asyncio.CancelledError` as usual.
        """
        return await self._run_async(fn, args, kwargs, cancel, deadline)

    async def _run_async(
        self,
        fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cancel: CancelToken | None,
        deadline: float | None,
    ) -> R:
        name = _name_of(fn)
        timeout = self.policy.timeout
        if self.policy.initial_delay > 0:
            refusal = self._deadline_refusal(self.policy.initial_delay, 1, deadline)
            if refusal is not None:
                raise Cancelled(refusal)
            if await self._wait_async(self.policy.initial_delay, cancel):
                raise Cancelled("cancelled before attempt 1")
        attempt = 1
        started: float | None = None
        last: BaseException | None = None
        while True:
            self._check_start(attempt, last, cancel, deadline)
            if started is None:
                started = self._clock()
            try:
                if timeout is None:
                    return await fn(*args, **kwargs)
                async with asyncio.timeout(timeout):
                    return await fn(*args, **kwargs)
            except BaseException as exc:
                if not self._catches(exc):
                    raise
                last = exc
            delay = self._after_failure(name, attempt, last, started, deadline)
            if await self._wait_async(delay, cancel):
                raise Cancelled(f"cancelled during backoff after attempt {attempt}") from last
            attempt += 1

    async def _wait_async(self, delay: float, cancel: CancelToken | None) -> bool:
        """Wait ``delay`` seconds; True if ``cancel`` fired. Task cancellation propagates."""
        if cancel is None:
            await self._async_sleep(delay)
            return False
        if cancel.cancelled:
            return True
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def on_cancel() -> None:
            # The loop may have closed meanwhile: then nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, woken)

        unsubscribe = cancel._subscribe(on_cancel)
        sleeper: asyncio.Future[Any] = asyncio.ensure_future(self._async_sleep(delay))
        either: set[asyncio.Future[Any]] = {sleeper, woken}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            unsubscribe()
            woken.cancel()
            if not sleeper.done():
                sleeper.cancel()
                # Let the sleeper finish cancelling so that no pending task outlives the loop.
                await asyncio.wait({sleeper})
        if sleeper.done() and not sleeper.cancelled():
            sleeper.result()  # an injected sleep that failed fails the call
        return cancel.cancelled

    # -- shared ---------------------------------------------------------------------------------

    def _catches(self, exc: BaseException) -> bool:
        """True if ``exc`` is an attempt's failure rather than a request to stop."""
        if isinstance(exc, _PASS_THROUGH):
            return False
        return isinstance(exc, (Exception, self.policy.retry_on))

    def _check_start(
        self,
        attempt: int,
        last: BaseException | None,
        cancel: CancelToken | None,
        deadline: float | None,
    ) -> None:
        if cancel is not None and cancel.cancelled:
            raise Cancelled(f"cancelled before attempt {attempt}") from last
        if deadline is not None and self._clock() >= deadline:
            raise Cancelled(f"deadline reached before attempt {attempt}") from last

    def _deadline_refusal(
        self, delay: float, next_attempt: int, deadline: float | None
    ) -> str | None:
        """Why a wait of ``delay`` must not start (it would end past the deadline), or None.

        Waiting until the deadline first could not lead anywhere, so the caller learns at once.
        """
        if deadline is None:
            return None
        remaining = deadline - self._clock()
        if delay <= remaining:
            return None
        return (
            f"deadline reached before attempt {next_attempt}: it would start in {delay:g}s, "
            f"but the deadline is {max(0.0, remaining):g}s away"
        )

    def _after_failure(
        self,
        name: str,
        attempt: int,
        exc: BaseException,
        started: float,
        deadline: float | None,
    ) -> float:
        """Log the failure, then return the delay before the next attempt or raise to give up."""
        policy = self.policy
        retryable = policy.is_retryable(exc)
        decision = decide(
            policy,
            attempt=attempt,
            classification=policy.classify(exc),
            retryable=retryable,
            retry_after=exc.seconds if isinstance(exc, RetryAfter) else None,
            elapsed=self._clock() - started,
            rand=self._rand,
        )
        of = f"{policy.max_attempts}" if policy.max_attempts is not None else "unlimited"
        extra = {
            "attempt": attempt,
            "max_attempts": policy.max_attempts,
            "error": repr(exc),
            "classification": decision.classification,
        }
        if decision.outcome is Outcome.RETRY:
            refusal = self._deadline_refusal(decision.delay, attempt + 1, deadline)
            if refusal is not None:
                self._logger.warning(
                    "%s failed on attempt %d of %s: %r; stopping (%s)",
                    name,
                    attempt,
                    of,
                    exc,
                    refusal,
                    extra=extra,
                )
                raise Cancelled(refusal) from exc
            self._logger.warning(
                "%s failed on attempt %d of %s: %r; retrying in %.3gs",
                name,
                attempt,
                of,
                exc,
                decision.delay,
                extra={**extra, "delay": decision.delay},
            )
            if self._on_retry is not None:
                self._on_retry(attempt, exc, decision.delay)
            return decision.delay
        reason = _reason(decision, retryable, policy)
        self._logger.warning(
            "%s failed on attempt %d of %s: %r; giving up (%s)",
            name,
            attempt,
            of,
            exc,
            reason,
            extra=extra,
        )
        raise AttemptsExhausted(attempt, exc, reason) from exc


def _reason(decision: Decision, retryable: bool, policy: RetryPolicy) -> str:
    if not retryable:
        return "permanent error"
    if decision.classification == Classification.BUDGET_EXHAUSTED:
        return f"retry budget of {policy.budget:g}s would be exceeded"
    return "no attempts left"


def _name_of(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def retry(
    policy: RetryPolicy | None = None,
    *,
    on_retry: Callable[[int, BaseException, float], object] | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], object] | None = None,
    async_sleep: Callable[[float], Awaitable[object]] | None = None,
    rand: Callable[[], float] | None = None,
    logger: logging.Logger | None = None,
) -> Retrying:
    """A :class:`Retrying` for ``policy`` (default ``RetryPolicy()``).

    ``on_retry(attempt, exc, delay)`` runs before each wait. ``clock`` (monotonic seconds),
    ``sleep``, ``async_sleep`` and ``rand`` are injectable so that tests never wait.

    >>> @retry(RetryPolicy(max_attempts=3, retry_on=(ConnectionError,)))
    ... async def ping() -> None: ...
    >>> retry().call(len, "abc")
    3
    """
    return Retrying(
        policy,
        on_retry=on_retry,
        clock=clock,
        sleep=sleep,
        async_sleep=async_sleep,
        rand=rand,
        logger=logger,
    )
