"""PostgreSQL-specific behaviour: migrations, transactional enqueue, LISTEN/NOTIFY wake-ups,
recovery from killed connections, bulk enqueue and SKIP LOCKED claims. The behaviour every
store shares is in ``tests/contract``."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import psycopg.types.json
import pytest

from conftest import unique_name
from durably.errors import ConfigError, PayloadError, SchemaTooNew, StoreUnavailable
from durably.job import Completion, JobFilter, NewJob, Outcome, Status
from durably.store import from_url
from durably.store.base import ClaimRequest
from durably.store.postgres import PostgresStore, _job_rows
from durably.store.sqlfiles import load_migrations

pytestmark = pytest.mark.postgres

MIGRATIONS = load_migrations("postgres")

StoreFactory = Callable[..., PostgresStore]


@pytest.fixture
def schema() -> str:
    return unique_name("durably_it")


@pytest.fixture
async def make(pg_url: str, schema: str) -> AsyncIterator[StoreFactory]:
    """Build stores on one fresh schema (each with its own application_name); all are closed
    and the schema dropped at the end."""
    made: list[PostgresStore] = []

    def build(**options: Any) -> PostgresStore:
        options.setdefault("schema", schema)
        options.setdefault("application_name", unique_name("durably_it_app"))
        store = PostgresStore(pg_url, **options)
        made.append(store)
        return store

    yield build
    for store in made:
        await store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                psycopg.sql.Identifier(schema)
            )
        )


@pytest.fixture
async def store(make: StoreFactory) -> PostgresStore:
    st = make()
    await st.open()
    return st


def jobs(n: int, **kw: Any) -> list[NewJob]:
    return [NewJob(handler="h", payload={"n": i}, **kw) for i in range(n)]


# -- construction -------------------------------------------------------------------------


def test_from_url_picks_postgres_masks_password_and_reads_schema() -> None:
    store = from_url("postgresql://app:s3cret@db.example/jobs?schema=billing&sslmode=disable")
    assert isinstance(store, PostgresStore)
    assert store.schema == "billing"
    assert "s3cret" not in store.url
    assert "***" in store.url


@pytest.mark.parametrize("bad", ["", "Upper", "1abc", "a-b", "x" * 64, 'a"; drop'])
def test_bad_schema_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="schema"):
        PostgresStore("postgresql://root@127.0.0.1/test", schema=bad)


async def test_unreachable_server_is_store_unavailable_without_the_password() -> None:
    store = PostgresStore(
        "postgresql://root:hunter2@127.0.0.1:1/test", schema="unused", connect_timeout=1
    )
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is not None
    await store.close()


# -- migrations ---------------------------------------------------------------------------


async def test_migrations_are_applied_once_and_recorded(
    make: StoreFactory, pg_url: str, schema: str
) -> None:
    first = make()
    await first.open()
    assert await first.schema_version() == len(MIGRATIONS)
    assert await first.migrate() == []
    second = make()
    await second.open()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            psycopg.sql.SQL(
                "SELECT version, name FROM {}.durably_migrations ORDER BY version"
            ).format(psycopg.sql.Identifier(schema))
        ).fetchall()
    assert rows == [(m.version, m.name) for m in MIGRATIONS]


async def test_a_version_3_schema_keeps_its_jobs_policies_through_migration_4(
    make: StoreFactory, pg_url: str, schema: str
) -> None:
    # 004 turns the policy column from jsonb into json: a job stored before reads the same.
    policy = {"max_attempts": 3, "initial": 0.5, "jitter": "full", "budget": None}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        name = psycopg.sql.Identifier(schema)
        conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(name))
        conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(name))
        conn.execute(
            "CREATE TABLE durably_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL)"
        )
        for migration in MIGRATIONS[:3]:
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO durably_migrations VALUES (%s, %s, now())",
                (migration.version, migration.name),
            )
        conn.execute(
            "INSERT INTO jobs (queue, handler, payload, policy, run_at, created_at, updated_at)"
            " VALUES ('default', 'h', '{}', %s, now(), now(), now())",
            (psycopg.types.json.Jsonb(policy),),
        )
    store = make()
    await store.open()
    assert await store.schema_version() == len(MIGRATIONS)
    [job] = await store.list_jobs(JobFilter(), limit=10)
    assert job.policy == policy


async def test_concurrent_open_of_four_stores_is_safe(make: StoreFactory) -> None:
    stores = [make() for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    assert [await s.schema_version() for s in stores] == [len(MIGRATIONS)] * 4
    [res] = await stores[3].enqueue(jobs(1))
    assert (await stores[0].get(res.job.id)).id == res.job.id


async def test_a_newer_schema_is_refused(make: StoreFactory, pg_url: str, schema: str) -> None:
    await make().open()
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            psycopg.sql.SQL(
                "INSERT INTO {}.durably_migrations (version, name, applied_at) "
                "VALUES (%s, 'from_the_future', now())"
            ).format(psycopg.sql.Identifier(schema)),
            (len(MIGRATIONS) + 1,),
        )
    with pytest.raises(SchemaTooNew, match="upgrade durably"):
        await make().open()
    with pytest.raises(SchemaTooNew):
        await make(migrate_on_open=False).open()


async def test_dry_run_lists_pending_migrations_without_applying(
    make: StoreFactory, pg_url: str, schema: str
) -> None:
    store = make(migrate_on_open=False)
    await store.open()
    names = [f"{m.version:03d}_{m.name}" for m in MIGRATIONS]
    assert await store.migrate(dry_run=True) == names
    assert await store.schema_version() == 0
    with psycopg.connect(pg_url) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
    assert found == (0,)
    assert await store.migrate() == names
    assert await store.migrate(dry_run=True) == []
    assert await store.schema_version() == len(MIGRATIONS)


EXPECTED_COLUMNS = {
    "jobs": [
        ("id", "bigint", "NO"),
        ("queue", "text", "NO"),
        ("handler", "text", "NO"),
        ("payload", "jsonb", "NO"),
        ("status", "text", "NO"),
        ("attempts", "integer", "NO"),
        ("max_attempts", "integer", "YES"),
        ("policy", "json", "NO"),
        ("run_at", "timestamp with time zone", "NO"),
        ("version", "bigint", "NO"),
        ("created_at", "timestamp with time zone", "NO"),
        ("updated_at", "timestamp with time zone", "NO"),
        ("key", "text", "YES"),
        ("timeout", "double precision", "YES"),
        ("batch_id", "text", "YES"),
        ("item_index", "integer", "YES"),
        ("event_scope", "text", "YES"),
        ("meta", "jsonb", "NO"),
        ("worker_id", "text", "YES"),
        ("lease_token", "text", "YES"),
        ("lease_expires_at", "timestamp with time zone", "YES"),
        ("cancel_requested", "boolean", "NO"),
        ("first_attempt_at", "timestamp with time zone", "YES"),
        ("finished_at", "timestamp with time zone", "YES"),
        ("classification", "text", "YES"),
        ("last_error", "text", "YES"),
        ("last_error_type", "text", "YES"),
        ("result", "jsonb", "YES"),
        ("operator", "text", "YES"),
        ("operator_notes", "text", "YES"),
        ("last_attempt", "integer", "NO"),
    ],
    "attempts": [
        ("job_id", "bigint", "NO"),
        ("number", "integer", "NO"),
        ("worker_id", "text", "NO"),
        ("started_at", "timestamp with time zone", "NO"),
        ("finished_at", "timestamp with time zone", "YES"),
        ("outcome", "text", "YES"),
        ("classification", "text", "YES"),
        ("error_type", "text", "YES"),
        ("error_message", "text", "YES"),
        ("duration", "double precision", "YES"),
    ],
    "audit": [
        ("id", "bigint", "NO"),
        ("job_id", "bigint", "NO"),
        ("at", "timestamp with time zone", "NO"),
        ("actor", "text", "NO"),
        ("action", "text", "NO"),
        ("from_status", "text", "NO"),
        ("to_status", "text", "NO"),
        ("version", "bigint", "NO"),
        ("notes", "text", "YES"),
    ],
    "events": [
        ("id", "bigint", "NO"),
        ("job_id", "bigint", "YES"),
        ("type", "text", "NO"),
        ("payload", "json", "NO"),
        ("created_at", "timestamp with time zone", "NO"),
        ("next_attempt_at", "timestamp with time zone", "NO"),
        ("attempts", "integer", "NO"),
        ("lease_token", "text", "YES"),
        ("lease_expires_at", "timestamp with time zone", "YES"),
        ("last_error", "text", "YES"),
    ],
    "durably_migrations": [
        ("version", "integer", "NO"),
        ("name", "text", "NO"),
        ("applied_at", "timestamp with time zone", "NO"),
    ],
}

EXPECTED_INDEXES = {
    "attempts_pkey",
    "audit_job",
    "audit_pkey",
    "durably_migrations_pkey",
    "events_due",
    "events_job",
    "events_pkey",
    "jobs_batch",
    "jobs_finished",
    "jobs_key",
    "jobs_leases",
    "jobs_live_key",
    "jobs_pkey",
    "jobs_status",
    "jobs_waiting",
}


async def test_migrated_schema_matches_the_expected_listing(
    store: PostgresStore, pg_url: str, schema: str
) -> None:
    with psycopg.connect(pg_url) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable"
            "  FROM information_schema.columns WHERE table_schema = %s"
            " ORDER BY table_name, ordinal_position",
            (schema,),
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s", (schema,)
        ).fetchall()
    actual: dict[str, list[tuple[str, str, str]]] = {}
    for table, column, data_type, nullable in columns:
        actual.setdefault(table, []).append((column, data_type, nullable))
    assert actual == EXPECTED_COLUMNS
    assert {name for name, _ in indexes} == EXPECTED_INDEXES
    definitions: dict[str, str] = dict(indexes)
    # The claim and the rescuer read partial indexes that finished jobs never enter.
    assert (
        "WHERE (status = ANY (ARRAY['pending'::text, 'retrying'::text]))"
        in (definitions["jobs_waiting"])
    )
    assert "WHERE (status = 'running'::text)" in definitions["jobs_leases"]
    assert definitions["jobs_live_key"].startswith("CREATE UNIQUE INDEX")


# -- transactional enqueue ----------------------------------------------------------------


@pytest.mark.parametrize("commit", [True, False])
async def test_enqueue_with_a_sync_connection_follows_the_callers_transaction(
    store: PostgresStore, pg_url: str, commit: bool
) -> None:
    key = f"order-{secrets.token_hex(4)}"
    # The caller's connection has the default search_path, not the store's schema.
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TEMP TABLE orders (id int)")
        conn.execute("INSERT INTO orders VALUES (42)")
        [res] = store.enqueue_with(conn, [NewJob("send_receipt", {"order": 42}, key=key)])
        assert res.created
        assert await store.get_by_key(key) is None  # not visible before the caller commits
        if commit:
            conn.commit()
        else:
            conn.rollback()
    found = await store.get_by_key(key)
    if commit:
        assert found is not None
        assert found.id == res.job.id
        assert found.payload == {"order": 42}
    else:
        assert found is None
        assert await store.counts() == {}


@pytest.mark.parametrize("commit", [True, False])
async def test_enqueue_with_an_async_connection_follows_the_callers_transaction(
    store: PostgresStore, pg_url: str, commit: bool
) -> None:
    key = f"order-{secrets.token_hex(4)}"
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        results = await store.enqueue_with_async(
            conn, [NewJob("a", {}, key=key), NewJob("b", {}, key=key)]
        )
        assert [r.created for r in results] == [True, False]
        assert results[1].job.id == results[0].job.id
        if commit:
            await conn.commit()
        else:
            await conn.rollback()
    found = await store.get_by_key(key)
    assert (found is not None) is commit


async def test_transactional_enqueue_wakes_workers_only_on_commit(
    make: StoreFactory, pg_url: str
) -> None:
    waiter, producer = make(), make()
    await waiter.open()
    await producer.open()
    assert await waiter.start_listening()
    with psycopg.connect(pg_url) as conn:
        task = asyncio.create_task(waiter.wait(["default"], timeout=0.5))
        await asyncio.sleep(0)
        producer.enqueue_with(conn, jobs(1))
        conn.rollback()
        assert await task is False  # a rolled-back enqueue notifies nobody
        task = asyncio.create_task(waiter.wait(["default"], timeout=30))
        await asyncio.sleep(0)
        producer.enqueue_with(conn, jobs(1))
        conn.commit()
        assert await task is True


async def test_enqueue_with_refuses_the_wrong_kind_of_connection(
    store: PostgresStore, pg_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        with pytest.raises(ConfigError, match="enqueue_with_async"):
            store.enqueue_with(conn, jobs(1))  # type: ignore[arg-type]


# -- wake-ups -----------------------------------------------------------------------------


async def test_wait_is_woken_by_an_enqueue_from_another_store(make: StoreFactory) -> None:
    waiter, producer = make(), make()
    await waiter.open()
    await producer.open()
    assert await waiter.start_listening()
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(waiter.wait(["default"], timeout=30))
    await asyncio.sleep(0)  # let the task register its waiter (the listener is already up)
    await producer.enqueue(jobs(1))
    assert await task is True
    assert loop.time() - started < 10  # well before the 30 s timeout


async def test_wait_ignores_other_queues_and_times_out(make: StoreFactory) -> None:
    waiter, producer = make(), make()
    await waiter.open()
    await producer.open()
    assert await waiter.start_listening()
    task = asyncio.create_task(waiter.wait(["emails"], timeout=0.3))
    await asyncio.sleep(0)
    await producer.enqueue(jobs(1, queue="reports"))
    assert await task is False


async def test_a_retry_and_a_requeue_notify_too(make: StoreFactory) -> None:
    waiter, worker = make(), make()
    await waiter.open()
    await worker.open()
    assert await waiter.start_listening()
    await worker.enqueue(jobs(1))
    [job] = await worker.claim(ClaimRequest(["default"], "w", 1, 30))
    assert job.lease_token is not None
    task = asyncio.create_task(waiter.wait(["default"], timeout=30))
    await asyncio.sleep(0)
    assert await worker.complete(
        [Completion(job.id, job.lease_token, 1, Outcome.RETRY, retry_in=0.0)]
    ) == [True]
    assert await task is True


# -- resilience ---------------------------------------------------------------------------


def terminate_sessions(pg_url: str, application_name: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = 'test' AND pid <> pg_backend_pid() AND application_name = %s",
            (application_name,),
        ).fetchall()
    return len(rows)


async def test_the_store_recovers_after_its_connections_are_killed(
    make: StoreFactory, pg_url: str
) -> None:
    store = make(min_size=2, max_size=4)
    await store.open()
    assert await store.start_listening()
    await store.enqueue(jobs(3))
    assert terminate_sessions(pg_url, store.application_name) >= 2  # pool + listener

    outcomes: list[str] = []
    for _ in range(5):
        try:
            counts = await store.counts()
        except StoreUnavailable:
            outcomes.append("unavailable")
            continue
        outcomes.append("ok")
        break
    assert outcomes[-1] == "ok", outcomes
    assert counts == {("default", Status.PENDING): 3}
    # Later calls work without further errors.
    assert len(await store.claim(ClaimRequest(["default"], "w", 10, 30))) == 3
    assert len(await store.enqueue(jobs(2))) == 2

    # The listener reconnects: a wait is woken (a reconnect wakes waiters, or the NOTIFY does).
    producer = make()
    await producer.open()
    task = asyncio.create_task(store.wait(["default"], timeout=30))
    await asyncio.sleep(0)
    await producer.enqueue(jobs(1))
    assert await task is True


# -- bulk and concurrency -----------------------------------------------------------------


async def test_enqueue_of_a_thousand_jobs_in_one_call_keeps_input_order(
    store: PostgresStore,
) -> None:
    results = await store.enqueue(jobs(1000))
    assert [r.job.payload for r in results] == [{"n": i} for i in range(1000)]
    assert all(r.created for r in results)
    ids = [r.job.id for r in results]
    assert ids == sorted(ids)  # ids follow input order, so claims do too
    assert await store.counts() == {("default", Status.PENDING): 1000}
    claimed = await store.claim(ClaimRequest(["default"], "w", 5, 30))
    assert [j.payload["n"] for j in claimed] == [0, 1, 2, 3, 4]


async def test_idempotent_keys_in_one_batch_and_across_calls(store: PostgresStore) -> None:
    [held] = await store.enqueue([NewJob("h", {"first": True}, key="k0")])
    batch = [
        NewJob("h", {"i": 0}, key="k1"),
        NewJob("h", {"i": 1}, key="k2"),
        NewJob("h", {"i": 2}, key="k1"),
        NewJob("h", {"i": 3}),
        NewJob("h", {"i": 4}, key="k0"),
        NewJob("h", {"i": 5}, key="k2"),
    ]
    results = await store.enqueue(batch)
    assert [r.created for r in results] == [True, True, False, True, False, False]
    assert results[2].job.id == results[0].job.id
    assert results[2].job.payload == {"i": 0}
    assert results[4].job.id == held.job.id
    assert results[4].job.payload == {"first": True}
    assert results[5].job.id == results[1].job.id
    assert sum((await store.counts()).values()) == 4


async def test_concurrent_producers_of_one_key_create_one_job(make: StoreFactory) -> None:
    stores = [make() for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    results = await asyncio.gather(
        *(s.enqueue([NewJob("h", {"by": i}, key="same")]) for i, s in enumerate(stores))
    )
    flat = [r for rs in results for r in rs]
    assert sum(r.created for r in flat) == 1
    assert len({r.job.id for r in flat}) == 1


async def test_four_concurrent_claimers_never_share_a_job(make: StoreFactory) -> None:
    claimers = [make(max_size=2) for _ in range(4)]
    await asyncio.gather(*(c.open() for c in claimers))
    await claimers[0].enqueue(jobs(400))

    async def drain(store: PostgresStore, worker: str) -> list[int]:
        got: list[int] = []
        while batch := await store.claim(ClaimRequest(["default"], worker, 7, 30)):
            got.extend(j.id for j in batch)
        return got

    taken = await asyncio.gather(*(drain(c, f"w{i}") for i, c in enumerate(claimers)))
    every = [i for ids in taken for i in ids]
    assert len(every) == 400
    assert len(set(every)) == 400
    assert sum(1 for ids in taken if ids) >= 2  # really concurrent, not one claimer draining
    attempts = await claimers[1].attempts(every[0])
    assert [a.number for a in attempts] == [1]


async def test_batch_completed_is_written_once_by_concurrent_completers(
    make: StoreFactory, pg_url: str, schema: str
) -> None:
    completers = [make() for _ in range(4)]
    await asyncio.gather(*(c.open() for c in completers))
    for round_ in range(5):
        batch = f"b{round_}"
        await completers[0].enqueue(
            [NewJob("h", {}, batch_id=batch, item_index=i, event_scope="s") for i in range(4)]
        )
        running = await completers[0].claim(ClaimRequest(["default"], "w", 4, 30, batch_id=batch))
        assert len(running) == 4
        await asyncio.gather(
            *(
                c.complete([Completion(j.id, j.lease_token or "", 1, Outcome.SUCCEEDED)])
                for c, j in zip(completers, running, strict=True)
            )
        )
    with psycopg.connect(pg_url) as conn:
        counts = conn.execute(
            psycopg.sql.SQL(
                "SELECT type, count(*) FROM {}.events GROUP BY type ORDER BY type"
            ).format(psycopg.sql.Identifier(schema))
        ).fetchall()
    assert counts == [("s.batch_completed", 5), ("s.processed", 20)]


async def test_a_claim_over_several_queues_takes_the_oldest_first_once_each(
    store: PostgresStore,
) -> None:
    made = await store.enqueue(
        [NewJob("h", {"i": i}, queue=q) for i, q in enumerate(["a", "b", "a", "b", "c"])]
    )
    claimed = await store.claim(ClaimRequest(["b", "a", "b"], "w", 3, 30))
    assert [j.id for j in claimed] == [r.job.id for r in made[:3]]
    rest = await store.claim(ClaimRequest(["a", "b", "a"], "w", 10, 30))
    assert [j.id for j in rest] == [made[3].job.id]


# -- hot paths ------------------------------------------------------------------------------


async def test_bulk_enqueue_returns_exactly_what_get_reads(store: PostgresStore) -> None:
    # Over the COPY threshold, with several shapes: the jobs are built from templates, not read
    # back, so each must still equal the stored row, with its own policy and meta objects.
    shared = {"initial": 1.0, "jitter": "full"}
    batch = [
        NewJob(
            "h" if i % 3 else "g",
            {"i": i, "x": [i, 1.5]},
            queue="a" if i % 2 else "b",
            max_attempts=None if i % 4 else 3,
            policy=shared if i % 5 else {"cap": 60},
            delay=0.0 if i % 7 else 1.25,
            timeout=None if i % 6 else 2.5,
            batch_id=None if i % 3 else "b1",
            item_index=None if i % 3 else i,
            event_scope=None if i % 8 else "s",
            meta={} if i % 2 else {"trace": {"id": i}},
        )
        for i in range(64)
    ]
    results = await store.enqueue(batch)
    for result in results:
        assert result.created
        assert result.job == await store.get(result.job.id)
    first, second = results[1].job, results[2].job
    assert first.policy == second.policy
    assert first.policy is not second.policy  # unshared: one job's copy is its own


async def _stored(store: PostgresStore) -> list[tuple[int, Any]]:
    async with store._connection("test") as conn:
        cur = await conn.execute("SELECT id, payload FROM jobs ORDER BY id")
        return [(row["id"], row["payload"]) for row in await cur.fetchall()]


async def test_a_bulk_enqueue_found_uncopyable_mid_stream_is_stored_once_by_sql(
    store: PostgresStore,
) -> None:
    # Slices are sent as they are encoded: a payload in the third slice that only the SQL path
    # stores faithfully (jsonb reads 1e+23 back as an integer) abandons the COPY already under
    # way. Its rows are rolled back and every job is stored once, in order, as get reads it.
    payloads: list[Any] = [{"i": i} for i in range(2_500)]
    payloads[2_100] = {"big": 1e23}
    results = await store.enqueue([NewJob("h", p) for p in payloads])
    assert await _stored(store) == [(r.job.id, r.job.payload) for r in results]
    assert [r.job.payload for r in results[:2_100]] == payloads[:2_100]
    assert results[2_100].job.payload == {"big": 10**23}  # read back from the row
    assert results[2_100].job == await store.get(results[2_100].job.id)


async def test_a_payload_error_mid_stream_stores_nothing(store: PostgresStore) -> None:
    payloads: list[Any] = [{"i": i} for i in range(2_500)]
    payloads[1_700] = {"not json": {1, 2}}
    with pytest.raises(PayloadError, match="job #1700"):
        await store.enqueue([NewJob("h", p) for p in payloads])
    assert await _stored(store) == []
    # The store is still usable, and a later batch is streamed whole.
    results = await store.enqueue([NewJob("h", {"i": i}) for i in range(2_500)])
    assert [job_id for job_id, _ in await _stored(store)] == [r.job.id for r in results]


async def test_jobs_are_read_whatever_the_column_list(store: PostgresStore) -> None:
    claim = ClaimRequest(["default"], "w", 10, 30)
    for i in range(12):  # enough for the statements to be prepared and their readers cached
        await store.enqueue([NewJob("h", {"i": i})])
        assert len(await store.claim(claim)) == 1
    async with store._connection("test") as conn:
        await conn.execute("ALTER TABLE jobs ADD COLUMN extra text DEFAULT 'x'")
    [made] = await store.enqueue([NewJob("h", {"i": 99}, meta={"m": 1})])
    [claimed] = await store.claim(claim)
    assert claimed.id == made.job.id
    assert (claimed.payload, claimed.meta, claimed.status) == ({"i": 99}, {"m": 1}, Status.RUNNING)
    assert claimed == await store.get(made.job.id)
    # Columns in another order are read by name, not by position.
    async with store._connection("test") as conn:
        names = [c.name for c in (await conn.execute("SELECT * FROM jobs LIMIT 0")).description]
        reordered = psycopg.sql.SQL("SELECT {} FROM jobs WHERE id = %s").format(
            psycopg.sql.SQL(", ").join(psycopg.sql.Identifier(n) for n in reversed(names))
        )
        cur = conn.cursor(row_factory=_job_rows)
        await cur.execute(reordered, [made.job.id])
        assert await cur.fetchall() == [claimed]


async def test_claim_and_schedule_reads_settle_on_one_generic_plan(make: StoreFactory) -> None:
    # Planning these costs more than running them: their estimates must not depend on the
    # parameters, so the server keeps one generic plan after its first five custom ones.
    store = make(min_size=1, max_size=1)
    await store.open()
    await store.enqueue(jobs(40))
    for limit in [1, 2, 3, 1, 5, 1, 2, 1, 4, 1, 3, 1, 2, 1, 1]:
        assert len(await store.claim(ClaimRequest(["default", "other"], "w", limit, 30))) == limit
        assert await store.next_due_in(["default", "other"]) == 0.0
    async with store._connection("test") as conn:
        cur = await conn.execute(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
        )
        plans = {
            ("claim" if "SKIP LOCKED" in row["statement"] else "next_due"): (
                row["generic_plans"],
                row["custom_plans"],
            )
            for row in await cur.fetchall()
            if "SKIP LOCKED" in row["statement"] or "min(n.run_at)" in row["statement"]
        }
    # psycopg prepares next_due from its sixth run; the claim from its first.
    assert plans == {"claim": (10, 5), "next_due": (5, 5)}


@pytest.mark.parametrize("kind", ["pool", "sync", "async"])
async def test_a_single_enqueue_of_a_held_key_returns_the_holder(
    store: PostgresStore, pg_url: str, kind: str
) -> None:
    [held] = await store.enqueue([NewJob("h", {"first": True}, key="k")])
    again = [NewJob("h", {"second": True}, key="k")]
    if kind == "pool":
        [result] = await store.enqueue(again)
    elif kind == "sync":
        with psycopg.connect(pg_url) as conn:
            [result] = store.enqueue_with(conn, again)
    else:
        async with await psycopg.AsyncConnection.connect(pg_url) as aconn:
            [result] = await store.enqueue_with_async(aconn, again)
    assert not result.created
    assert result.job == held.job == await store.get(held.job.id)


async def test_a_bulk_enqueue_that_cannot_be_copied_falls_back_whole(
    store: PostgresStore,
) -> None:
    # A value only the SQL path stores faithfully, found late in the batch, sends the whole
    # batch down the SQL path, in input order.
    batch = [*jobs(40), NewJob("h", {"big": 1e23})]
    results = await store.enqueue(batch)
    assert [r.job.payload for r in results[:40]] == [{"n": i} for i in range(40)]
    assert all(r.created for r in results)
    for result in results:
        assert result.job == await store.get(result.job.id)
    assert await store.counts() == {("default", Status.PENDING): 41}


async def test_a_bulk_enqueue_of_a_bad_payload_leaves_the_store_usable(
    make: StoreFactory,
) -> None:
    store = make(min_size=1, max_size=1)  # the same connection must serve the next call
    await store.open()
    with pytest.raises(PayloadError):
        await store.enqueue([*jobs(40), NewJob("h", {"not json": {1, 2}})])
    assert await store.counts() == {}
    assert len(await store.enqueue(jobs(40))) == 40
    assert await store.counts() == {("default", Status.PENDING): 40}
