"""Batches: many items of one operation under a batch id, summarised and processed together.

This is seed 001's "batch compensation" done right: every item is a durable job (its retry count
persisted, its attempts recorded), two workers never take the same item (claims are leased), and
"process this batch now" runs its pending **and** retrying items at once.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from durably.executor import JobContext, execute
from durably.job import JSON, LIVE, Job, JobFilter, Outcome, Status
from durably.store.base import ClaimRequest, Lease

if TYPE_CHECKING:
    from durably.app import Durably

__all__ = ["BatchItem", "BatchSummary", "CompensationResult", "process_batch", "summarise"]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchItem:
    """One item of a batch that needs attention (failed, or waiting to retry)."""

    item_index: int | None
    job_id: int
    status: Status
    attempts: int
    classification: str | None
    last_error: str | None

    def to_dict(self) -> dict[str, JSON]:
        """A JSON-ready dict."""
        return {**dataclasses.asdict(self), "status": self.status.value}


@dataclasses.dataclass(frozen=True, slots=True)
class BatchSummary:
    """Where every item of a batch stands."""

    batch_id: str
    total: int
    counts: Mapping[Status, int]
    failing: tuple[BatchItem, ...]
    """Items dead-lettered or retrying, with their reasons, by item index."""

    @property
    def done(self) -> bool:
        """True when no item is pending, running or retrying."""
        return self.total > 0 and not any(self.counts.get(s, 0) for s in LIVE)

    def to_dict(self) -> dict[str, JSON]:
        """A JSON-ready dict."""
        return {
            "batch_id": self.batch_id,
            "total": self.total,
            "done": self.done,
            "counts": {s.value: n for s, n in self.counts.items()},
            "failing": [item.to_dict() for item in self.failing],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class CompensationResult:
    """What :func:`process_batch` did, with the counts of seed 001's ``CompensationResult``."""

    batch_id: str
    total_items: int
    """Items in the batch."""
    success_count: int
    """Items that succeeded in this run."""
    retry_count: int
    """Items that failed and had a retry scheduled."""
    manual_count: int
    """Items sent to manual handling (dead-lettered)."""
    failed_count: int
    """Items whose result could not be recorded (their lease was taken over meanwhile)."""

    def to_dict(self) -> dict[str, JSON]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def summarise(batch_id: str, jobs: list[Job]) -> BatchSummary:
    """The summary of a batch from its jobs."""
    counts: Counter[Status] = Counter(job.status for job in jobs)
    failing = tuple(
        sorted(
            (
                BatchItem(
                    item_index=job.item_index,
                    job_id=job.id,
                    status=job.status,
                    attempts=job.attempts,
                    classification=job.classification,
                    last_error=job.last_error,
                )
                for job in jobs
                if job.status in (Status.DEAD_LETTER, Status.RETRYING)
            ),
            key=lambda item: (item.item_index if item.item_index is not None else -1, item.job_id),
        )
    )
    return BatchSummary(batch_id=batch_id, total=len(jobs), counts=dict(counts), failing=failing)


async def batch_jobs(app: Durably, batch_id: str) -> list[Job]:
    """Every job of the batch, walking pages of the store's listing."""
    store = await app.store_async()
    found: list[Job] = []
    after: int | None = None
    while True:
        page = await store.list_jobs(JobFilter(batch_id=batch_id), limit=1000, after_id=after)
        found.extend(page)
        if len(page) < 1000:
            return found
        after = page[-1].id


async def process_batch(
    app: Durably,
    batch_id: str,
    *,
    lease_seconds: float = 300.0,
    chunk: int = 50,
    rand: Callable[[], float] = random.random,
) -> CompensationResult:
    """Run the batch's pending and retrying items now, ignoring their scheduled times.

    Each item is claimed under a lease like any worker claim, so a worker running at the same
    time never executes the same item; failures follow the item's retry policy.
    """
    store = await app.store_async()
    worker_id = f"process-batch:{os.getpid()}"
    queues = sorted({job.queue for job in await batch_jobs(app, batch_id)}) or [app.default_queue]
    tally: Counter[str] = Counter()
    threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="durably-batch")
    seen: set[int] = set()
    try:
        while True:
            # Ignoring run_at means an item this call just rescheduled is claimable again: ask
            # for enough rows to get past those, and hand them back unused.
            claimed = await store.claim(
                ClaimRequest(
                    queues=queues,
                    worker_id=worker_id,
                    limit=chunk + len(seen),
                    lease_seconds=lease_seconds,
                    batch_id=batch_id,
                    due_only=False,
                )
            )
            again = [Lease(job.id, job.lease_token or "") for job in claimed if job.id in seen]
            if again:
                await store.release(again)
            jobs = [job for job in claimed if job.id not in seen]
            if not jobs:
                break
            seen.update(job.id for job in jobs)
            completions = []
            for job in jobs:
                context = JobContext(job=job, attempt=job.attempts, worker_id=worker_id)
                completions.append(
                    await execute(
                        job,
                        app.operations.get(job.handler),
                        context=context,
                        threads=threads,
                        rand=rand,
                    )
                )
            applied = await store.complete(completions)
            for completion, ok in zip(completions, applied, strict=True):
                if not ok:
                    tally["failed"] += 1
                elif completion.outcome is Outcome.SUCCEEDED:
                    tally["success"] += 1
                elif completion.outcome is Outcome.RETRY:
                    tally["retry"] += 1
                else:
                    tally["manual"] += 1
    finally:
        threads.shutdown(wait=False)
    total = len(await batch_jobs(app, batch_id))
    return CompensationResult(
        batch_id=batch_id,
        total_items=total,
        success_count=tally["success"],
        retry_count=tally["retry"],
        manual_count=tally["manual"],
        failed_count=tally["failed"],
    )
