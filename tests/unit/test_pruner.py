"""Retention: finished jobs are pruned after their age; live and dead-lettered ones are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from durably import ConfigError, Durably, Permanent, Pruner, RetryPolicy, Status
from durably.testing import FakeClock


async def test_pruner_deletes_only_old_finished_jobs(tmp_path: Path) -> None:
    clock = FakeClock()
    app = Durably(f"sqlite:///{tmp_path}/p.db", clock=clock.now)

    @app.operation(policy=RetryPolicy(max_attempts=1))
    def op(payload: dict[str, bool]) -> str:
        if payload["fail"]:
            raise Permanent("no")
        return "ok"

    old_ok = await app.enqueue_async("op", {"fail": False})
    old_bad = await app.enqueue_async("op", {"fail": True})
    await app.worker(burst=True, poll_interval=0.05).run()
    clock.advance(3600)
    new_ok = await app.enqueue_async("op", {"fail": False})
    await app.worker(burst=True, poll_interval=0.05).run()
    waiting = await app.enqueue_async("op", {"fail": False}, delay=10)
    clock.advance(60)

    pruner = Pruner(await app.store_async(), retention=1800)
    assert await pruner.run_once() == 1
    remaining = {job.id: job.status for job in await app.jobs_async()}
    assert old_ok.id not in remaining
    assert remaining[old_bad.id] is Status.DEAD_LETTER  # waits for an operator
    assert remaining[new_ok.id] is Status.SUCCEEDED  # too young
    assert remaining[waiting.id] is Status.PENDING
    assert await pruner.run_once() == 0
    await app.close_async()


async def test_retention_must_be_positive(tmp_path: Path) -> None:
    app = Durably(f"sqlite:///{tmp_path}/p.db")
    with pytest.raises(ConfigError, match="retention"):
        Pruner(await app.store_async(), retention=0)
    await app.close_async()
