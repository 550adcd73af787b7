"""Every example under ``examples/`` runs and does what its seed needs, on a fresh SQLite file.

The examples are scripts, not package modules: they are imported from the ``examples`` folder
and their ``main`` is called with a temporary store, so these tests check real behaviour (real
HTTP on 127.0.0.1, real workers, real Redis for the push publisher).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REDIS_URL, require_service, unique_name

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import batch_compensation
import blackrock
import push_publisher
import stream_service_retry


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'durably.db'}"


# -- seed 000 ---------------------------------------------------------------------------------


def test_stream_service_retry_succeeds_on_the_third_call(tmp_path: Path) -> None:
    out = stream_service_retry.main(sqlite_url(tmp_path))

    assert out["in_process"] == {"result": {"stream_id": "s-42"}, "calls": 3}
    durable = out["durable"]
    assert durable["status"] == "succeeded"
    assert durable["calls"] == 3
    assert durable["result"]["body"] == {"stream_id": "s-42"}
    assert [(a["number"], a["outcome"]) for a in durable["attempts"]] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert "answered 503" in durable["attempts"][0]["error"]


# -- seed 001 ---------------------------------------------------------------------------------


def test_batch_compensation_counts_retries_and_operator_actions(tmp_path: Path) -> None:
    out = batch_compensation.main(sqlite_url(tmp_path))

    assert out["enqueued"] == 5
    first = out["first"]
    assert (first["success_count"], first["retry_count"], first["manual_count"]) == (2, 2, 1)
    assert (first["total_items"], first["failed_count"]) == (5, 0)
    # The retry count is written back (the seed's first bug): both retrying items show 1.
    assert out["retrying_attempts"] == {2: 1, 4: 1}
    # A second run picks up the retrying items, at once.
    second = out["second"]
    assert (second["success_count"], second["retry_count"], second["manual_count"]) == (1, 1, 0)
    assert out["dead_letter"] == {
        "rejected": "permanent",
        "exhausted": "exhausted",
        "exhausted_attempts": 3,
    }
    assert out["resolved"] == {"status": "resolved", "operator": "alice"}
    assert out["stale_refused"] is True
    assert out["abandoned"] == {"status": "abandoned", "operator": "bob"}
    [resolve] = out["audit"][3]
    assert (resolve["actor"], resolve["action"], resolve["notes"]) == (
        "alice",
        "resolve",
        "refunded by hand in the PSP console",
    )
    assert (resolve["from_status"], resolve["to_status"]) == ("dead_letter", "resolved")
    [abandon] = out["audit"][4]
    assert (abandon["actor"], abandon["action"], abandon["notes"]) == (
        "bob",
        "abandon",
        "customer closed the account",
    )
    assert out["counts"] == {"succeeded": 3, "resolved": 1, "abandoned": 1}
    assert out["live"] == 0


# -- seed 002 ---------------------------------------------------------------------------------


@pytest.fixture
def stream() -> Iterator[str]:
    require_service("Redis", "127.0.0.1", 6379)
    import redis

    name = unique_name("durably-test-push")
    yield name
    with redis.Redis.from_url(REDIS_URL) as client:
        client.delete(name)


def test_push_publisher_writes_one_stream_entry_per_outcome(tmp_path: Path, stream: str) -> None:
    out = push_publisher.main(sqlite_url(tmp_path), REDIS_URL, stream=stream)

    jobs = out["jobs"]
    assert {n: j["status"] for n, j in jobs.items()} == {
        "n-1": "succeeded",
        "n-2": "succeeded",
        "n-3": "dead_letter",
        "n-4": "dead_letter",
        "n-5": "succeeded",
    }
    assert jobs["n-2"]["attempts"] == 3
    assert (jobs["n-3"]["classification"], jobs["n-3"]["attempts"]) == ("permanent", 1)
    assert (jobs["n-4"]["classification"], jobs["n-4"]["attempts"]) == ("exhausted", 4)
    assert jobs["n-4"]["attempt_classifications"][:3] == ["gateway_unavailable"] * 3
    assert out["backoff"] == [0.01, 0.02, 0.02]  # capped

    entries = out["entries"]
    assert out["xlen"] == len(entries) == 5
    by_key: dict[str, dict[str, Any]] = {}
    for entry in entries:
        assert entry["event_type"] == "push.processed"
        assert entry["event_id"].isdigit()
        payload = json.loads(entry["payload"])
        notification = payload["key"].removeprefix("push:")
        assert entry["request_id"] == f"req-{notification}"
        assert entry["trace_id"] == f"trace-{notification}"
        by_key[notification] = payload
    assert {n: p["status"] for n, p in by_key.items()} == {n: j["status"] for n, j in jobs.items()}
    assert by_key["n-3"]["error"]["classification"] == "permanent"
    assert by_key["n-2"]["result"] == {"delivered_to": 8, "attempt": 3}


def test_push_publisher_stream_stays_trimmed(tmp_path: Path, stream: str) -> None:
    out = push_publisher.main(sqlite_url(tmp_path), REDIS_URL, stream=stream, maxlen=10, bulk=50)

    assert len(out["jobs"]) == 55
    # MAXLEN ~ trims whole stream nodes: never below maxlen, well below what was written.
    assert 10 <= out["xlen"] < 50
    assert out["xlen"] == len(out["entries"])


# -- seed 003 ---------------------------------------------------------------------------------


def test_blackrock_hurl_break_resume_and_events(tmp_path: Path) -> None:
    out = blackrock.main(sqlite_url(tmp_path))

    # hurl twice with one key: one rock, its params replaced.
    assert out["same_job"] is True
    assert out["params"] == {"invoice": 9, "amount": 12, "flaky": True, "probe_upsert": True}
    assert out["delayed_run_at_later"] is True
    assert out["broken"] == "cancelled"
    # Nothing ran before the restart; the restarted process ran the stored rocks.
    assert out["before_restart"] == {"invoice-9": "pending", "invoice-10": "pending"}
    after = out["after_restart"]
    assert after["invoice-9"] == {
        "status": "succeeded",
        "attempts": 2,
        "result": {"charged": 12, "attempt": 2, "upsert_while_running_ignored": True},
    }
    assert after["invoice-10"]["status"] == "succeeded"
    assert (after["invoice-11"]["status"], after["invoice-11"]["attempts"]) == ("cancelled", 0)
    assert after["invoice-12"]["status"] == "dead_letter"

    events = {event["key"]: event for event in out["events"]}
    assert len(out["events"]) == len(events) == 4  # one per rock, none twice
    assert all(event["type"] == "billing.processed" for event in events.values())
    assert events["invoice-9"]["result"] == after["invoice-9"]["result"]
    assert events["invoice-9"]["error"] is None
    assert events["invoice-11"]["status"] == "cancelled"
    assert events["invoice-12"]["result"] is None
    assert events["invoice-12"]["error"] == {
        "type": "Permanent",
        "message": "invoice 12: nothing to charge",
        "classification": "permanent",
    }
