"""The Redis store against a real Redis: what the contract suite cannot see."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from conftest import unique_name
from durably import Durably, JobContext, Worker
from durably.errors import (
    ConfigError,
    Conflict,
    InvalidTransition,
    JobNotFound,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from durably.events import batch_payload, processed_payload
from durably.job import Action, Completion, JobFilter, NewJob, Outcome, Status
from durably.store import from_url
from durably.store.base import ActionRequest, ClaimRequest, ClaimsOnWake, Lease, Store
from durably.store.redis import _DRAFT_SLICE, SCRIPTS, RedisStore
from durably.testing import FakeClock

pytestmark = pytest.mark.redis

OpenStore = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for inspecting and provoking the server."""
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def open_store(redis_url: str) -> AsyncIterator[OpenStore]:
    """Open Redis stores, each in its own prefix unless given one; all dropped afterwards."""
    opened: list[RedisStore] = []

    async def build(**options: Any) -> RedisStore:
        options.setdefault("prefix", unique_name("durably-test"))
        store = RedisStore(redis_url, **options)
        await store.open()
        opened.append(store)
        return store

    yield build
    for store in opened:
        if store._client is None:
            await store.open()
        await store.drop_namespace()
        await store.close()


async def _keys(admin: aioredis.Redis, prefix: str) -> list[str]:
    return [k async for k in admin.scan_iter(match="{" + prefix + "}:*")]


async def test_from_url_masks_password_and_validates_prefix(redis_url: str) -> None:
    store = from_url("redis://user:s3cret@127.0.0.1:6379/0", prefix="app")
    assert isinstance(store, RedisStore)
    assert "s3cret" not in store.url
    assert "s3cret" not in repr(store)
    with pytest.raises(ConfigError, match="invalid Redis prefix"):
        RedisStore(redis_url, prefix="bad prefix{x}")


async def test_closed_store_refuses_politely(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix=unique_name("durably-test"))
    with pytest.raises(StoreError, match="not open"):
        await store.get(1)
    await store.close()
    await store.close()


async def test_refuses_an_evicting_server_unless_allowed(
    open_store: OpenStore, admin: aioredis.Redis, redis_url: str
) -> None:
    original = (await admin.config_get("maxmemory-policy"))["maxmemory-policy"]
    try:
        await admin.config_set("maxmemory-policy", "allkeys-lru")
        refused = RedisStore(redis_url, prefix=unique_name("durably-test"))
        with pytest.raises(ConfigError) as info:
            await refused.open()
        message = str(info.value)
        assert "allkeys-lru" in message
        assert "evict" in message
        assert "CONFIG SET maxmemory-policy noeviction" in message
        assert refused._client is None  # a refused open leaves nothing connected
        store = await open_store(allow_eviction=True)
        assert await store.schema_version() == 1
    finally:
        await admin.config_set("maxmemory-policy", original)
    assert (await admin.config_get("maxmemory-policy"))["maxmemory-policy"] == original


async def test_schema_is_recorded_and_a_newer_one_refused(
    open_store: OpenStore, admin: aioredis.Redis, redis_url: str
) -> None:
    store = await open_store()
    assert await store.schema_version() == 1
    assert await store.migrate(dry_run=True) == []
    assert await store.migrate() == []

    fresh = RedisStore(redis_url, prefix=unique_name("durably-test"))
    fresh._client = None
    await fresh.open()
    try:
        assert await fresh.schema_version() == 1
    finally:
        await fresh.drop_namespace()
        await fresh.close()

    await admin.set("{" + store.prefix + "}:schema", "2")
    newer = RedisStore(redis_url, prefix=store.prefix)
    with pytest.raises(SchemaTooNew, match="upgrade durably"):
        await newer.open()


async def test_two_prefixes_never_see_each_other(
    open_store: OpenStore, admin: aioredis.Redis
) -> None:
    a = await open_store()
    b = await open_store()
    await a.enqueue([NewJob("send", {"to": "a"}, key="same-key")])
    [created] = await b.enqueue([NewJob("send", {"to": "b"}, key="same-key")])
    assert created.created  # the key is per namespace

    assert [j.payload for j in await a.list_jobs(JobFilter())] == [{"to": "a"}]
    assert [j.payload for j in await b.list_jobs(JobFilter())] == [{"to": "b"}]
    claimed = await b.claim(ClaimRequest(["default"], "w", 10, 30))
    assert [j.payload for j in claimed] == [{"to": "b"}]
    assert await a.counts() == {("default", Status.PENDING): 1}

    a_keys = await _keys(admin, a.prefix)
    assert a_keys
    assert all(k.startswith("{" + a.prefix + "}:") for k in a_keys)
    await a.drop_namespace()
    assert await _keys(admin, a.prefix) == []
    assert await _keys(admin, b.prefix) != []


