"""The operations the benchmark's worker processes run, and the app that holds them.

Worker processes import this module (``durably worker --import bench.tasks``); the store and its
namespace come from the environment the benchmark sets:

* ``DURABLY_BENCH_URL``: the store URL;
* ``DURABLY_BENCH_OPTIONS``: JSON keyword arguments for the store (``schema``, ``prefix``);
* ``DURABLY_BENCH_EXEC_DIR``: where each process writes, at exit, one line per handler call
  (``handler job_id attempt``), so that executions are counted outside the store.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path
from typing import Any

from durably import Durably, RetryPolicy
from durably.executor import JobContext

__all__ = ["RETRY_FIXED", "RETRY_POLICY", "SUCCEED_ON", "app", "build_app", "read_executions"]

RETRY_FIXED = 0.01
RETRY_POLICY = RetryPolicy(max_attempts=5, fixed=RETRY_FIXED, jitter="none")
SUCCEED_ON = 3
"""W2's handler fails its first two attempts and succeeds on this one."""

_executed: list[tuple[str, int, int]] = []


def _record(handler: str, context: JobContext) -> None:
    # list.append is atomic under the GIL: safe from the worker's job threads too.
    _executed.append((handler, context.job.id, context.attempt))


async def noop(payload: Any, context: JobContext) -> int:
    """W1: do nothing; the result names the process that ran the job."""
    _record("noop", context)
    return os.getpid()


async def flaky(payload: Any, context: JobContext) -> int:
    """W2: fail twice, succeed on the third attempt."""
    _record("flaky", context)
    if context.attempt < SUCCEED_ON:
        raise RuntimeError(f"planned failure on attempt {context.attempt}")
    return context.attempt


async def stamp(payload: Any, context: JobContext) -> dict[str, float | int]:
    """W3/W4: the wall time the handler started, to compare with the enqueue time."""
    started = time.time()
    _record("stamp", context)
    return {"started": started, "pid": os.getpid()}


async def later(payload: Any, context: JobContext) -> None:
    """W4: the backlog scheduled an hour ahead; it must never run during the benchmark."""
    _record("later", context)


def build_app(url: str, **store_options: Any) -> Durably:
    """A durably app with the benchmark's operations registered."""
    bench = Durably(url, **store_options)
    bench.register("noop", noop)
    bench.register("flaky", flaky, policy=RETRY_POLICY)
    bench.register("stamp", stamp)
    bench.register("later", later)
    return bench


def _write_executions() -> None:
    directory = os.environ.get("DURABLY_BENCH_EXEC_DIR")
    if not directory:
        return
    lines = "".join(f"{h} {job_id} {attempt}\n" for h, job_id, attempt in _executed)
    Path(directory, f"exec-{os.getpid()}.txt").write_text(lines)


def read_executions(directory: Path) -> list[tuple[str, int, int]]:
    """Every handler call the worker processes that wrote into ``directory`` recorded."""
    found: list[tuple[str, int, int]] = []
    for path in sorted(directory.glob("exec-*.txt")):
        for line in path.read_text().splitlines():
            handler, job_id, attempt = line.split()
            found.append((handler, int(job_id), int(attempt)))
    return found


app = build_app(
    os.environ.get("DURABLY_BENCH_URL", "sqlite:///durably-bench.db"),
    **json.loads(os.environ.get("DURABLY_BENCH_OPTIONS", "{}")),
)
atexit.register(_write_executions)
