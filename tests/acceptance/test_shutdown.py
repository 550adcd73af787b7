"""SIGTERM a worker in the middle of a job: it finishes the job, records it and exits 0; jobs it
never claimed stay pending with no attempt used."""

from __future__ import annotations

import signal
from collections.abc import Callable

from durably import Status

from .conftest import DEADLINE, Target, WorkerProcess, wait_until

SHUTDOWN_TIMEOUT = 15.0


def test_sigterm_lets_the_running_job_finish_and_leaves_the_rest_pending(
    target: Target, start_worker: Callable[..., WorkerProcess]
) -> None:
    app = target.app
    started = target.tmp_path / "started"
    release = target.tmp_path / "release"
    running = app.enqueue("block", {"started": str(started), "release": str(release)})

    worker = start_worker(
        "graceful", "--concurrency", "1", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)
    )
    wait_until(started.exists, "the job to start", worker)
    # The only slot is taken: these wait unclaimed.
    queued = [app.enqueue("block", {"succeed_from": 1}) for _ in range(2)]

    worker.signal(signal.SIGTERM)
    wait_until(
        lambda: "no new claims" in worker.stderr.read_text(errors="replace"),
        "the worker to stop claiming",
        worker,
    )
    release.touch()  # only now may the running job finish
    assert worker.process.wait(timeout=SHUTDOWN_TIMEOUT + DEADLINE) == 0, worker.output()

    done = app.get(running.id)
    assert (done.status, done.attempts, done.lease_token) == (Status.SUCCEEDED, 1, None)
    assert done.result["attempt"] == 1
    [attempt] = app.attempts(running.id)
    assert attempt.outcome == "succeeded"
    assert attempt.finished_at is not None
    for job in queued:
        left = app.get(job.id)
        assert (left.status, left.attempts, left.lease_token) == (Status.PENDING, 0, None)
        assert app.attempts(job.id) == []
    assert "Traceback" not in worker.output()
