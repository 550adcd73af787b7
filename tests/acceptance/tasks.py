"""Operations the acceptance workers import (``--import tests.acceptance.tasks``).

The store comes from the environment the test sets: ``DURABLY_TEST_URL`` and, for a namespace of
its own, ``DURABLY_TEST_SCHEMA`` (PostgreSQL) or ``DURABLY_TEST_PREFIX`` (Redis).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from durably import Durably, JobContext, RetryPolicy
from durably.job import JSON

# A rescued attempt is retried a tenth of a second later, so a crash test takes about a lease.
POLICY = RetryPolicy(max_attempts=3, initial=0.1, cap=1.0, jitter="none")
# How long a blocked handler waits for its release file before giving up (never reached when
# the tests pass: they release it, or kill the worker).
BLOCK_LIMIT = 30.0


def namespace_options() -> dict[str, Any]:
    """The store options the test asked for through the environment."""
    options: dict[str, Any] = {}
    if schema := os.environ.get("DURABLY_TEST_SCHEMA"):
        options["schema"] = schema
    if prefix := os.environ.get("DURABLY_TEST_PREFIX"):
        options["prefix"] = prefix
    return options


def make_app(url: str | None = None, **options: Any) -> Durably:
    """An app with the acceptance operations registered, on ``url`` (else the environment's)."""
    chosen = url or os.environ.get("DURABLY_TEST_URL") or "sqlite:///:memory:"
    built = Durably(chosen, **(options or namespace_options()))
    built.register("block", block, policy=POLICY)
    return built


async def block(payload: dict[str, Any], context: JobContext) -> JSON:
    """Succeed at once from attempt ``succeed_from`` on; before that, touch ``started`` and wait
    for the file ``release`` to appear (bounded), then succeed."""
    result = {"attempt": context.attempt, "worker": context.worker_id}
    if context.attempt >= int(payload.get("succeed_from", 1_000_000)):
        return result
    Path(payload["started"]).touch()
    release = Path(payload["release"])
    deadline = time.monotonic() + BLOCK_LIMIT
    while not release.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{release} never appeared")
        await asyncio.sleep(0.02)  # a file has no event to wait on; the handler polls it
    return result


app = make_app()
