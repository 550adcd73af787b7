"""version and updated_at: every change bumps version exactly once and moves updated_at."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durably.errors import DurablyError
from durably.job import Action, Job, NewJob, Outcome, Status
from durably.store import Store
from durably.store.base import Lease
from durably.testing import FakeClock

from .conftest import (
    act,
    at,
    changed_fields,
    claim,
    claim_one,
    enqueue_one,
    finish,
    lease_of,
    reach,
    same_time,
)


async def test_lifecycle_bumps_version_once_per_change(store: Store, clock: FakeClock) -> None:
    seen: list[Job] = [await enqueue_one(store, key="k")]
    job_id = seen[0].id

    async def changed_once() -> None:
        job = await store.get(job_id)
        assert job.version == seen[-1].version + 1, f"after change {len(seen)}"
        assert same_time(job.updated_at, at(clock))
        assert job.updated_at > seen[-1].updated_at
        seen.append(job)
        clock.advance(3)

    clock.advance(3)
    await store.upsert(NewJob(handler="h", payload={"v": 2}, key="k"))
    await changed_once()
    running = await claim_one(store)
    await changed_once()
    assert await store.release([lease_of(running)]) == 1
    await changed_once()
    running = await claim_one(store)
    await changed_once()
    assert await finish(store, running, Outcome.RETRY, retry_in=0)
    await changed_once()
    await act(store, job_id, Action.REQUEUE)
    await changed_once()
    running = await claim_one(store)
    await changed_once()
    await act(store, job_id, Action.CANCEL)  # running: only cancel_requested
    await changed_once()
    assert await finish(store, running, Outcome.DEAD_LETTER)
    await changed_once()
    await act(store, job_id, Action.RESOLVE)
    await changed_once()


async def test_rejected_writes_change_nothing(store: Store, clock: FakeClock) -> None:
    running = await reach(store, Status.RUNNING, key="k")
    clock.advance(1)
    stale = Lease(running.id, "stale")
    await store.enqueue([NewJob(handler="h", payload={"x": 1}, key="k")])
    await store.upsert(NewJob(handler="h", payload={"x": 1}, key="k"))
    await store.heartbeat([stale], 30)
    assert await store.release([stale]) == 0
    assert not await finish(
        store, dataclasses.replace(running, lease_token="stale"), Outcome.SUCCEEDED
    )
    for action in (Action.RESOLVE, Action.ABANDON, Action.REQUEUE):
        with contextlib.suppress(DurablyError):
            await act(store, running.id, action)
    assert await store.get(running.id) == running


# -- property ------------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("enqueue"), st.sampled_from(["k1", "k2", ""])),
        st.tuples(st.just("upsert"), st.sampled_from(["k1", "k2"])),
        st.tuples(st.just("claim"), st.integers(1, 3)),
        st.tuples(st.just("complete"), st.sampled_from(list(Outcome))),
        st.tuples(st.just("stale_complete"), st.sampled_from(list(Outcome))),
        st.tuples(st.just("release"), st.just("")),
        st.tuples(st.just("act"), st.sampled_from(list(Action))),
        st.tuples(st.just("advance"), st.sampled_from([1, 31, 3600])),
    ),
    min_size=1,
    max_size=30,
)

_runs = itertools.count()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=OPS, rnd=st.randoms(use_true_random=False))
async def test_version_strictly_increases_with_each_change(
    store: Store, clock: FakeClock, ops: list[tuple[str, object]], rnd: random.Random
) -> None:
    """Any sequence of producer, worker and operator calls: each job's version moves by exactly
    one on every call that changes it, and not at all on calls that do not."""
    queue = f"prop{next(_runs)}"
    known: dict[int, Job] = {}
    held: dict[int, Job] = {}  # as claimed: the lease a worker would hold

    for step, (op, arg) in enumerate(ops):
        acted: int | None = None
        if op in ("enqueue", "upsert"):
            key = f"{queue}-{arg}" if arg else None
            new = NewJob(handler="h", payload={"step": step}, queue=queue, key=key)
            res = (await store.enqueue([new]))[0] if op == "enqueue" else await store.upsert(new)
            if res.job.id not in known:
                assert res.created
                assert res.job.version == 1
                known[res.job.id] = res.job
        elif op == "claim":
            assert isinstance(arg, int)
            for job in await claim(store, (queue,), limit=arg):
                held[job.id] = job
        elif op in ("complete", "stale_complete") and held:
            assert isinstance(arg, Outcome)
            job = held[rnd.choice(sorted(held))]
            if op == "stale_complete":
                job = dataclasses.replace(job, lease_token="stale")
            await finish(store, job, arg, retry_in=1)
        elif op == "release" and held:
            await store.release([lease_of(held[rnd.choice(sorted(held))])])
        elif op == "act" and known:
            assert isinstance(arg, Action)
            target = rnd.choice(sorted(known))
            with contextlib.suppress(DurablyError):
                await act(store, target, arg)
                # An applied action is audited at a new version even if it changed no field
                # (a repeated cancel request on a running job).
                acted = target
        elif op == "advance":
            assert isinstance(arg, int)
            clock.advance(arg)

        for job_id, old in known.items():
            new_state = await store.get(job_id)
            changed = changed_fields(old, new_state)
            if changed or job_id == acted:
                assert new_state.version == old.version + 1, (op, arg, sorted(changed))
                assert new_state.updated_at >= old.updated_at
            else:
                assert new_state.version == old.version, (op, arg)
            known[job_id] = new_state
