"""The benchmark runs end to end at a tiny scale and its correctness checks hold.

Only correctness is asserted (exactly-once, attempt counts, an untouched backlog): never timings.
Each workload starts real worker processes on a fresh namespace of each store.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import require_service

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workloads() -> ModuleType:
    # The benchmark lives beside the package, not in it: import it from the checkout.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("bench.workloads")


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_service("PostgreSQL", "127.0.0.1", 5432)
    elif request.param == "redis":
        require_service("Redis", "127.0.0.1", 6379)
    name: str = request.param
    return name


async def test_w1_drains_every_job_exactly_once(workloads: ModuleType, kind: str) -> None:
    result: dict[str, Any] = await workloads.w1_drain(kind, jobs=40, processes=2, concurrency=4)
    assert result["correct"] is True
    assert sum(result["jobs_per_process"]) == 40
    assert result["peak_rss_mb"] > 0


async def test_w2_runs_exactly_three_attempts_per_job(workloads: ModuleType, kind: str) -> None:
    result: dict[str, Any] = await workloads.w2_retry(kind, jobs=40, concurrency=4)
    assert result["attempts"] == 120
    assert result["handler_calls"] == 120


async def test_w3_and_w4_run_each_job_once_and_leave_the_backlog(
    workloads: ModuleType, kind: str
) -> None:
    w3: dict[str, Any] = await workloads.w3_latency(kind, jobs=10, interval=0.005)
    assert w3["jobs"] == 10
    assert w3["correct"] is True
    w4: dict[str, Any] = await workloads.w4_backlog(kind, jobs=10, backlog=200, interval=0.005)
    assert w4["backlog"] == 200
    assert w4["correct"] is True


async def test_a_duplicated_execution_fails_the_check(workloads: ModuleType) -> None:
    from datetime import UTC, datetime

    from durably.job import Job, Status

    now = datetime.now(UTC)
    job = Job(
        id=1,
        queue="default",
        handler="noop",
        payload=None,
        status=Status.SUCCEEDED,
        attempts=1,
        max_attempts=5,
        policy={},
        run_at=now,
        version=3,
        created_at=now,
        updated_at=now,
    )
    with pytest.raises(workloads.BenchFailure, match="more than once"):
        workloads.check_exactly_once([job], 1, [("noop", 1, 1), ("noop", 1, 1)], "noop")
    with pytest.raises(workloads.BenchFailure, match="never ran"):
        workloads.check_exactly_once([job], 1, [], "noop")
    workloads.check_exactly_once([job], 1, [("noop", 1, 1)], "noop")
