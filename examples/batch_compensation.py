"""Seed 001 rebuilt: batch compensation, without its three bugs.

The Go original kept compensation records in a table of its own and processed them by hand.
Here each item is a durable job of the batch, so:

- the retry count is written back with every attempt (the seed never stored it);
- two workers never run the same item: claims are leased and writes fenced by the lease;
- a failed item waits its policy's backoff before a background worker retries it (the seed
  retried at once, forever);
- ``process_batch`` still gives the seed's ``CompensationResult`` counts, picking up pending
  **and** retrying items; operators resolve or abandon dead-lettered items with who and notes,
  guarded by the job's version.

Run it: ``python examples/batch_compensation.py [--url sqlite:///jobs.db]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import durably
from durably.job import LIVE

BATCH = "refund-batch-7"
POLICY = durably.RetryPolicy(max_attempts=3, initial=0.01, cap=0.05, jitter="full")

# Each refund says how its compensation goes: "ok", fail N times then succeed, rejected for good
# (permanent), or failing on every attempt.
ITEMS: list[dict[str, Any]] = [
    {"order": 101, "amount": 10, "script": "ok"},
    {"order": 102, "amount": 25, "script": "ok"},
    {"order": 103, "amount": 40, "script": "fail-once"},
    {"order": 104, "amount": 15, "script": "rejected"},
    {"order": 105, "amount": 99, "script": "always-fail"},
]


class PaymentGatewayDown(Exception):
    """A transient failure of the refund call: retried by the policy."""


def build_app(url: str) -> durably.Durably:
    """The app with its one operation; workers and producers both build it this way."""
    app = durably.Durably(url)

    @app.operation("compensate", policy=POLICY)
    def compensate(item: dict[str, Any], context: durably.JobContext) -> dict[str, Any]:
        script = item["script"]
        if script == "rejected":
            raise durably.Permanent(f"order {item['order']} was already refunded")
        if script == "always-fail" or (script == "fail-once" and context.attempt == 1):
            raise PaymentGatewayDown(f"gateway timeout refunding order {item['order']}")
        return {"refunded": item["amount"], "order": item["order"]}

    return app


def _drain(app: durably.Durably, rounds: int = 20) -> None:
    """The seed's background worker: run burst workers until no item is pending or retrying."""
    for _ in range(rounds):
        app.run_worker(burst=True, poll_interval=0.2)
        if app.batch(BATCH).done:
            return
    raise RuntimeError(f"batch {BATCH} did not finish: {app.batch(BATCH).to_dict()}")


def main(url: str) -> dict[str, Any]:
    """Enqueue the batch, process it twice, let a worker finish it, then act as an operator."""
    with build_app(url) as app:
        jobs = app.enqueue_batch(BATCH, "compensate", ITEMS)
        first = app.process_batch(BATCH)  # 2 succeed, 2 retry, 1 goes to manual handling
        retrying = {
            job.item_index: job.attempts
            for job in app.jobs(durably.JobFilter(batch_id=BATCH))
            if job.status is durably.Status.RETRYING
        }
        second = app.process_batch(BATCH)  # the retrying items, at once: 1 succeeds, 1 retries
        _drain(app)  # the last retry runs after its backoff and exhausts its attempts

        by_index = {job.item_index: job for job in app.jobs(durably.JobFilter(batch_id=BATCH))}
        rejected, exhausted = by_index[3], by_index[4]
        resolved = app.resolve(
            rejected.id,
            actor="alice",
            notes="refunded by hand in the PSP console",
            expected_version=rejected.version,
        )
        try:  # an operator acting on a version that is no longer current is refused
            app.abandon(exhausted.id, actor="bob", notes="stale", expected_version=0)
            stale_refused = False
        except durably.Conflict:
            stale_refused = True
        abandoned = app.abandon(
            exhausted.id,
            actor="bob",
            notes="customer closed the account",
            expected_version=exhausted.version,
        )
        summary = app.batch(BATCH)
        return {
            "enqueued": len(jobs),
            "first": first.to_dict(),
            "retrying_attempts": retrying,
            "second": second.to_dict(),
            "dead_letter": {
                "rejected": rejected.classification,
                "exhausted": exhausted.classification,
                "exhausted_attempts": exhausted.attempts,
            },
            "resolved": {"status": resolved.status.value, "operator": resolved.operator},
            "stale_refused": stale_refused,
            "abandoned": {"status": abandoned.status.value, "operator": abandoned.operator},
            "audit": {
                index: [entry.to_dict() for entry in app.audit(job.id)]
                for index, job in ((3, rejected), (4, exhausted))
            },
            "counts": {status.value: n for status, n in summary.counts.items()},
            "live": sum(summary.counts.get(status, 0) for status in LIVE),
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Seed 001: batch compensation.")
    parser.add_argument("--url", default=f"sqlite:///{tempfile.mkdtemp()}/durably.db")
    print(json.dumps(main(parser.parse_args().url), indent=2, default=str))
