"""Retry policies, and the pure functions that turn a failed attempt into a decision.

Everything here is pure: the random source is passed in, nothing reads a clock or sleeps. The
worker (durable jobs) and :mod:`durably.retry` (in-process retry) both call :func:`decide`, so
the rules live once.

>>> policy = RetryPolicy(max_attempts=3, initial=1, multiplier=2, jitter="none")
>>> [backoff(policy, n, rand=lambda: 0.5) for n in (1, 2, 3)]
[1.0, 2.0, 4.0]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

from durably.errors import ConfigError, Permanent, RetryAfter
from durably.job import Classification, Outcome

__all__ = ["Decision", "Jitter", "RetryPolicy", "backoff", "decide"]

Jitter = Literal["none", "full", "equal", "decorrelated"]
"""How a backoff delay is randomised; see :func:`backoff`."""

_JITTERS: tuple[str, ...] = get_args(Jitter)

# Classifications that an exception may carry itself and that mean "never retry this".
_PERMANENT_CLASSIFICATIONS = frozenset(
    {
        Classification.PERMANENT.value,
        Classification.HTTP_4XX.value,
        Classification.UNKNOWN_HANDLER.value,
        Classification.BAD_PAYLOAD.value,
    }
)

# Exceptions that stop the program or the task; retrying them would hide a shutdown.
_NEVER_RETRIED: tuple[type[BaseException], ...] = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_number(
    name: str, value: object, *, minimum: float, inclusive: bool, optional: bool = False
) -> float | None:
    """Validate one numeric field and return it as a float (or ``None`` when allowed)."""
    if value is None and optional:
        return None
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    allowed = f"a finite number {bound}" + (" or None" if optional else "")
    if not _is_number(value):
        raise ConfigError(f"RetryPolicy.{name} must be {allowed}, got {value!r}")
    number = float(value)  # type: ignore[arg-type]  # _is_number checked int | float
    if not math.isfinite(number) or number < minimum or (number == minimum and not inclusive):
        raise ConfigError(f"RetryPolicy.{name} must be {allowed}, got {value!r}")
    return number


def _check_exception_types(name: str, value: object) -> tuple[type[BaseException], ...]:
    example = f"e.g. {name}=(ConnectionError, TimeoutError)"
    if not isinstance(value, tuple | list):
        raise ConfigError(
            f"RetryPolicy.{name} must be a tuple of exception classes ({example}), got {value!r}"
        )
    for item in value:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigError(
                f"RetryPolicy.{name} must hold only exception classes ({example}), "
                f"but it contains {item!r}"
            )
    return tuple(value)


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, how fast and on what an operation is retried.

    Invalid values raise :class:`~durably.errors.ConfigError` naming the field and what it allows.

    >>> RetryPolicy(max_attempts=3, initial=0.5, cap=10, retry_on=(ConnectionError,))
    ... # doctest: +ELLIPSIS
    RetryPolicy(max_attempts=3, initial=0.5, ...)
    """

    max_attempts: int | None = 5
    """Attempts in all (the first included); ``None`` retries without a count limit."""
    initial: float = 1.0
    """Seconds to wait after the first failure (before jitter)."""
    multiplier: float = 2.0
    """Each further wait is this many times the previous one, up to ``cap``."""
    cap: float = 300.0
    """No wait is ever longer than this many seconds."""
    jitter: Jitter = "full"
    """How waits are randomised so that many clients do not retry in lockstep."""
    fixed: float | None = None
    """Wait this many seconds before every retry instead of growing the wait."""
    initial_delay: float = 0.0
    """Seconds to wait before the first attempt."""
    budget: float | None = None
    """Seconds from the start of the first attempt after which no retry is scheduled."""
    timeout: float | None = None
    """Seconds one attempt may take; ``None`` means no limit."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Exception types worth retrying; anything else fails at once."""
    permanent_on: tuple[type[BaseException], ...] = ()
    """Exception types never retried, even when they match ``retry_on``."""

    def __post_init__(self) -> None:
        ma = self.max_attempts
        if ma is not None and (not isinstance(ma, int) or isinstance(ma, bool) or ma < 1):
            raise ConfigError(
                f"RetryPolicy.max_attempts must be an integer >= 1 or None (unlimited), got {ma!r}"
            )
        # Store numbers as floats so that snapshots compare and serialise the same way.
        set_ = object.__setattr__
        set_(self, "initial", _check_number("initial", self.initial, minimum=0, inclusive=False))
        set_(
            self,
            "multiplier",
            _check_number("multiplier", self.multiplier, minimum=1, inclusive=True),
        )
        cap = _check_number("cap", self.cap, minimum=0, inclusive=False)
        assert cap is not None
        if cap < self.initial:
            raise ConfigError(
                f"RetryPolicy.cap must be >= initial ({self.initial:g}), got {self.cap!r}"
            )
        set_(self, "cap", cap)
        if self.jitter not in _JITTERS:
            raise ConfigError(
                f"RetryPolicy.jitter must be one of {', '.join(map(repr, _JITTERS))}, "
                f"got {self.jitter!r}"
            )
        fixed = _check_number("fixed", self.fixed, minimum=0, inclusive=False, optional=True)
        if fixed is not None and fixed > cap:
            raise ConfigError(
                f"RetryPolicy.fixed must be <= cap ({cap:g}), got {self.fixed!r}; "
                "raise cap as well if you need longer waits"
            )
        set_(self, "fixed", fixed)
        set_(
            self,
            "initial_delay",
            _check_number("initial_delay", self.initial_delay, minimum=0, inclusive=True),
        )
        for name in ("budget", "timeout"):
            value = _check_number(
                name, getattr(self, name), minimum=0, inclusive=False, optional=True
            )
            set_(self, name, value)
        set_(self, "retry_on", _check_exception_types("retry_on", self.retry_on))
        set_(self, "permanent_on", _check_exception_types("permanent_on", self.permanent_on))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe snapshot of the numbers (and ``jitter``); exception types are left out.

        >>> RetryPolicy(max_attempts=2).to_dict()["max_attempts"]
        2
        """
        return {name: getattr(self, name) for name in _SNAPSHOT_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: RetryPolicy | None = None) -> RetryPolicy:
        """Rebuild a policy from :meth:`to_dict` output.

        Numbers come from ``data``; exception types (which a snapshot cannot hold) come from
        ``base`` (default ``RetryPolicy()``). Unknown keys raise :class:`ConfigError`.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a policy snapshot must be a mapping, got {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in _SNAPSHOT_FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown RetryPolicy field(s) in snapshot: {', '.join(unknown)}; "
                f"allowed: {', '.join(_SNAPSHOT_FIELDS)}"
            )
        return (base if base is not None else cls()).replace(**data)

    def replace(self, **changes: Any) -> RetryPolicy:
        """A copy with ``changes`` applied (and validated).

        >>> RetryPolicy().replace(max_attempts=None).max_attempts is None
        True
        """
        unknown = sorted(set(changes) - set(_ALL_FIELDS))
        if unknown:
            raise ConfigError(
                f"unknown RetryPolicy field(s): {', '.join(unknown)}; "
                f"allowed: {', '.join(_ALL_FIELDS)}"
            )
        return dataclasses.replace(self, **changes)

    def classify(self, exc: BaseException) -> str:
        """Why ``exc`` failed an attempt, as a classification string.

        ``permanent`` for :class:`~durably.errors.Permanent` (or its own ``classification``, so
        a subclass may say ``http_4xx``), for ``permanent_on`` and for anything outside
        ``retry_on``; ``rate_limited`` for :class:`~durably.errors.RetryAfter`; ``timeout`` for
        :class:`TimeoutError`; the exception's own ``classification`` attribute if it is a
        string; else ``transient``.
        """
        if isinstance(exc, Permanent):
            own = getattr(exc, "classification", None)
            return own if isinstance(own, str) and own else Classification.PERMANENT.value
        if isinstance(exc, (self.permanent_on, _NEVER_RETRIED)):
            return Classification.PERMANENT.value
        if isinstance(exc, RetryAfter):
            own = getattr(exc, "classification", None)  # a subclass may say "transient"
            return own if isinstance(own, str) and own else Classification.RATE_LIMITED.value
        if not isinstance(exc, self.retry_on):
            return Classification.PERMANENT.value
        if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
            return Classification.TIMEOUT.value
        own = getattr(exc, "classification", None)
        if isinstance(own, str) and own:
            return own
        return Classification.TRANSIENT.value

    def is_retryable(self, exc: BaseException) -> bool:
        """True if another attempt could help: ``exc`` is not permanent by type or by its own
        classification (``permanent``, ``http_4xx``, ``unknown_handler``, ``bad_payload``).

        :class:`~durably.errors.RetryAfter` is retryable even when ``retry_on`` does not list it:
        raising it is an explicit request to retry.
        """
        if isinstance(exc, Permanent):
            return False  # whatever classification a subclass reports
        return self.classify(exc) not in _PERMANENT_CLASSIFICATIONS


