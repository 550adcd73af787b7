"""An outbox event exists only if its state change committed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from durably import Durably, Permanent, RetryPolicy, Status, StoreError


async def test_a_transition_that_rolls_back_leaves_no_event(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    app = Durably(f"sqlite:///{db}")

    @app.operation(policy=RetryPolicy(max_attempts=1))
    def op(payload: dict[str, int]) -> None:
        raise Permanent("no")

    job = await app.enqueue_async("op", {"n": 1}, event_scope="s")
    await app.worker(burst=True, poll_interval=0.05, publish_events=False).run()
    store = await app.store_async()
    [dead_letter_event] = await store.claim_events(10, 30)
    assert await store.ack_events([dead_letter_event]) == 1

    # Abort the resolve in its last statement, after the store has written the outbox row.
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit WHEN NEW.actor = 'mallory' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with pytest.raises(StoreError, match="refused"):
        await app.resolve_async(job.id, actor="mallory", notes="should not stick")
    assert (await app.get_async(job.id)).status is Status.DEAD_LETTER
    assert await store.claim_events(10, 30) == []

    await app.resolve_async(job.id, actor="alice", notes="fixed")
    [resolved] = await store.claim_events(10, 30)
    assert resolved.payload["status"] == "resolved"
    assert resolved.payload["operator"] == "alice"
    await app.close_async()
