"""SIGKILL a worker in the middle of a job: another worker rescues it and nothing is lost."""

from __future__ import annotations

import signal
from collections.abc import Callable

from durably import Status

from .conftest import Target, WorkerProcess, wait_until


def test_a_job_whose_worker_was_killed_succeeds_on_the_next_worker(
    target: Target, start_worker: Callable[..., WorkerProcess]
) -> None:
    app = target.app
    started = target.tmp_path / "started"
    job = app.enqueue(
        "block",
        {
            "started": str(started),
            "release": str(target.tmp_path / "never"),  # attempt 1 blocks until killed
            "succeed_from": 2,
        },
    )
    bystander = app.enqueue("block", {"succeed_from": 1})

    first = start_worker("first", "--concurrency", "1")
    wait_until(started.exists, "the job to start on the first worker", first)
    running = app.get(job.id)
    assert running.status is Status.RUNNING
    assert running.attempts == 1
    first.signal(signal.SIGKILL)
    assert first.process.wait(timeout=20) == -signal.SIGKILL

    second = start_worker("second", "--concurrency", "2")
    wait_until(
        lambda: app.get(job.id).status is Status.SUCCEEDED,
        "the second worker to rescue and finish the job",
        second,
    )
    wait_until(lambda: app.get(bystander.id).status is Status.SUCCEEDED, "the other job", second)

    done = app.get(job.id)
    assert done.attempts == 2
    assert done.result["attempt"] == 2
    assert done.result["worker"] != running.worker_id
    history = app.attempts(job.id)
    assert [(a.number, a.outcome, a.classification) for a in history] == [
        (1, "lease_expired", "lease_expired"),
        (2, "succeeded", None),
    ]
    assert history[0].worker_id == running.worker_id
    assert history[1].worker_id == done.result["worker"]
    assert sum(app.stats().values()) == 2  # nothing lost, nothing duplicated

    second.signal(signal.SIGTERM)
    assert second.process.wait(timeout=20) == 0, second.output()
