"""A stateful model of the job lifecycle, checked against the SQLite store step by step.

Hypothesis drives enqueue / claim / heartbeat / complete / release / operator actions / the clock /
the rescuer, with right and stale lease tokens, and after every step the store must agree with a
plain Python model: status, attempts, version, lease and schedule of every job. Jobs a step must
not touch must come out byte-for-byte identical, terminal jobs change only by requeue, a stale
token changes nothing, and no job is ever lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from durably.errors import Conflict, InvalidTransition
from durably.job import (
    ACTIONS,
    TERMINAL,
    Action,
    Completion,
    Job,
    JobFilter,
    NewJob,
    Outcome,
    Status,
)
from durably.policy import RetryPolicy
from durably.store.base import ActionRequest, ClaimRequest, Lease
from durably.store.sqlite import SQLiteStore
from durably.testing import FakeClock
from durably.worker import Rescuer

T = TypeVar("T")

LEASE = 10.0
POLICY = RetryPolicy(max_attempts=3, initial=1.0, multiplier=2.0, cap=8.0, jitter="none")
TOLERANCE = timedelta(milliseconds=1)
STATUS_AFTER = {
    Outcome.SUCCEEDED: Status.SUCCEEDED,
    Outcome.RETRY: Status.RETRYING,
    Outcome.DEAD_LETTER: Status.DEAD_LETTER,
    Outcome.CANCELLED: Status.CANCELLED,
}
TOKEN_KINDS = st.sampled_from(["current", "stale", "bogus"])


@dataclasses.dataclass
class Model:
    """What the store must hold for one job."""

    status: Status
    attempts: int
    version: int
    run_at: datetime
    token: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    old_tokens: list[str] = dataclasses.field(default_factory=list)

    def drop_lease(self) -> None:
        if self.token is not None:
            self.old_tokens.append(self.token)
        self.token = None
        self.lease_expires_at = None
        self.cancel_requested = False


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.store = SQLiteStore(":memory:", clock=self.clock.now)
        self.run(self.store.open())
        self.model: dict[int, Model] = {}
        self.before: dict[int, Job] = {}
        self.allowed: set[int] = set()  # jobs the current step may change
        self.requeued: set[int] = set()  # terminal jobs the current step may revive

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()

    # -- helpers ----------------------------------------------------------------------------

    def snapshot(self) -> dict[int, Job]:
        jobs = self.run(self.store.list_jobs(JobFilter(), limit=10_000))
        return {job.id: job for job in jobs}

    def begin(self, *touching: int) -> None:
        self.before = self.snapshot()
        self.allowed = set(touching)
        self.requeued = set()

    def token_for(self, m: Model, kind: str) -> str:
        if kind == "current" and m.token is not None:
            return m.token
        if kind == "stale" and m.old_tokens:
            return m.old_tokens[-1]
        return "not-a-token"

    def applied(self, job_id: int, version_after: int) -> None:
        """Check the store bumped the version of a changed job, and follow it."""
        m = self.model[job_id]
        assert version_after > m.version, f"job {job_id}: version did not increase"
        m.version = version_after

    # -- rules ------------------------------------------------------------------------------

    @rule(count=st.integers(min_value=1, max_value=3), delay=st.sampled_from([0.0, 0.0, 5.0]))
    def enqueue(self, count: int, delay: float) -> None:
        self.begin()
        new = [
            NewJob(
                handler="h",
                payload={"n": len(self.model) + i},
                max_attempts=POLICY.max_attempts,
                policy=POLICY.to_dict(),
                delay=delay,
            )
            for i in range(count)
        ]
        results = self.run(self.store.enqueue(new))
        for result in results:
            job = result.job
            assert result.created
            assert job.id not in self.model
            assert (job.status, job.attempts) == (Status.PENDING, 0)
            self.model[job.id] = Model(
                Status.PENDING, 0, job.version, self.clock.now() + timedelta(seconds=delay)
            )

    @rule(limit=st.integers(min_value=1, max_value=4))
    def claim(self, limit: int) -> None:
        now = self.clock.now()
        # Due retries first, then pending jobs; each oldest run_at first, ties by id.
        due = sorted(
            (m.status is not Status.RETRYING, m.run_at, job_id)
            for job_id, m in self.model.items()
            if m.status in (Status.PENDING, Status.RETRYING) and m.run_at <= now
        )
        expected = [job_id for *_, job_id in due[:limit]]
        self.begin(*expected)
        claimed = self.run(self.store.claim(ClaimRequest(("default",), "w", limit, LEASE)))
        assert [job.id for job in claimed] == expected
        for job in claimed:
            m = self.model[job.id]
            assert job.status is Status.RUNNING
            assert job.lease_token
            assert job.lease_token not in m.old_tokens
            self.applied(job.id, job.version)
            m.status = Status.RUNNING
            m.attempts += 1
            m.token = job.lease_token
            m.lease_expires_at = now + timedelta(seconds=LEASE)

    @precondition(lambda self: self.model)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(list(Outcome)),
        kind=TOKEN_KINDS,
        retry_in=st.integers(min_value=0, max_value=5),
    )
    def complete(self, data: st.DataObject, outcome: Outcome, kind: str, retry_in: int) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model[job_id]
        token = self.token_for(m, kind)
        should = m.status is Status.RUNNING and token == m.token
        self.begin(*([job_id] if should else []))
        completion = Completion(
            job_id,
            token,
            m.attempts,
            outcome,
            result={"ok": True} if outcome is Outcome.SUCCEEDED else None,
            classification=None if outcome is Outcome.SUCCEEDED else "transient",
            error_type=None if outcome is Outcome.SUCCEEDED else "E",
            error_message=None if outcome is Outcome.SUCCEEDED else "boom",
            retry_in=float(retry_in),
            duration=0.1,
        )
        assert self.run(self.store.complete([completion])) == [should]
        if should:
            self.applied(job_id, self.run(self.store.get(job_id)).version)
            m.status = STATUS_AFTER[outcome]
            m.drop_lease()
            if outcome is Outcome.RETRY:
                m.run_at = self.clock.now() + timedelta(seconds=retry_in)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), kind=TOKEN_KINDS)
    def heartbeat(self, data: st.DataObject, kind: str) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model[job_id]
        token = self.token_for(m, kind)
        should = m.status is Status.RUNNING and token == m.token
        self.begin(*([job_id] if should else []))
        result = self.run(self.store.heartbeat([Lease(job_id, token)], LEASE))
        assert result.renewed == (frozenset({job_id}) if should else frozenset())
        assert result.cancel_requested == (
            frozenset({job_id}) if should and m.cancel_requested else frozenset()
        )
        if should:
            m.lease_expires_at = self.clock.now() + timedelta(seconds=LEASE)
            self.applied(job_id, self.run(self.store.get(job_id)).version)  # a renewal is a change

    @precondition(lambda self: self.model)
    @rule(data=st.data(), kind=TOKEN_KINDS)
    def release(self, data: st.DataObject, kind: str) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model[job_id]
        token = self.token_for(m, kind)
        should = m.status is Status.RUNNING and token == m.token
        self.begin(*([job_id] if should else []))
        assert self.run(self.store.release([Lease(job_id, token)])) == int(should)
        if should:
            self.applied(job_id, self.run(self.store.get(job_id)).version)
            m.attempts -= 1
            m.status = Status.PENDING if m.attempts == 0 else Status.RETRYING
            m.drop_lease()

    @precondition(lambda self: self.model)
    @rule(
        data=st.data(),
        action=st.sampled_from(list(Action)),
        version=st.sampled_from(["none", "current", "old"]),
        reset=st.booleans(),
    )
    def act(self, data: st.DataObject, action: Action, version: str, reset: bool) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model[job_id]
        expected_version = {"none": None, "current": m.version, "old": m.version - 1}[version]
        rule_ = ACTIONS[action]
        conflict = expected_version is not None and expected_version != m.version
        ask_cancel = action is Action.CANCEL and m.status is Status.RUNNING
        allowed = not conflict and (m.status in rule_.sources or ask_cancel)
        self.begin(*([job_id] if allowed else []))
        if allowed and action is Action.REQUEUE:
            self.requeued.add(job_id)
        request = ActionRequest(job_id, action, "prop", "n", expected_version, reset)
        try:
            after = self.run(self.store.act(request))
        except Conflict:
            assert conflict
            return
        except InvalidTransition:
            assert not conflict
            assert not allowed
            return
        assert allowed, f"{action} from {m.status} should have been refused"
        self.applied(job_id, after.version)
        if ask_cancel:
            m.cancel_requested = True
            return
        m.status = rule_.target
        if action is Action.REQUEUE:
            m.run_at = self.clock.now()
            if reset:
                m.attempts = 0

    @rule(seconds=st.sampled_from([0.5, 1, 3, 6, 11, 30]))
    def advance(self, seconds: float) -> None:
        self.begin()
        self.clock.advance(seconds)

    @rule()
    def rescue(self) -> None:
        now = self.clock.now()
        expired = [
            job_id
            for job_id, m in self.model.items()
            if m.status is Status.RUNNING
            and m.lease_expires_at is not None
            and m.lease_expires_at < now
        ]
        self.begin(*expired)
        rescued = self.run(Rescuer(self.store, {}, rand=lambda: 0.5).run_once())
        assert rescued == len(expired)
        for job_id in expired:
            m = self.model[job_id]
            job = self.run(self.store.get(job_id))
            self.applied(job_id, job.version)
            m.drop_lease()
            if m.attempts >= (POLICY.max_attempts or 0):
                m.status = Status.DEAD_LETTER
                assert job.classification == "poison"
            else:
                m.status = Status.RETRYING
                m.run_at = now + timedelta(seconds=min(8.0, 2.0 ** (m.attempts - 1)))
                assert job.classification == "lease_expired"

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        jobs = self.snapshot()
        assert sorted(jobs) == sorted(self.model), "a job was lost or appeared"
        for job_id, job in jobs.items():
            m = self.model[job_id]
            assert job.status is m.status, job_id
            assert job.attempts == m.attempts, job_id
            assert job.version == m.version, job_id
            assert job.lease_token == m.token, job_id
            assert job.cancel_requested == m.cancel_requested, job_id
            if m.status in (Status.PENDING, Status.RETRYING):
                assert abs(job.run_at - m.run_at) <= TOLERANCE, job_id
            if m.lease_expires_at is not None:
                assert job.lease_expires_at is not None
                assert abs(job.lease_expires_at - m.lease_expires_at) <= TOLERANCE
            previous = self.before.get(job_id)
            if previous is None:
                continue
            if job_id not in self.allowed:
                assert job == previous, f"job {job_id} changed though the step did not touch it"
            if previous.status in TERMINAL and job != previous:
                assert job_id in self.requeued, f"terminal job {job_id} changed"
                assert job.status is Status.PENDING


Lifecycle.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycle = Lifecycle.TestCase