_ALL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RetryPolicy))
_SNAPSHOT_FIELDS: tuple[str, ...] = tuple(
    name for name in _ALL_FIELDS if name not in ("retry_on", "permanent_on")
)


def _base_delay(policy: RetryPolicy, attempt: int) -> float:
    """The un-jittered delay after failed attempt ``attempt`` (1-based), never above the cap."""
    if policy.fixed is not None:
        return policy.fixed
    steps = attempt - 1
    if steps == 0 or policy.multiplier == 1.0:
        return policy.initial
    # Compare exponents instead of computing multiplier ** steps, which overflows for huge
    # attempt numbers (and int * float overflows too, so compare the int with a float).
    steps_to_cap = math.log(policy.cap / policy.initial) / math.log(policy.multiplier)
    if steps >= steps_to_cap:
        return policy.cap
    return min(policy.cap, policy.initial * policy.multiplier**steps)


def backoff(policy: RetryPolicy, attempt: int, rand: Callable[[], float]) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based). Pure.

    ``rand()`` must return a float in ``[0, 1)``. With ``base`` the un-jittered delay
    (``fixed``, or ``min(cap, initial * multiplier ** (attempt - 1))``):

    - ``none``: ``base``
    - ``full``: uniform in ``[0, base)``
    - ``equal``: uniform in ``[base / 2, base)``
    - ``decorrelated``: uniform in ``[initial, min(cap, 3 * prev))`` where ``prev`` is the base of
      the previous attempt (``initial`` for the first). The upper bound is clamped *before*
      sampling so that delays keep spreading once the cap is reached instead of piling up on it.
      With ``fixed``: uniform in ``[min(initial, fixed / 3), fixed)``.

    The result is always within ``[0, cap]``, and within ``[0, fixed]`` for a fixed interval.

    >>> backoff(RetryPolicy(jitter="equal", initial=2), 1, rand=lambda: 0.0)
    1.0
    """
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ConfigError(f"attempt must be an integer >= 1, got {attempt!r}")
    r = rand()
    if not 0.0 <= r < 1.0:
        raise ConfigError(f"rand() must return a float in [0, 1), got {r!r}")
    base = _base_delay(policy, attempt)
    if policy.jitter == "none":
        return base
    if policy.jitter == "full":
        return r * base
    if policy.jitter == "equal":
        return base / 2 + r * base / 2
    if policy.fixed is not None:
        # Every wait has the same base, so spread over [fixed / 3, fixed] (or from initial if
        # that is smaller): still jittered even when initial >= fixed.
        high = policy.fixed
        low = min(policy.initial, high / 3)
    else:
        prev = policy.initial if attempt == 1 else _base_delay(policy, attempt - 1)
        high = min(policy.cap, 3 * prev)
        low = policy.initial
    return min(high, low + r * (high - low))


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt: retry after ``delay`` seconds, or dead-letter.

    ``classification`` says why: the attempt's own classification for a retry; for a dead letter
    ``permanent``, ``http_4xx``, ``exhausted``, ``budget_exhausted``, ``poison``, ...
    """

    outcome: Outcome
    delay: float
    classification: str


