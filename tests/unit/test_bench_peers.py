"""The side-by-side harness (``bench.peers``) runs every peer end to end at a tiny scale.

Only correctness is asserted (exactly-once, three attempts each in W2, an untouched backlog): never
timings. Each workload starts the peer's own worker processes on a fresh namespace.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import require_service

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the benchmark lives beside the package, not in it
    sys.path.insert(0, str(REPO))

peers = importlib.import_module("bench.peers")
harness: ModuleType = importlib.import_module("bench.peers.harness")
BenchFailure: type[Exception] = importlib.import_module("bench.workloads").BenchFailure

SERVICES = {"postgres": ("PostgreSQL", 5432), "redis": ("Redis", 6379)}


@pytest.fixture(params=sorted(peers.ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> Any:
    adapter_type = peers.load(request.param)
    if adapter_type.store in SERVICES:
        name, port = SERVICES[adapter_type.store]
        require_service(name, "127.0.0.1", port)
    return adapter_type


def test_w1_runs_every_job_exactly_once(adapter: Any) -> None:
    result: dict[str, Any] = harness.w1_drain(adapter, jobs=30, processes=2)
    assert result["correct"] is True
    assert result["jobs"] == 30
    assert result["peak_rss_mb"] > 0
    assert result["system"] == f"{adapter.peer} {adapter.version()}"


def test_w2_runs_three_attempts_per_job(adapter: Any) -> None:
    result: dict[str, Any] = harness.w2_retry(adapter, jobs=6)
    assert result["attempts"] == 18


def test_w3_and_w4_leave_the_backlog_alone(adapter: Any) -> None:
    w3: dict[str, Any] = harness.w3_latency(adapter, jobs=4, interval=0.005)
    assert w3["jobs"] == 4
    assert w3["latency_p50_ms"] > 0
    w4: dict[str, Any] = harness.w4_backlog(adapter, jobs=4, backlog=50, interval=0.005)
    assert w4["backlog"] == 50


def test_the_log_reader_takes_only_whole_lines(tmp_path: Path) -> None:
    log = harness.ExecLog(tmp_path)
    path = tmp_path / "exec-1.txt"
    path.write_bytes(b"noop 1 1 10.0 0.0\nnoop 2 1 11.")
    assert log.poll()["noop"] == 1
    with path.open("ab") as fh:
        fh.write(b"5 0.0\n")
    assert log.poll()["noop"] == 2
    assert log.executions[1] == harness.Execution("noop", 2, 1, 11.5, 0.0)


def test_record_appends_one_line_per_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(harness.EXEC_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(harness, "_log_fd", None)
    harness.record("stamp", 7, 1, 123.25)
    harness.record("noop", 8, 2)
    log = harness.ExecLog(tmp_path)
    log.poll()
    assert [(e.task, e.key, e.attempt, e.enqueued_at) for e in log.executions] == [
        ("stamp", 7, 1, 123.25),
        ("noop", 8, 2, 0.0),
    ]
    assert (tmp_path / f"exec-{os.getpid()}.txt").exists()
    os.close(harness._log_fd[1])
    monkeypatch.setattr(harness, "_log_fd", None)


@pytest.mark.parametrize(
    ("records", "attempts", "problem"),
    [
        ([("noop", 0, 1), ("noop", 1, 1), ("noop", 1, 1)], 1, "other than 1"),
        ([("noop", 0, 1)], 1, "never ran"),
        ([("noop", 0, 1), ("noop", 1, 1), ("noop", 5, 1)], 1, "unknown"),
        ([("flaky", k, a) for k in (0, 1) for a in (1, 1, 3)], 3, "attempt numbers"),
    ],
)
def test_the_check_fails_a_lost_duplicated_or_misnumbered_run(
    records: list[tuple[str, int, int]], attempts: int, problem: str
) -> None:
    executions = [harness.Execution(t, k, a, 1.0, 0.0) for t, k, a in records]
    with pytest.raises(BenchFailure, match=problem):
        harness.check_runs(executions, records[0][0], range(2), attempts_each=attempts)
