"""Properties of the pure backoff function, for every jitter and any policy."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import assume, given
from hypothesis import strategies as st

from durably.policy import Jitter, RetryPolicy, backoff

JITTERS: tuple[Jitter, ...] = ("none", "full", "equal", "decorrelated")

unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
attempts = st.integers(min_value=1, max_value=200)


@st.composite
def policies(draw: st.DrawFn, jitter: st.SearchStrategy[Jitter] | None = None) -> RetryPolicy:
    initial = draw(st.floats(min_value=1e-3, max_value=100.0))
    cap = initial * draw(st.floats(min_value=1.0, max_value=1e4))
    return RetryPolicy(
        initial=initial,
        multiplier=draw(st.floats(min_value=1.0, max_value=10.0)),
        cap=cap,
        jitter=draw(jitter if jitter is not None else st.sampled_from(JITTERS)),
    )


def const(value: float) -> Callable[[], float]:
    return lambda: value


def base(policy: RetryPolicy, attempt: int) -> float:
    return backoff(policy.replace(jitter="none"), attempt, const(0.0))


@given(policies(), attempts, unit)
def test_delay_is_within_zero_and_cap(policy: RetryPolicy, attempt: int, r: float) -> None:
    assert 0.0 <= backoff(policy, attempt, const(r)) <= policy.cap


@given(policies(st.just("none")), attempts)
def test_no_jitter_grows_until_cap_then_stays_there(policy: RetryPolicy, attempt: int) -> None:
    here = backoff(policy, attempt, const(0.0))
    after = backoff(policy, attempt + 1, const(0.0))
    assert after >= here
    if here == policy.cap:
        assert after == policy.cap
    if policy.multiplier > 1.01:  # cap / initial <= 1e4 is reached well before 10_000 attempts
        assert backoff(policy, 10_000, const(0.0)) == policy.cap


@given(
    st.floats(min_value=0.01, max_value=10.0),
    st.floats(min_value=1.5, max_value=10.0),
    st.integers(min_value=1, max_value=60),
)
def test_no_jitter_is_exactly_exponential_below_cap(
    initial: float, multiplier: float, attempt: int
) -> None:
    policy = RetryPolicy(initial=initial, multiplier=multiplier, cap=1e12, jitter="none")
    expected = min(policy.cap, initial * multiplier ** (attempt - 1))
    assert abs(backoff(policy, attempt, const(0.0)) - expected) <= 1e-9 * expected


@given(policies(st.just("full")), attempts, unit)
def test_full_jitter_is_within_zero_and_base(policy: RetryPolicy, attempt: int, r: float) -> None:
    assert 0.0 <= backoff(policy, attempt, const(r)) <= base(policy, attempt)


@given(policies(st.just("equal")), attempts, unit)
def test_equal_jitter_is_within_half_base_and_base(
    policy: RetryPolicy, attempt: int, r: float
) -> None:
    b = base(policy, attempt)
    assert b / 2 <= backoff(policy, attempt, const(r)) <= b


@given(policies(st.just("decorrelated")), attempts, unit)
def test_decorrelated_is_within_initial_and_three_times_previous(
    policy: RetryPolicy, attempt: int, r: float
) -> None:
    prev = policy.initial if attempt == 1 else base(policy, attempt - 1)
    delay = backoff(policy, attempt, const(r))
    assert policy.initial <= delay <= min(policy.cap, 3 * prev)


@given(
    policies(st.sampled_from(("full", "equal", "decorrelated"))),
    st.integers(min_value=1, max_value=10**6),
    unit,
    unit,
)
def test_jitter_spreads_delays_at_cap(
    policy: RetryPolicy, extra: int, r1: float, r2: float
) -> None:
    assume(policy.cap > policy.initial * 1.01 and policy.multiplier > 1.01)
    assume(abs(r1 - r2) > 1e-6)
    attempt = 2_000 + extra  # far past the cap for every multiplier above 1.01
    assert base(policy, attempt) == policy.cap
    assert backoff(policy, attempt, const(r1)) != backoff(policy, attempt, const(r2))


@given(
    st.floats(min_value=1e-3, max_value=100.0),
    st.sampled_from(JITTERS),
    st.integers(min_value=1, max_value=10**9),
    unit,
)
def test_fixed_interval_is_within_zero_and_fixed(
    fixed: float, jitter: Jitter, attempt: int, r: float
) -> None:
    policy = RetryPolicy(fixed=fixed, cap=100.0, jitter=jitter)
    delay = backoff(policy, attempt, const(r))
    assert 0.0 <= delay <= fixed
    if jitter == "none":
        assert delay == fixed
    else:  # jitter still spreads a fixed interval
        assert backoff(policy, attempt, const(0.0)) < backoff(policy, attempt, const(0.9))


@given(policies(), st.integers(min_value=10**4, max_value=10**400), unit)
def test_huge_attempt_numbers_do_not_overflow(policy: RetryPolicy, attempt: int, r: float) -> None:
    delay = backoff(policy, attempt, const(r))
    assert 0.0 <= delay <= policy.cap
    if policy.jitter == "none" and policy.multiplier > 1.01:
        assert delay == policy.cap
