"""Operations the load-test workers import (``--import tests.integration.load_tasks``).

The store comes from the environment the test sets: ``DURABLY_TEST_URL`` and, for a namespace of
its own, ``DURABLY_TEST_SCHEMA`` (PostgreSQL) or ``DURABLY_TEST_PREFIX`` (Redis).
``DURABLY_TEST_EXEC_DIR`` names the directory where every worker process appends one line per
finished execution (``<job id> <attempt>``) to a file named after its pid, so the test can count
executions per job without trusting the store it is testing.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from durably import Durably, JobContext, RetryPolicy
from durably.job import JSON

# Attempts lost to a cut connection (a claim whose reply never arrived) come back after the
# lease expires; a short fixed retry keeps the chaos tests within their time bound.
POLICY = RetryPolicy(max_attempts=20, initial=0.05, cap=0.2, jitter="none")

_log_fd: int | None = None


def namespace_options() -> dict[str, Any]:
    """The store options the test asked for through the environment."""
    options: dict[str, Any] = {}
    if schema := os.environ.get("DURABLY_TEST_SCHEMA"):
        options["schema"] = schema
    if prefix := os.environ.get("DURABLY_TEST_PREFIX"):
        options["prefix"] = prefix
    return options


def make_app(url: str | None = None, **options: Any) -> Durably:
    """An app with the load operations registered, on ``url`` (else the environment's)."""
    chosen = url or os.environ.get("DURABLY_TEST_URL") or "sqlite:///:memory:"
    built = Durably(chosen, **(options or namespace_options()))
    built.register("record", record, policy=POLICY)
    return built


def _record_execution(job_id: int, attempt: int) -> None:
    global _log_fd
    if _log_fd is None:
        directory = Path(os.environ["DURABLY_TEST_EXEC_DIR"])
        # O_APPEND and one write() per line: lines never interleave, and a line written is in
        # the kernel even if this process dies right after.
        _log_fd = os.open(
            directory / f"exec-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
    os.write(_log_fd, f"{job_id} {attempt}\n".encode())


async def record(payload: dict[str, Any], context: JobContext) -> JSON:
    """Wait ``sleep`` seconds (if given), then record this execution and return the pid."""
    pause = float(payload.get("sleep", 0.0))
    if pause > 0:
        await asyncio.sleep(pause)  # stands for real work, so jobs overlap with cut connections
    _record_execution(context.job.id, context.attempt)
    return {"pid": os.getpid()}


app = make_app()