async def test_wait_is_woken_by_an_enqueue_from_another_store(
    open_store: OpenStore, redis_url: str
) -> None:
    worker = await open_store()
    producer = await open_store(prefix=worker.prefix)
    assert await worker.wait(["mail"], 0) is False  # nothing enqueued yet

    waiting = asyncio.create_task(worker.wait(["mail", "other"], 30))
    # The waiter must be blocked in BLPOP before the enqueue; no sleeping to find out.
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as admin:
        while True:
            clients = await admin.client_list()
            if any(
                c.get("name") == worker.client_name + ":wait" and c.get("cmd") == "blpop"
                for c in clients
            ):
                break
            await asyncio.sleep(0)
    await producer.enqueue([NewJob("send", {}, queue="mail")])
    assert await asyncio.wait_for(waiting, 5) is True
    assert await worker.wait(["nothing-here"], 0.01) is False


async def test_connection_kill_is_survived(open_store: OpenStore, admin: aioredis.Redis) -> None:
    store = await open_store()
    [first] = await store.enqueue([NewJob("send", {"n": 1})])

    async def kill_own() -> int:
        killed = 0
        for client in await admin.client_list():
            if client.get("name", "").startswith(store.client_name):
                await admin.execute_command("CLIENT", "KILL", "ID", client["id"])
                killed += 1
        return killed

    assert await kill_own() >= 1
    assert (await store.get(first.job.id)).payload == {"n": 1}
    assert await kill_own() >= 1
    [second] = await store.enqueue([NewJob("send", {"n": 2})])
    claimed = await store.claim(ClaimRequest(["default"], "w", 10, 30))
    assert [j.id for j in claimed] == [first.job.id, second.job.id]
    assert await kill_own() >= 1
    assert await store.complete(
        [Completion(j.id, j.lease_token or "", 1, Outcome.SUCCEEDED) for j in claimed]
    ) == [True, True]


async def test_unreachable_server_is_store_unavailable() -> None:
    store = RedisStore("redis://:pw@127.0.0.1:1/0", prefix="nowhere", socket_connect_timeout=1)
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert "pw" not in str(info.value)
    assert info.value.__cause__ is not None


async def test_four_concurrent_claimers_never_share_a_job(open_store: OpenStore) -> None:
    store = await open_store()
    results = await store.enqueue([NewJob("send", {"i": i}, key=f"order-{i}") for i in range(1000)])
    assert all(r.created for r in results)
    assert len({r.job.id for r in results}) == 1000
    again = await store.enqueue([NewJob("send", {"i": 0}, key="order-0")])
    assert not again[0].created
    assert again[0].job.id == results[0].job.id

    claimers = [await open_store(prefix=store.prefix) for _ in range(4)]

    async def drain(s: RedisStore, name: str) -> list[int]:
        got: list[int] = []
        while batch := await s.claim(ClaimRequest(["default"], name, 7, 30)):
            got += [j.id for j in batch]
            await asyncio.sleep(0)
        return got

    claimed = await asyncio.gather(*(drain(s, f"w{i}") for i, s in enumerate(claimers)))
    every = [i for ids in claimed for i in ids]
    assert len(every) == 1000
    assert set(every) == {r.job.id for r in results}
    assert await store.counts() == {("default", Status.RUNNING): 1000}


async def test_claim_orders_by_run_at_then_id_and_fences_completions(
    open_store: OpenStore,
) -> None:
    clock = FakeClock()
    store = await open_store(clock=clock.now)
    jobs = await store.enqueue([NewJob("h", {"i": i}) for i in range(12)])
    late = await store.enqueue([NewJob("h", {}, delay=5)])
    assert await store.next_due_in(["default"]) == 0
    claimed = await store.claim(ClaimRequest(["default"], "w", 20, 10))
    assert [j.id for j in claimed] == [r.job.id for r in jobs]  # ids 10+ after 9: padded
    assert await store.next_due_in(["default"]) == pytest.approx(5)

    job = claimed[0]
    stale = Completion(job.id, "not-the-token", 1, Outcome.SUCCEEDED)
    early_rescue = Completion(job.id, job.lease_token or "", 1, Outcome.RETRY, require_expired=True)
    assert await store.complete([stale, early_rescue]) == [False, False]

    clock.advance(11)
    assert [j.id for j in await store.expired(100)][:2] == [claimed[0].id, claimed[1].id]
    rescue = Completion(
        job.id,
        job.lease_token or "",
        1,
        Outcome.RETRY,
        classification="lease_expired",
        retry_in=3,
        attempt_outcome="lease_expired",
        require_expired=True,
    )
    assert await store.complete([rescue]) == [True]
    after = await store.get(job.id)
    assert after.status is Status.RETRYING
    assert after.run_at == clock.now() + timedelta(seconds=3)
    assert after.lease_token is None
    [attempt] = await store.attempts(job.id)
    assert attempt.outcome == "lease_expired"
    assert attempt.finished_at == clock.now()
    assert late[0].job.run_at == clock.now() - timedelta(seconds=11) + timedelta(seconds=5)


