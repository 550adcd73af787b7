"""RetryPolicy validation, snapshots, classification and every branch of decide()."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from durably.errors import ConfigError, Permanent, RetryAfter
from durably.job import Outcome
from durably.policy import Decision, RetryPolicy, backoff, decide


def half() -> float:
    return 0.5


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", -1),
        ("max_attempts", 2.5),
        ("max_attempts", True),
        ("max_attempts", "3"),
        ("initial", 0),
        ("initial", -1.0),
        ("initial", math.nan),
        ("initial", math.inf),
        ("initial", "1"),
        ("multiplier", 0.5),
        ("multiplier", math.nan),
        ("cap", 0),
        ("cap", math.inf),
        ("jitter", "random"),
        ("fixed", 0),
        ("fixed", -2),
        ("fixed", 301.0),
        ("initial_delay", -0.1),
        ("initial_delay", None),
        ("budget", 0),
        ("budget", -5),
        ("budget", math.inf),
        ("timeout", 0),
        ("timeout", "soon"),
        ("retry_on", ConnectionError),
        ("retry_on", (ConnectionError, "TimeoutError")),
        ("permanent_on", (42,)),
        ("permanent_on", None),
    ],
)
def test_each_bad_field_raises_config_error_naming_it(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"RetryPolicy\.{field}\b") as info:
        RetryPolicy(**{field: value})
    assert repr(value)[:20] in str(info.value) or field in ("retry_on", "permanent_on")


def test_cap_below_initial_says_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"RetryPolicy\.cap must be >= initial \(10\), got 5"):
        RetryPolicy(initial=10, cap=5)


def test_fixed_above_cap_says_to_raise_cap() -> None:
    with pytest.raises(ConfigError, match="raise cap"):
        RetryPolicy(fixed=600)
    assert RetryPolicy(fixed=600, cap=600).fixed == 600.0


def test_messages_say_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"integer >= 1 or None"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match=r"'none', 'full', 'equal', 'decorrelated'"):
        RetryPolicy(jitter="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"e\.g\. retry_on=\(ConnectionError"):
        RetryPolicy(retry_on=ConnectionError)  # type: ignore[arg-type]


def test_valid_policy_normalises_numbers_and_lists() -> None:
    policy = RetryPolicy(
        max_attempts=None,
        initial=1,
        multiplier=1,
        cap=1,
        retry_on=[ConnectionError],  # type: ignore[arg-type]
    )
    assert policy.max_attempts is None
    assert isinstance(policy.initial, float)
    assert isinstance(policy.cap, float)
    assert policy.retry_on == (ConnectionError,)
    hash(policy)  # frozen policies can key caches


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.initial = 3.0  # type: ignore[misc]


# -- snapshots ----------------------------------------------------------------------------------


def test_to_dict_is_json_safe_and_holds_no_exception_types() -> None:
    policy = RetryPolicy(
        max_attempts=7,
        initial=0.25,
        multiplier=3,
        cap=60,
        jitter="equal",
        fixed=None,
        initial_delay=2,
        budget=600,
        timeout=30,
        retry_on=(ConnectionError,),
        permanent_on=(KeyError,),
    )
    snapshot = policy.to_dict()
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert snapshot == {
        "max_attempts": 7,
        "initial": 0.25,
        "multiplier": 3.0,
        "cap": 60.0,
        "jitter": "equal",
        "fixed": None,
        "initial_delay": 2.0,
        "budget": 600.0,
        "timeout": 30.0,
    }


def test_from_dict_round_trips_numbers_and_takes_exceptions_from_base() -> None:
    base = RetryPolicy(retry_on=(ConnectionError,), permanent_on=(KeyError,))
    policy = base.replace(max_attempts=None, fixed=5.0, jitter="none", budget=90)
    again = RetryPolicy.from_dict(json.loads(json.dumps(policy.to_dict())), base=base)
    assert again == policy
    assert again.retry_on == (ConnectionError,)
    assert again.permanent_on == (KeyError,)


def test_from_dict_defaults_base_and_keeps_missing_fields() -> None:
    policy = RetryPolicy.from_dict({"max_attempts": 2})
    assert policy == RetryPolicy(max_attempts=2)


def test_from_dict_rejects_unknown_keys_and_exception_fields() -> None:
    with pytest.raises(ConfigError, match=r"unknown RetryPolicy field\(s\).*max_retries"):
        RetryPolicy.from_dict({"max_retries": 3})
    with pytest.raises(ConfigError, match="retry_on"):
        RetryPolicy.from_dict({"retry_on": ["ConnectionError"]})


def test_from_dict_validates_values() -> None:
    with pytest.raises(ConfigError, match=r"RetryPolicy\.initial"):
        RetryPolicy.from_dict({"initial": -1})


def test_replace_validates_and_rejects_unknown_fields() -> None:
    policy = RetryPolicy()
    assert policy.replace(cap=10).cap == 10.0
    assert policy.cap == 300.0
    with pytest.raises(ConfigError, match=r"RetryPolicy\.cap"):
        policy.replace(cap=0.5)
    with pytest.raises(ConfigError, match=r"unknown RetryPolicy field.*backoff"):
        policy.replace(backoff=2)


# -- classify -----------------------------------------------------------------------------------


class Http4xx(Permanent):
    classification = "http_4xx"


class Labelled(Exception):
    def __init__(self, classification: object) -> None:
        super().__init__("labelled")
        self.classification = classification


@pytest.mark.parametrize(
    ("exc", "expected", "retryable"),
    [
        (Permanent("gone"), "permanent", False),
        (Http4xx("404"), "http_4xx", False),
        (KeyError("k"), "permanent", False),  # in permanent_on
        (ValueError("v"), "transient", True),
        (RetryAfter(5), "rate_limited", True),
        (TimeoutError(), "timeout", True),
        (Labelled("http_5xx"), "http_5xx", True),
        (Labelled("http_4xx"), "http_4xx", False),
        (Labelled(42), "transient", True),  # not a string: ignored
        (ConnectionError("reset"), "transient", True),
        (KeyboardInterrupt(), "permanent", False),
    ],
)
def test_classify_each_kind(exc: BaseException, expected: str, retryable: bool) -> None:
    policy = RetryPolicy(permanent_on=(KeyError,))
    assert policy.classify(exc) == expected
    assert policy.is_retryable(exc) is retryable


def test_exceptions_outside_retry_on_are_permanent_but_retry_after_is_not() -> None:
    policy = RetryPolicy(retry_on=(ConnectionError,))
    assert policy.classify(ValueError()) == "permanent"
    assert not policy.is_retryable(ValueError())
    assert policy.classify(TimeoutError()) == "permanent"
    assert policy.is_retryable(ConnectionResetError())
    assert policy.classify(RetryAfter(1)) == "rate_limited"
    assert policy.is_retryable(RetryAfter(1))


def test_permanent_on_beats_retry_on() -> None:
    policy = RetryPolicy(retry_on=(OSError,), permanent_on=(FileNotFoundError,))
    assert policy.is_retryable(ConnectionError())
    assert not policy.is_retryable(FileNotFoundError())


# -- decide -------------------------------------------------------------------------------------


def run_decide(policy: RetryPolicy, **overrides: Any) -> Decision:
    kwargs: dict[str, Any] = {
        "attempt": 1,
        "classification": "transient",
        "retryable": True,
        "retry_after": None,
        "elapsed": 0.0,
        "rand": half,
    }
    kwargs.update(overrides)
    return decide(policy, **kwargs)


NONE = RetryPolicy(max_attempts=3, initial=1, multiplier=2, cap=10, jitter="none")


def test_decide_not_retryable_dead_letters_with_its_classification() -> None:
    got = run_decide(NONE, classification="http_4xx", retryable=False)
    assert got == Decision(Outcome.DEAD_LETTER, 0.0, "http_4xx")


def test_decide_not_retryable_wins_even_with_attempts_left_and_retry_after() -> None:
    got = run_decide(NONE, classification="permanent", retryable=False, retry_after=1.0)
    assert got == Decision(Outcome.DEAD_LETTER, 0.0, "permanent")


def test_decide_retries_with_backoff_and_classification() -> None:
    assert run_decide(NONE, attempt=1) == Decision(Outcome.RETRY, 1.0, "transient")
    assert run_decide(NONE, attempt=2, classification="timeout") == Decision(
        Outcome.RETRY, 2.0, "timeout"
    )


def test_decide_uses_rand_for_jitter() -> None:
    policy = NONE.replace(jitter="full")
    assert run_decide(policy, attempt=2, rand=lambda: 0.25).delay == 0.5


def test_decide_exhausted_at_max_attempts() -> None:
    assert run_decide(NONE, attempt=3) == Decision(Outcome.DEAD_LETTER, 0.0, "exhausted")
    assert run_decide(NONE, attempt=4).classification == "exhausted"


def test_decide_lease_expired_at_max_attempts_is_poison() -> None:
    got = run_decide(NONE, attempt=3, classification="lease_expired")
    assert got == Decision(Outcome.DEAD_LETTER, 0.0, "poison")
    retry = run_decide(NONE, attempt=2, classification="lease_expired")
    assert retry == Decision(Outcome.RETRY, 2.0, "lease_expired")


def test_decide_unlimited_attempts_never_exhaust() -> None:
    policy = NONE.replace(max_attempts=None)
    got = run_decide(policy, attempt=10_000)
    assert got == Decision(Outcome.RETRY, 10.0, "transient")


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(7.5, 7.5), (-3.0, 0.0), (0.0, 0.0), (1e9, 10.0), (math.inf, 10.0), (math.nan, 1.0)],
)
def test_decide_retry_after_is_clamped_to_cap(retry_after: float, expected: float) -> None:
    got = run_decide(NONE, classification="rate_limited", retry_after=retry_after)
    assert got == Decision(Outcome.RETRY, expected, "rate_limited")


def test_decide_budget_exhausted_when_next_attempt_would_start_past_it() -> None:
    policy = NONE.replace(budget=10)
    assert run_decide(policy, attempt=2, elapsed=8.0) == Decision(Outcome.RETRY, 2.0, "transient")
    assert run_decide(policy, attempt=2, elapsed=8.5) == Decision(
        Outcome.DEAD_LETTER, 0.0, "budget_exhausted"
    )


def test_decide_budget_counts_retry_after() -> None:
    policy = NONE.replace(budget=10)
    got = run_decide(policy, elapsed=5.0, retry_after=6.0)
    assert got.classification == "budget_exhausted"


def test_decide_exhausted_is_checked_before_budget() -> None:
    policy = NONE.replace(budget=1)
    assert run_decide(policy, attempt=3, elapsed=100.0).classification == "exhausted"


def test_decide_rejects_bad_attempt_numbers() -> None:
    with pytest.raises(ConfigError, match="attempt must be an integer >= 1"):
        run_decide(NONE, attempt=0)


def test_backoff_rejects_bad_rand_and_attempt() -> None:
    with pytest.raises(ConfigError, match=r"rand\(\) must return a float in \[0, 1\)"):
        backoff(NONE, 1, lambda: 1.0)
    with pytest.raises(ConfigError, match="attempt must be an integer >= 1"):
        backoff(NONE, 0, half)


def test_backoff_examples() -> None:
    policy = RetryPolicy(initial=1, multiplier=2, cap=10)
    assert [backoff(policy.replace(jitter="none"), n, half) for n in (1, 2, 3, 4, 5)] == [
        1.0,
        2.0,
        4.0,
        8.0,
        10.0,
    ]
    assert backoff(policy.replace(jitter="full"), 3, half) == 2.0
    assert backoff(policy.replace(jitter="equal"), 3, half) == 3.0
    # decorrelated: uniform in [initial, min(cap, 3 * base(attempt - 1))] = [1, 6] for attempt 3
    assert backoff(policy.replace(jitter="decorrelated"), 3, half) == 3.5
    assert backoff(policy.replace(jitter="decorrelated"), 1, lambda: 0.0) == 1.0
    assert backoff(policy.replace(jitter="none", fixed=3), 9, half) == 3.0
    # decorrelated with a fixed interval: uniform in [min(initial, fixed / 3), fixed]
    assert backoff(policy.replace(jitter="decorrelated", fixed=3), 9, lambda: 0.0) == 1.0
    assert backoff(
        policy.replace(jitter="decorrelated", fixed=0.6), 9, lambda: 0.0
    ) == pytest.approx(0.2)