def decide(
    policy: RetryPolicy,
    *,
    attempt: int,
    classification: str,
    retryable: bool,
    retry_after: float | None,
    elapsed: float,
    rand: Callable[[], float],
) -> Decision:
    """Decide what follows failed attempt number ``attempt`` (1-based). Pure.

    ``elapsed`` is the seconds since the first attempt started; ``retry_after`` the delay a
    :class:`~durably.errors.RetryAfter` asked for (clamped to ``[0, cap]``).

    >>> decide(RetryPolicy(max_attempts=1), attempt=1, classification="transient",
    ...        retryable=True, retry_after=None, elapsed=0.0, rand=lambda: 0.0).classification
    'exhausted'
    """
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ConfigError(f"attempt must be an integer >= 1, got {attempt!r}")
    if not retryable:
        return Decision(Outcome.DEAD_LETTER, 0.0, classification)
    if policy.max_attempts is not None and attempt >= policy.max_attempts:
        # A job whose lease keeps expiring (it crashes or hangs its worker) is poison, not unlucky.
        why = (
            Classification.POISON
            if classification == Classification.LEASE_EXPIRED
            else Classification.EXHAUSTED
        )
        return Decision(Outcome.DEAD_LETTER, 0.0, why.value)
    if retry_after is not None and not math.isnan(retry_after):
        delay = min(policy.cap, max(0.0, float(retry_after)))
    else:
        delay = backoff(policy, attempt, rand)
    if policy.budget is not None and elapsed + delay > policy.budget:
        return Decision(Outcome.DEAD_LETTER, 0.0, Classification.BUDGET_EXHAUSTED.value)
    return Decision(Outcome.RETRY, delay, classification)