async def test_release_restores_the_job_as_if_never_claimed(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = await open_store(clock=clock.now)
    [result] = await store.enqueue([NewJob("h", {})])
    [job] = await store.claim(ClaimRequest(["default"], "w", 1, 30))
    assert await store.release([Lease(job.id, "wrong")]) == 0
    assert await store.release([Lease(job.id, job.lease_token or "")]) == 1
    back = await store.get(job.id)
    assert back.status is Status.PENDING
    assert back.attempts == 0
    assert back.first_attempt_at is None
    assert back.lease_token is None
    assert await store.attempts(job.id) == []
    assert back.version == result.job.version + 2
    assert [j.id for j in await store.claim(ClaimRequest(["default"], "w", 1, 30))] == [job.id]


async def test_heartbeat_reports_renewed_and_cancel_requested(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = await open_store(clock=clock.now)
    await store.enqueue([NewJob("h", {}), NewJob("h", {})])
    a, b = await store.claim(ClaimRequest(["default"], "w", 2, 10))
    await store.act(ActionRequest(b.id, Action.CANCEL, "ops"))
    clock.advance(5)
    beat = await store.heartbeat(
        [Lease(a.id, a.lease_token or ""), Lease(b.id, b.lease_token or ""), Lease(a.id, "x")],
        10,
    )
    assert beat.renewed == {a.id, b.id}
    assert beat.cancel_requested == {b.id}
    assert (await store.get(a.id)).lease_expires_at == clock.now() + timedelta(seconds=10)


async def test_act_errors_map_to_precise_exceptions(open_store: OpenStore) -> None:
    store = await open_store()
    [r] = await store.enqueue([NewJob("h", {}, key="k")])
    with pytest.raises(JobNotFound):
        await store.act(ActionRequest(999_999, Action.CANCEL, "ops"))
    with pytest.raises(InvalidTransition, match="needs one of: dead_letter"):
        await store.act(ActionRequest(r.job.id, Action.RESOLVE, "ops"))
    with pytest.raises(Conflict):
        await store.act(ActionRequest(r.job.id, Action.CANCEL, "ops", expected_version=99))
    cancelled = await store.act(
        ActionRequest(r.job.id, Action.CANCEL, "ops", notes="dup", expected_version=1)
    )
    assert cancelled.status is Status.CANCELLED
    assert cancelled.operator == "ops"
    [entry] = await store.audit(r.job.id)
    assert (entry.from_status, entry.to_status, entry.version) == ("pending", "cancelled", 2)

    [other] = await store.enqueue([NewJob("h", {}, key="k")])
    assert other.created  # the key was freed by the cancel
    with pytest.raises(Conflict, match="held by live job"):
        await store.act(ActionRequest(r.job.id, Action.REQUEUE, "ops"))
    assert (await store.get(r.job.id)).status is Status.CANCELLED


async def test_prune_removes_jobs_and_their_history(
    open_store: OpenStore, admin: aioredis.Redis
) -> None:
    clock = FakeClock()
    store = await open_store(clock=clock.now)
    await store.enqueue([NewJob("h", {}, key=f"k{i}", batch_id="b") for i in range(3)])
    claimed = await store.claim(ClaimRequest(["default"], "w", 3, 30))
    await store.complete(
        [Completion(j.id, j.lease_token or "", 1, Outcome.SUCCEEDED) for j in claimed[:2]]
    )
    clock.advance(100)
    assert await store.prune(50, frozenset({Status.DEAD_LETTER})) == 0
    assert await store.prune(500, frozenset({Status.SUCCEEDED})) == 0
    assert await store.prune(50, frozenset({Status.SUCCEEDED})) == 2
    assert await store.attempts(claimed[0].id) == []
    with pytest.raises(JobNotFound):
        await store.get(claimed[0].id)
    assert await store.counts() == {("default", Status.RUNNING): 1}
    assert [j.id for j in await store.list_jobs(JobFilter(batch_id="b"))] == [claimed[2].id]
    assert await store.get_by_key("k0") is None
    prefix = "{" + store.prefix + "}"
    assert not await admin.exists(f"{prefix}:job:{claimed[0].id}:attempts")


async def test_every_lua_script_file_is_used(open_store: OpenStore) -> None:
    lua = resources.files("durably.store").joinpath("lua")
    files = {p.name.removesuffix(".lua") for p in lua.iterdir() if p.name.endswith(".lua")}
    assert files == {*SCRIPTS, "_lib"}

    clock = FakeClock()
    store = await open_store(clock=clock.now)
    await store.enqueue([NewJob("h", {}, event_scope="s"), NewJob("h", {})])
    await store.upsert(NewJob("h", {"v": 2}, key="u"))
    a, _, c = await store.claim(ClaimRequest(["default"], "w", 3, 30))
    await store.heartbeat([Lease(a.id, a.lease_token or "")], 30)
    await store.release([Lease(c.id, c.lease_token or "")])
    await store.complete([Completion(a.id, a.lease_token or "", 1, Outcome.DEAD_LETTER)])
    await store.act(ActionRequest(a.id, Action.RESOLVE, "ops"))
    [first] = await store.claim_events(10, 30)  # its job's resolve event waits behind it
    assert first.payload["status"] == "dead_letter"
    assert await store.retry_event(first, 5, "sink down")
    clock.advance(10)
    [again] = await store.claim_events(1, 30)
    assert again.id == first.id
    assert await store.ack_events([again]) == 1
    [resolved] = await store.claim_events(10, 30)
    assert resolved.payload["status"] == "resolved"
    await store.prune(1, frozenset({Status.RESOLVED}))
    assert all(store.script_calls[name] > 0 for name in SCRIPTS), store.script_calls


async def test_outbox_events_are_atomic_ordered_and_fenced(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = await open_store(clock=clock.now)
    jobs = await store.enqueue(
        [
            NewJob(
                "h", {}, event_scope="orders", batch_id="b1", item_index=i, meta={"trace_id": "t"}
            )
            for i in range(3)
        ]
        + [NewJob("h", {}, batch_id="b1")]  # no scope: emits nothing
    )
    claimed = await store.claim(ClaimRequest(["default"], "w", 4, 30))
    assert len(claimed) == 4
    assert await store.claim_events(10, 30) == []
    by_id = {j.id: j for j in claimed}
    ids = [r.job.id for r in jobs]
    await store.complete(
        [
            Completion(ids[0], by_id[ids[0]].lease_token or "", 1, Outcome.SUCCEEDED, result=7),
            Completion(
                ids[1],
                by_id[ids[1]].lease_token or "",
                1,
                Outcome.DEAD_LETTER,
                classification="permanent",
                error_type="ValueError",
                error_message="bad",
            ),
            Completion(ids[3], by_id[ids[3]].lease_token or "", 1, Outcome.SUCCEEDED),
        ]
    )
    # The batch still has a live job: two processed events, no batch event yet.
    events = await store.claim_events(10, 30)
    assert [e.type for e in events] == ["orders.processed", "orders.processed"]
    assert [e.job_id for e in events] == [ids[0], ids[1]]
    assert events[0].payload == processed_payload(await store.get(ids[0]))
    assert events[0].payload["result"] == 7
    assert events[1].payload["error"] == {
        "type": "ValueError",
        "message": "bad",
        "classification": "permanent",
    }
    assert all(e.attempts == 1 for e in events)
    assert await store.claim_events(10, 30) == []  # leased
    assert await store.ack_events([replace(events[0], lease_token="stolen")]) == 0
    assert await store.ack_events(events) == 2

    await store.complete(
        [Completion(ids[2], by_id[ids[2]].lease_token or "", 1, Outcome.CANCELLED)]
    )
    processed, batch = await store.claim_events(10, 30)
    assert processed.type == "orders.processed"
    assert batch.type == "orders.batch_completed"
    assert batch.job_id is None
    assert batch.payload == batch_payload(
        "b1", {"succeeded": 2, "dead_letter": 1, "cancelled": 1}, clock.now()
    )
    # Resolving the dead letter later emits its processed event but no second batch event.
    await store.act(ActionRequest(ids[1], Action.RESOLVE, "ops"))
    assert [e.type for e in await store.claim_events(10, 30)] == ["orders.processed"]

    # A failed delivery comes back after its delay, and blocks newer events of its job.
    assert await store.retry_event(processed, 30, "webhook 500")
    assert not await store.retry_event(processed, 30, "stale token")
    clock.advance(29)
    assert await store.claim_events(10, 30) == []
    clock.advance(2)
    again = await store.claim_events(10, 30)
    assert [(e.id, e.attempts) for e in again][:1] == [(processed.id, 2)]


async def test_kill_during_wait_is_unavailable_then_recovers(
    open_store: OpenStore, admin: aioredis.Redis
) -> None:
    store = await open_store()
    waiting = asyncio.create_task(store.wait(["q"], 30))
    while True:
        blocked = [
            c
            for c in await admin.client_list()
            if c.get("name") == store.client_name + ":wait" and c.get("cmd") == "blpop"
        ]
        if blocked:
            break
        await asyncio.sleep(0)
    await admin.execute_command("CLIENT", "KILL", "ID", blocked[0]["id"])
    with pytest.raises(StoreUnavailable) as info:
        await asyncio.wait_for(waiting, 5)
    assert isinstance(info.value.__cause__, redis_errors.ConnectionError)
    await store.enqueue([NewJob("h", {}, queue="q")])
    assert await store.wait(["q"], 5) is True


async def test_upsert_replaces_waiting_jobs_but_not_running_ones(open_store: OpenStore) -> None:
    store = await open_store()
    first = await store.upsert(NewJob("h", {"v": 1}, key="k", meta={"a": 1}))
    assert first.created
    moved = await store.upsert(NewJob("h2", {"v": 2}, key="k", queue="other"))
    assert not moved.created
    assert moved.job.id == first.job.id
    assert (moved.job.payload, moved.job.handler, moved.job.queue) == ({"v": 2}, "h2", "other")
    assert moved.job.meta == {}
    assert moved.job.version == first.job.version + 1
    assert await store.counts() == {("other", Status.PENDING): 1}
    assert await store.claim(ClaimRequest(["default"], "w", 5, 30)) == []
    [running] = await store.claim(ClaimRequest(["other"], "w", 5, 30))
    kept = await store.upsert(NewJob("h", {"v": 3}, key="k"))
    assert not kept.created
    assert kept.job.payload == {"v": 2}
    assert kept.job.version == running.version


async def test_requeue_resets_and_list_jobs_pages_newest_first(open_store: OpenStore) -> None:
    store = await open_store()
    results = await store.enqueue([NewJob("h", {"i": i}, queue="q") for i in range(450)])
    ids = [r.job.id for r in results]
    for r in results[:5]:
        await store.act(ActionRequest(r.job.id, Action.CANCEL, "ops"))
    cancelled = await store.list_jobs(JobFilter(statuses=frozenset({Status.CANCELLED})))
    assert [j.id for j in cancelled] == ids[:5][::-1]
    page = await store.list_jobs(JobFilter(queue="q"), limit=300, after_id=ids[400])
    assert [j.id for j in page] == ids[100:400][::-1]
    waiting = await store.list_jobs(
        JobFilter(statuses=frozenset({Status.PENDING, Status.CANCELLED})), limit=1000
    )
    assert [j.id for j in waiting] == ids[::-1]

    requeued = await store.act(ActionRequest(ids[0], Action.REQUEUE, "ops", reset_attempts=True))
    assert requeued.status is Status.PENDING
    assert requeued.finished_at is None
    assert requeued.operator is None
    assert [(e.action, e.to_status) for e in await store.audit(ids[0])] == [
        ("cancel", "cancelled"),
        ("requeue", "pending"),
    ]


async def test_is_a_store_and_reloads_scripts_after_a_flush(
    open_store: OpenStore, admin: aioredis.Redis
) -> None:
    store = await open_store()
    assert isinstance(store, Store)
    await admin.script_flush()  # as after a server restart or failover: NOSCRIPT, then reload
    [result] = await store.enqueue([NewJob("h", {"after": "flush"})])
    assert result.created
    assert (await store.get(result.job.id)).payload == {"after": "flush"}


async def test_claim_drops_stale_due_entries(open_store: OpenStore, admin: aioredis.Redis) -> None:
    store = await open_store()
    [a, b] = await store.enqueue([NewJob("h", {}), NewJob("h", {})])
    root = "{" + store.prefix + "}"
    await admin.zadd(f"{root}:due:default", {f"{999_999:016d}": 0})  # an entry with no job
    claimed = await store.claim(ClaimRequest(["default"], "w", 1, 30))
    assert [j.id for j in claimed] == []  # the window held only the stale entry...
    assert await admin.zscore(f"{root}:due:default", f"{999_999:016d}") is None  # ...now gone
    claimed = await store.claim(ClaimRequest(["default"], "w", 5, 30))
    assert [j.id for j in claimed] == [a.job.id, b.job.id]


async def test_unicode_and_odd_keys_round_trip(open_store: OpenStore) -> None:
    store = await open_store()
    key = "user 42/ü*?[x]{y}"
    [r] = await store.enqueue(
        [NewJob("h", {"name": "Zoë ✓", "n": 2**60, "f": 0.1}, key=key, batch_id="b*")]
    )
    assert r.job.payload == {"name": "Zoë ✓", "n": 2**60, "f": 0.1}
    [job] = await store.claim(ClaimRequest(["default"], "w", 1, 30))
    message = 'échec: \u00e9\u4e2d😀 "quoted" \\ / \n'
    assert await store.complete(
        [
            Completion(
                job.id,
                job.lease_token or "",
                1,
                Outcome.DEAD_LETTER,
                error_type="Ärger",
                error_message=message,
                duration=0.123456789,
            )
        ]
    ) == [True]
    after = await store.get(job.id)
    assert after.last_error == message
    [attempt] = await store.attempts(job.id)
    assert (attempt.error_message, attempt.error_type) == (message, "Ärger")
    assert attempt.duration == 0.123456789
    assert (await store.get_by_key(key)) == after

    [r2] = await store.enqueue([NewJob("h", {})])
    [job2] = await store.claim(ClaimRequest(["default"], "w", 1, 30))
    lone = "bad \ud800 surrogate"  # e.g. from a mis-decoded exception message
    assert await store.complete(
        [Completion(job2.id, job2.lease_token or "", 1, Outcome.RETRY, error_message=lone)]
    ) == [True]
    assert (await store.get(r2.job.id)).last_error == "bad ? surrogate"
    assert [j.id for j in await store.list_jobs(JobFilter(key=key, batch_id="b*"))] == [job.id]


async def test_the_url_can_name_the_prefix(redis_url: str) -> None:
    prefix = unique_name("durably-test")
    store = RedisStore.from_url(f"{redis_url}?prefix={prefix}")
    assert store.prefix == prefix
    await store.open()
    try:
        [result] = await store.enqueue([NewJob("h", {"n": 1})])
        other = RedisStore(redis_url, prefix=prefix)
        await other.open()
        try:
            assert (await other.get(result.job.id)).payload == {"n": 1}
        finally:
            await other.close()
    finally:
        await store.drop_namespace()
        await store.close()


async def test_a_large_enqueue_returns_what_a_read_returns(open_store: OpenStore) -> None:
    """Large enqueues draft their results while the script runs and complete them from the
    reply: ids, times and the live jobs their keys found must still match what reads return."""
    store = await open_store()
    [held] = await store.enqueue([NewJob("h", {"old": True}, key="k-held")])
    policy = {"max_attempts": 3, "initial": 1.0, "jitter": "full", "fixed": None}
    nested = {"retry_on": ["ValueError"], "n": 1}
    jobs = []
    for i in range(3 * _DRAFT_SLICE + 7):
        payload = {"i": i, "text": 'Zoë ✓ 😀 \n\t"q"', "n": 2**60} if i % 3 else [i, None]
        jobs.append(
            NewJob(
                "h" if i % 2 else "other",
                payload,
                key=f"k-{i} ü/{{x}}" if i % 5 == 0 else None,
                policy=policy if i % 4 else nested,
                meta={"request": f"r{i}"} if i % 7 == 0 else {},
                delay=0.5 if i % 11 == 0 else 0.0,
                item_index=i if i % 13 == 0 else None,
                batch_id="b1" if i % 17 == 0 else None,
                # Taken as it is unless it could break the newline-joined payloads.
                payload_json=json.dumps(payload, indent=1) if i % 9 == 0 else None,
            )
        )
    jobs[100] = replace(jobs[100], key="k-held")
    jobs[200] = replace(jobs[200], key="k-0 ü/{x}")  # the first job's key, held by it by then
    results = await store.enqueue(jobs)
    assert [r.created for r in results].count(False) == 2
    assert not results[100].created
    assert results[100].job == held.job
    assert not results[200].created
    assert results[200].job.id == results[0].job.id
    created = [r.job for r in results if r.created]
    assert [j.id for j in created] == list(range(held.job.id + 1, held.job.id + 1 + len(created)))
    for result, job in zip(results, jobs, strict=True):
        assert result.job == await store.get(result.job.id)
        if result.created:
            assert (result.job.payload, result.job.key) == (
                json.loads(json.dumps(job.payload)),
                job.key,
            )
    # Every job has its own copy of its policy and meta, flat or nested.
    flat = [j for j in created if j.policy == policy]
    deep = [j for j in created if j.policy == nested]
    flat[0].policy["max_attempts"] = 99
    deep[0].policy["retry_on"].append("KeyError")
    flat[0].meta["x"] = 1
    assert flat[1].policy == policy
    assert deep[1].policy == nested
    assert flat[1].meta.get("x") is None


async def test_a_policy_changed_in_place_is_encoded_again(open_store: OpenStore) -> None:
    store = await open_store()
    policy: dict[str, Any] = {"max_attempts": 3, "initial": 1}
    [first] = await store.enqueue([NewJob("h", None, policy=policy)])
    policy["initial"] = 1.0  # equal, but it encodes differently
    [second] = await store.enqueue([NewJob("h", None, policy=policy)])
    policy["initial"] = 2
    [third] = await store.enqueue([NewJob("h", None, policy=policy)])
    got = [(await store.get(r.job.id)).policy["initial"] for r in (first, second, third)]
    assert [(v, type(v)) for v in got] == [(1, int), (1.0, float), (2, int)]


async def test_a_mixed_enqueue_indexes_every_created_job(
    open_store: OpenStore, admin: aioredis.Redis
) -> None:
    """Runs of one template broken up by keys and item indexes, two queues, a batch and a delay:
    every created job is in each index it belongs to, with the right score, and counted once."""
    store = await open_store()
    [held] = await store.enqueue([NewJob("h", None, key="held")])
    jobs = [
        NewJob(
            "h",
            {"i": i},
            queue="q2" if i % 3 == 0 else "q1",
            key=("held" if i == 4 else f"k{i}") if i % 4 == 0 else None,
            item_index=i if i % 5 == 0 else None,
            batch_id="b" if i % 2 else None,
            delay=5.0 if i % 7 == 0 else 0.0,
        )
        for i in range(300)
    ]
    results = await store.enqueue(jobs)
    assert [i for i, r in enumerate(results) if not r.created] == [4]
    created = [r.job for r in results if r.created] + [held.job]
    root = "{" + store.prefix + "}"

    async def index(name: str) -> dict[int, float]:
        pairs = await admin.zrange(f"{root}:{name}", 0, -1, withscores=True)
        assert all(member == f"{int(member):016d}" for member, _ in pairs)
        return {int(member): score for member, score in pairs}

    everyone = {j.id: float(j.id) for j in created}
    assert await index("all") == everyone
    assert await index("status:pending") == everyone
    for queue in ("q1", "q2"):
        assert await index(f"due:{queue}") == {
            j.id: float((j.run_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1))
            for j in created
            if j.queue == queue
        }
    assert await index("batch:b") == {j.id: float(j.id) for j in created if j.batch_id == "b"}
    assert await store.counts() == {
        (queue, Status.PENDING): sum(j.queue == queue for j in created)
        for queue in ("default", "q1", "q2")
    }
    assert await admin.hgetall(f"{root}:batchcounts:b") == {"pending": "150"}
    for j in created:
        if j.key is not None:
            assert await admin.zrange(f"{root}:key:{j.key}", 0, -1) == [f"{j.id:016d}"]
            assert await admin.hget(f"{root}:keys", j.key) == str(j.id)


async def _blocked(admin: aioredis.Redis, store: RedisStore) -> None:
    """Until the store's wait connection is blocked in BLPOP (no sleeping to find out)."""
    while not any(
        c.get("name") == store.client_name + ":wait" and c.get("cmd") == "blpop"
        for c in await admin.client_list()
    ):
        await asyncio.sleep(0)


async def test_wait_and_claim_claims_the_job_that_woke_it(
    open_store: OpenStore, admin: aioredis.Redis
) -> None:
    worker = await open_store()
    producer = await open_store(prefix=worker.prefix)
    assert isinstance(worker, ClaimsOnWake)
    request = ClaimRequest(["mail"], "w1", 5, 30)
    waiting = asyncio.create_task(worker.wait_and_claim(request, 30))
    await _blocked(admin, worker)
    [created] = await producer.enqueue([NewJob("send", {"to": "a"}, queue="mail")])
    [job] = await asyncio.wait_for(waiting, 5)
    assert job.id == created.job.id
    assert (job.status, job.worker_id, job.attempts) == (Status.RUNNING, "w1", 1)
    stored = await producer.get(job.id)
    assert (stored.status, stored.lease_token) == (Status.RUNNING, job.lease_token)
    assert [a.number for a in await producer.attempts(job.id)] == [1]
    # The lease it holds is a real one: its completion is accepted.
    done = Completion(job.id, job.lease_token or "", 1, Outcome.SUCCEEDED)
    assert await worker.complete([done]) == [True]


async def test_wait_and_claim_claims_after_a_timeout_too(open_store: OpenStore) -> None:
    store = await open_store()
    assert await store.wait_and_claim(ClaimRequest(["q"], "w", 5, 30), 0.01) == []
    [due] = await store.enqueue([NewJob("h", {}, queue="q")])
    # The enqueue left a wake token, so this wait may end at once; woken or timed out, the
    # claim behind it finds the due job.
    claimed = await store.wait_and_claim(ClaimRequest(["q"], "w", 5, 30), 0.01)
    assert [j.id for j in claimed] == [due.job.id]


async def test_interrupt_ends_a_wait_at_once_and_only_that_workers(
    open_store: OpenStore, admin: aioredis.Redis
) -> None:
    store = await open_store()
    mine = asyncio.create_task(store.wait_and_claim(ClaimRequest(["q"], "w-mine", 5, 30), 30))
    await _blocked(admin, store)
    await store.interrupt_wait("w-other")  # another worker's interruption waits for it
    await store.interrupt_wait("w-mine")
    assert await asyncio.wait_for(mine, 5) == []
    # The other worker's next wait ends at once; the key goes after a minute regardless.
    other = await asyncio.wait_for(
        store.wait_and_claim(ClaimRequest(["q"], "w-other", 5, 30), 30), 5
    )
    assert other == []
    assert await admin.ttl(store._interrupt_key("w-other")) == -2  # taken: gone


async def test_wait_and_claim_survives_a_script_flush(
    open_store: OpenStore, admin: aioredis.Redis
) -> None:
    store = await open_store()
    [job] = await store.enqueue([NewJob("h", {})])
    await admin.script_flush()
    claimed = await store.wait_and_claim(ClaimRequest(["default"], "w", 5, 30), 0.01)
    assert [j.id for j in claimed] == [job.job.id]


async def test_an_idle_worker_claims_on_wake_and_stops_at_once(
    redis_url: str, admin: aioredis.Redis
) -> None:
    """The worker's idle wait carries its claim; a stop interrupts it instead of waiting 30 s."""
    app = Durably(redis_url, prefix=unique_name("durably-test"))
    ran = asyncio.Event()

    async def hello(payload: Any, context: JobContext) -> str:
        ran.set()
        return "hi"

    app.register("hello", hello)
    store = await app.store_async()
    assert isinstance(store, RedisStore)
    worker = Worker(app, concurrency=2, poll_interval=30.0)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(_blocked(admin, store), 10)
        job = await app.enqueue_async("hello")
        await asyncio.wait_for(ran.wait(), 5)
        await asyncio.wait_for(_blocked(admin, store), 10)  # idle again
        # The claim is already on the server, queued behind the blocked BLPOP.
        [waiting] = [
            c for c in await admin.client_list() if c.get("name") == store.client_name + ":wait"
        ]
        assert int(waiting["qbuf"]) > 0
        worker.stop()
        # Interrupted, not waited out: without the interruption this stop gives up on the
        # wait's reply only after 5 s (and the poll interval is 30 s).
        await asyncio.wait_for(running, 3)
        assert (await app.get_async(job.id)).status == Status.SUCCEEDED
        assert worker.stats["claimed"] == 1
    finally:
        if not running.done():
            running.cancel()
        await store.drop_namespace()
        await app.close_async()


async def test_wait_and_claim_without_a_timeout_claims_at_once(open_store: OpenStore) -> None:
    store = await open_store()
    [job] = await store.enqueue([NewJob("h", {})])
    claimed = await asyncio.wait_for(
        store.wait_and_claim(ClaimRequest(["default"], "w", 5, 30), 0), 5
    )
    assert [j.id for j in claimed] == [job.job.id]
    no_room = store.wait_and_claim(ClaimRequest(["default"], "w", 0, 30), 30)
    assert await asyncio.wait_for(no_room, 5) == []  # nothing to claim: no wait either
