"""The SQLite store's fast paths: jobs built from what was written, shared insert parameters,
the wake-up channel's cached listing, and the store's own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from durably.errors import JobNotFound, StoreError
from durably.job import Job, NewJob, Status
from durably.store.sqlite import SQLiteStore, _build, _Listener, _Targets, _wake_processes

POLICY = {"max_attempts": 3, "backoff": "exponential", "base": 1.0}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(str(tmp_path / "jobs.db"))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def _same_as_stored(store: SQLiteStore, jobs: list[NewJob]) -> list[Job]:
    """Enqueue ``jobs``; assert each job returned equals the stored one, field by field."""
    results = await store.enqueue(jobs)
    assert [r.created for r in results] == [True] * len(jobs)
    returned = [r.job for r in results]
    for job in returned:
        stored = await store.get(job.id)
        assert job == stored
        for name in ("payload", "policy", "meta", "timeout", "max_attempts", "item_index"):
            assert type(getattr(job, name)) is type(getattr(stored, name)), name
    return returned


async def test_bulk_enqueue_returns_the_stored_jobs_with_varying_columns(
    store: SQLiteStore,
) -> None:
    jobs = [
        NewJob(
            handler=f"h{i % 3}",
            payload={"i": i, "nested": [i, {"x": None}]},
            queue="q" if i % 2 else "default",
            max_attempts=None if i % 4 else 5,
            policy=POLICY,
            delay=float(i % 5),
            timeout=None if i % 3 else 2.5,
            batch_id="b1" if i < 300 else None,
            item_index=i if i < 300 else None,
            event_scope="orders" if i % 7 == 0 else None,
            meta={"request_id": f"r{i}"} if i % 2 else {},
        )
        for i in range(700)  # several chunks, and a tail in smaller ones
    ]
    returned = await _same_as_stored(store, jobs)
    assert [j.id for j in returned] == list(range(returned[0].id, returned[0].id + 700))
    assert [j.payload for j in returned] == [j.payload for j in jobs]
    assert returned[0].status is Status.PENDING


async def test_bulk_enqueue_of_alike_jobs_shares_values_but_not_mutable_ones(
    store: SQLiteStore,
) -> None:
    meta = {"tenant": "a"}
    jobs = [
        NewJob(handler="noop", payload={}, policy=POLICY, meta=meta, payload_json="{}")
        for _ in range(300)
    ]
    returned = await _same_as_stored(store, jobs)
    first, second = returned[0], returned[1]
    assert first.payload == {}
    assert first.payload is not second.payload
    assert first.policy == POLICY
    assert first.policy is not second.policy
    assert first.meta == meta
    assert first.meta is not second.meta
    assert first.meta is not meta
    assert first.run_at == first.created_at


async def test_values_sqlite_would_convert_are_read_back(store: SQLiteStore) -> None:
    jobs = [
        NewJob(handler="h", payload=1, timeout=5),  # an int timeout is stored as REAL
        NewJob(handler="h", payload=2, timeout=5.0),
        NewJob(handler="h", payload=3, max_attempts=True),  # type: ignore[arg-type]
        NewJob(handler="h", payload=4, max_attempts=1),
    ]
    returned = await _same_as_stored(store, jobs)
    assert [type(j.timeout) for j in returned[:2]] == [float, float]
    assert [j.max_attempts for j in returned[2:]] == [1, 1]


async def test_single_enqueue_with_and_without_key_returns_the_stored_job(
    store: SQLiteStore,
) -> None:
    plain = await _same_as_stored(store, [NewJob(handler="h", payload={"a": [1]}, delay=3.0)])
    keyed = await _same_as_stored(
        store, [NewJob(handler="h", payload="x", key="k1", timeout=7, meta={"m": 1})]
    )
    assert plain[0].run_at > plain[0].created_at
    assert (keyed[0].key, keyed[0].timeout) == ("k1", 7.0)
    again = await store.enqueue([NewJob(handler="h", payload="y", key="k1")])
    assert (again[0].created, again[0].job) == (False, keyed[0])


def test_build_makes_what_the_constructor_makes() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = Job(
        id=1,
        queue="q",
        handler="h",
        payload={"p": 1},
        status=Status.RUNNING,
        attempts=1,
        max_attempts=None,
        policy={},
        run_at=now,
        version=2,
        created_at=now,
        updated_at=now,
        lease_token="t",
        cancel_requested=True,
    )
    fields: list[Any] = [getattr(job, f.name) for f in dataclasses.fields(Job)]
    built = _build(Job, 2, [[value, value] for value in fields])
    assert built == [job, job]
    assert type(built[0]) is Job


async def test_calls_on_a_closed_store_fail_and_errors_reach_the_caller(
    store: SQLiteStore,
) -> None:
    with pytest.raises(JobNotFound):  # raised on the store's thread
        await store.get(12345)
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.get(1)


def _receiver(directory: Path, pid: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / f"{pid}.0123abcd"))
    sock.setblocking(False)
    return sock


def test_wake_up_reaches_sockets_bound_after_an_earlier_listing(tmp_path: Path) -> None:
    directory = tmp_path / "db-wake"
    directory.mkdir()
    other = os.getpid() + 1
    first = _receiver(directory, other)
    try:
        _wake_processes(str(directory))
        assert first.recv(16) == b"\0"
        second = _receiver(directory, other + 1)  # the folder changes in the same clock tick
        try:
            _wake_processes(str(directory))
            assert first.recv(16) == b"\0"
            assert second.recv(16) == b"\0"
        finally:
            second.close()
    finally:
        first.close()


def test_wake_up_listing_is_reused_only_while_the_folder_is_unchanged(tmp_path: Path) -> None:
    directory = tmp_path / "db-wake"
    directory.mkdir()
    os.utime(directory, ns=(1_000_000_000, 1_000_000_000))  # changed long before the listing
    mtime = os.stat(directory).st_mtime_ns
    targets = _Targets(str(directory), mtime)
    assert targets.paths == []
    assert targets.current(mtime)
    receiver = _receiver(directory, os.getpid() + 1)
    try:
        assert not targets.current(os.stat(directory).st_mtime_ns)
        own = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        own.bind(str(directory / f"{os.getpid()}.89abcdef"))  # this process: woken directly
        try:
            listed = _Targets(str(directory), os.stat(directory).st_mtime_ns)
            assert listed.paths == [str(directory / f"{os.getpid() + 1}.0123abcd")]
        finally:
            own.close()
    finally:
        receiver.close()


async def test_a_datagram_wakes_the_waiters_of_every_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process wakes this one with one datagram, read by the event loops that wait; the
    # loop that drains it must wake the waiters of the other loops too. The data_version poll
    # is set far beyond the wait, so only the datagram can end the waits early.
    path = str(tmp_path / "jobs.db")
    attached = threading.Semaphore(0)
    attach = _Listener.attach

    def counting(self: _Listener, loop: asyncio.AbstractEventLoop) -> None:
        attach(self, loop)
        attached.release()

    monkeypatch.setattr(_Listener, "attach", counting)

    async def wait_elsewhere() -> bool:
        other = SQLiteStore(path, wake_interval=60)
        await other.open()
        try:
            return await other.wait(["default"], timeout=10)
        finally:
            await other.close()

    here = SQLiteStore(path, wake_interval=60)
    await here.open()
    try:
        waiting_here = asyncio.create_task(here.wait(["default"], timeout=10))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            elsewhere = pool.submit(asyncio.run, wait_elsewhere())
            for _ in range(2):
                assert await asyncio.to_thread(attached.acquire, timeout=10)
            assert here._listener is not None
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                sender.sendto(b"\0", here._listener.path)
            assert await waiting_here is True
            assert await asyncio.wrap_future(elsewhere) is True
    finally:
        await here.close()


async def test_a_loop_that_cannot_watch_sockets_waits_by_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An event loop without add_reader (Windows' proactor) cannot read the wake-up socket: the
    # wait falls back to the data_version poll and still sees another connection's commit.
    path = str(tmp_path / "jobs.db")
    store = SQLiteStore(path, wake_interval=0.01)
    await store.open()
    loop = asyncio.get_running_loop()

    def refuse(*args: object) -> None:
        raise NotImplementedError

    monkeypatch.setattr(loop, "add_reader", refuse)
    try:
        waiter = asyncio.ensure_future(store.wait(["default"], 10.0))
        other = sqlite3.connect(path)
        try:
            for i in range(100):  # until it wakes: a commit before its first read goes unseen
                with other:
                    other.execute("CREATE TABLE IF NOT EXISTS durably_poke (i INTEGER)")
                    other.execute("INSERT INTO durably_poke VALUES (?)", (i,))
                done, _ = await asyncio.wait({waiter}, timeout=0.05)
                if done:
                    break
        finally:
            other.close()
        assert await waiter is True
        assert store._listener is not None
        assert not store._listener._loops  # it never watched the socket
    finally:
        await store.close()
