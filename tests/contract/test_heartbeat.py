"""heartbeat: leases are extended only while held, and carry cancel requests back."""

from __future__ import annotations

from durably.job import Action, Outcome, Status
from durably.store import Store
from durably.store.base import Lease
from durably.testing import FakeClock

from .conftest import act, at, finish, lease_of, reach, same_time


async def test_heartbeat_extends_expiry(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(20)
    res = await store.heartbeat([lease_of(job)], 30)
    assert res.renewed == frozenset({job.id})
    assert res.cancel_requested == frozenset()
    after = await store.get(job.id)
    assert same_time(after.lease_expires_at, at(clock, 30))
    assert after.status == Status.RUNNING
    assert after.lease_token == job.lease_token
    assert (await store.expired(10)) == []


async def test_heartbeat_with_wrong_token_is_not_renewed(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(20)
    res = await store.heartbeat([Lease(job.id, "not-the-token")], 30)
    assert res.renewed == frozenset()
    assert await store.get(job.id) == job


async def test_heartbeat_mixed_leases(store: Store) -> None:
    a = await reach(store, Status.RUNNING, queue="a")
    b = await reach(store, Status.RUNNING, queue="b")
    res = await store.heartbeat([lease_of(a), Lease(b.id, "stale"), Lease(999_999, "x")], 30)
    assert res.renewed == frozenset({a.id})


async def test_heartbeat_after_completion_is_not_renewed(store: Store) -> None:
    job = await reach(store, Status.RUNNING)
    assert await finish(store, job, Outcome.SUCCEEDED)
    done = await store.get(job.id)
    res = await store.heartbeat([lease_of(job)], 30)
    assert res.renewed == frozenset()
    assert await store.get(job.id) == done


async def test_heartbeat_reports_cancel_request(store: Store) -> None:
    job = await reach(store, Status.RUNNING)
    other = await reach(store, Status.RUNNING, queue="other")
    await act(store, job.id, Action.CANCEL)
    res = await store.heartbeat([lease_of(job), lease_of(other)], 30)
    assert res.renewed == frozenset({job.id, other.id})
    assert res.cancel_requested == frozenset({job.id})


async def test_heartbeat_moves_updated_at(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    clock.advance(10)
    await store.heartbeat([lease_of(job)], 30)
    assert same_time((await store.get(job.id)).updated_at, at(clock))


async def test_heartbeat_bumps_version(store: Store, clock: FakeClock) -> None:
    """store/base.py: "every change bumps version"; a renewal changes ``lease_expires_at``."""
    job = await reach(store, Status.RUNNING)
    clock.advance(10)
    await store.heartbeat([lease_of(job)], 30)
    assert (await store.get(job.id)).version == job.version + 1


async def test_heartbeat_renews_an_expired_lease_not_yet_rescued(
    store: Store, clock: FakeClock
) -> None:
    """The lease is still held (running, same token) until the rescuer takes it over."""
    job = await reach(store, Status.RUNNING)
    clock.advance(45)
    assert [j.id for j in await store.expired(10)] == [job.id]
    res = await store.heartbeat([lease_of(job)], 30)
    assert res.renewed == frozenset({job.id})
    assert same_time((await store.get(job.id)).lease_expires_at, at(clock, 30))
    assert await store.expired(10) == []
