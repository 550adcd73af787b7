"""get, get_by_key, list_jobs, attempts and counts."""

from __future__ import annotations

import pytest

from durably.errors import JobNotFound
from durably.job import Job, JobFilter, NewJob, Outcome, Status
from durably.store import Store
from durably.testing import FakeClock

from .conftest import claim_one, enqueue_one, finish, reach


async def test_get_unknown(store: Store) -> None:
    with pytest.raises(JobNotFound) as info:
        await store.get(31_337)
    assert info.value.job_id == 31_337


async def test_get_by_key(store: Store) -> None:
    assert await store.get_by_key("nope") is None
    first = await reach(store, Status.SUCCEEDED, key="k")
    assert await store.get_by_key("k") == first
    second = await reach(store, Status.DEAD_LETTER, key="k")
    assert await store.get_by_key("k") == second  # newest that had it
    live = await reach(store, Status.PENDING, key="k")
    assert await store.get_by_key("k") == live
    assert (await store.get_by_key("k")) != await store.get_by_key("other")


async def _fixture_jobs(store: Store) -> dict[str, Job]:
    """A spread of jobs across queues, handlers, batches, keys, statuses and classifications."""
    jobs = {
        "a_pending": await enqueue_one(store, handler="h1", queue="a", key="k1", batch_id="b1"),
        "b_pending": await enqueue_one(store, handler="h2", queue="b", batch_id="b1"),
        "a_future": await enqueue_one(store, handler="h2", queue="a", delay=999, batch_id="b2"),
    }
    jobs["c_dead"] = await reach(store, Status.DEAD_LETTER, queue="c", handler="h1")
    jobs["c_retry"] = await reach(store, Status.RETRYING, queue="c", handler="h2", key="k2")
    jobs["c_done"] = await reach(store, Status.SUCCEEDED, queue="c", handler="h1")
    return {name: await store.get(job.id) for name, job in jobs.items()}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (JobFilter(), {"a_pending", "b_pending", "a_future", "c_dead", "c_retry", "c_done"}),
        (JobFilter(statuses=frozenset({Status.PENDING})), {"a_pending", "b_pending", "a_future"}),
        (
            JobFilter(statuses=frozenset({Status.DEAD_LETTER, Status.SUCCEEDED})),
            {"c_dead", "c_done"},
        ),
        (JobFilter(statuses=frozenset({Status.CANCELLED})), set()),
        (JobFilter(queue="a"), {"a_pending", "a_future"}),
        (JobFilter(handler="h1"), {"a_pending", "c_dead", "c_done"}),
        (JobFilter(batch_id="b1"), {"a_pending", "b_pending"}),
        (JobFilter(classification="permanent"), {"c_dead"}),
        (JobFilter(classification="transient"), {"c_retry"}),
        (JobFilter(key="k2"), {"c_retry"}),
        (JobFilter(key="missing"), set()),
        (JobFilter(queue="c", handler="h1"), {"c_dead", "c_done"}),
        (
            JobFilter(queue="c", handler="h1", statuses=frozenset({Status.SUCCEEDED})),
            {"c_done"},
        ),
        (JobFilter(queue="a", batch_id="b1"), {"a_pending"}),
    ],
)
async def test_list_jobs_filters(store: Store, where: JobFilter, expected: set[str]) -> None:
    jobs = await _fixture_jobs(store)
    got = await store.list_jobs(where)
    assert [j.id for j in got] == sorted((jobs[n].id for n in expected), reverse=True)
    by_id = {j.id: j for j in jobs.values()}
    assert all(j == by_id[j.id] for j in got)


async def test_list_jobs_newest_first_with_limit_and_keyset(store: Store) -> None:
    ids = [(await enqueue_one(store, payload={"i": i})).id for i in range(7)]
    newest_first = sorted(ids, reverse=True)
    assert [j.id for j in await store.list_jobs(JobFilter())] == newest_first
    assert [j.id for j in await store.list_jobs(JobFilter(), limit=3)] == newest_first[:3]
    pages: list[int] = []
    after: int | None = None
    while True:
        page = await store.list_jobs(JobFilter(), limit=3, after_id=after)
        if not page:
            break
        assert len(page) <= 3
        pages.extend(j.id for j in page)
        after = page[-1].id
    assert pages == newest_first
    assert [j.id for j in await store.list_jobs(JobFilter(), after_id=ids[3])] == sorted(
        ids[:3], reverse=True
    )


async def test_attempts_oldest_first(store: Store, clock: FakeClock) -> None:
    job = await reach(store, Status.RUNNING)
    for n in range(2):
        running = job if n == 0 else await claim_one(store, worker=f"w{n}")
        assert await finish(store, running, Outcome.RETRY, retry_in=1, error_message=f"e{n}")
        clock.advance(1)
    last = await claim_one(store, worker="w9")
    assert await finish(store, last, Outcome.SUCCEEDED)
    attempts = await store.attempts(job.id)
    assert [a.number for a in attempts] == [1, 2, 3]
    assert [a.error_message for a in attempts] == ["e0", "e1", None]
    assert [a.outcome for a in attempts] == ["failed", "failed", "succeeded"]
    assert attempts[0].started_at < attempts[1].started_at < attempts[2].started_at
    assert all(a.job_id == job.id for a in attempts)


async def test_attempts_and_audit_of_fresh_job_are_empty(store: Store) -> None:
    job = await enqueue_one(store)
    assert await store.attempts(job.id) == []
    assert await store.audit(job.id) == []


async def test_counts(store: Store) -> None:
    assert {k: v for k, v in (await store.counts()).items() if v} == {}
    await _fixture_jobs(store)
    await enqueue_one(store, queue="a")
    counts = {k: v for k, v in (await store.counts()).items() if v}
    assert counts == {
        ("a", Status.PENDING): 3,
        ("b", Status.PENDING): 1,
        ("c", Status.DEAD_LETTER): 1,
        ("c", Status.RETRYING): 1,
        ("c", Status.SUCCEEDED): 1,
    }
    assert all(isinstance(status, Status) for _, status in counts)


async def test_list_jobs_default_limit_is_100(store: Store) -> None:
    await store.enqueue([NewJob(handler="h", payload={"i": i}) for i in range(105)])
    got = await store.list_jobs(JobFilter())
    assert len(got) == 100
    assert got[0].payload == {"i": 104}
