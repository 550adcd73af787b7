"""Seed 003 rebuilt: goblin-blackrock's rocks as keyed durable jobs.

A rock is "call this quest with these params until it succeeds, and tell ``<scope>`` how it
went". In durably:

- ``app.hurl(key, scope, handler, params, retries=None, interval=30)`` throws a rock: keyed and
  idempotent, unlimited retries at a fixed interval (or ``retries=N``), ``initial_delay=`` to
  start later; throwing again with the same key replaces the params while the rock is not
  running (the seed's upsert) and leaves a running rock alone;
- ``app.cancel_key(key)`` is the seed's ``break``;
- rocks are rows in the store, so a restarted process resumes them with no code of its own;
- ``app.subscribe(scope, callback)`` receives ``<scope>.processed`` with ``key``, ``result``
  and ``error``, written with the outcome (an outbox), so it is never lost.

Run it: ``python examples/blackrock.py [--url sqlite:///jobs.db]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from typing import Any

import durably
from durably.job import LIVE

INTERVAL = 0.01  # the seed retries every 30 s; the example every 10 ms
SCOPE = "billing"


def build_app(url: str, received: list[dict[str, Any]]) -> durably.Durably:
    """The app as every process builds it: its quests, and who listens to ``billing``."""
    app = durably.Durably(url)

    @app.operation("billing.charge", policy=durably.RetryPolicy(initial=INTERVAL, jitter="none"))
    def charge(params: dict[str, Any], context: durably.JobContext) -> dict[str, Any]:
        if params["amount"] <= 0:
            raise durably.Permanent(f"invoice {params['invoice']}: nothing to charge")
        if params.get("flaky") and context.attempt == 1:
            raise ConnectionError("billing backend unreachable")
        result: dict[str, Any] = {"charged": params["amount"], "attempt": context.attempt}
        if params.get("probe_upsert") and context.job.key is not None:
            # Throwing the same rock while it runs returns it untouched (no lost update).
            seen = app.hurl(context.job.key, SCOPE, "billing.charge", {**params, "amount": 1})
            result["upsert_while_running_ignored"] = seen.payload == params
        return result

    def on_processed(event: Any) -> None:
        payload = event.payload
        received.append(
            {
                "type": event.type,
                "key": payload["key"],
                "status": payload["status"],
                "result": payload["result"],
                "error": payload["error"],
            }
        )

    app.subscribe(SCOPE, on_processed)
    return app


async def _resume(app: durably.Durably, keys: list[str], rounds: int = 20) -> None:
    """What a restarted process does: run workers; the stored rocks run by themselves."""
    try:
        for _ in range(rounds):
            await app.worker(burst=True, poll_interval=0.2).run()
            jobs = [await app.get_by_key_async(key) for key in keys]
            if all(job is not None and job.status not in LIVE for job in jobs):
                break
        else:
            raise RuntimeError("the rocks did not finish")
        publisher = await app.publisher_async()  # events of the last endings
        while await publisher.run_once():
            pass
    finally:
        await app.close_async()


def main(url: str) -> dict[str, Any]:
    """Throw rocks, break one, "restart", and report what happened and what was heard."""
    received: list[dict[str, Any]] = []
    with build_app(url, received) as app:  # the first process: it throws rocks and exits
        first = app.hurl("invoice-9", SCOPE, "billing.charge", {"invoice": 9, "amount": 10})
        params = {"invoice": 9, "amount": 12, "flaky": True, "probe_upsert": True}
        again = app.hurl("invoice-9", SCOPE, "billing.charge", params, interval=INTERVAL)
        delayed = app.hurl(
            "invoice-10", SCOPE, "billing.charge", {"invoice": 10, "amount": 5}, initial_delay=0.05
        )
        app.hurl("invoice-11", SCOPE, "billing.charge", {"invoice": 11, "amount": 7}, retries=3)
        broken = app.cancel_key("invoice-11")
        app.hurl("invoice-12", SCOPE, "billing.charge", {"invoice": 12, "amount": 0}, retries=5)
        before_restart = {key: app.get_by_key(key) for key in ("invoice-9", "invoice-10")}

    restarted = build_app(url, received)  # a new process on the same store: no hurl, no code
    try:
        asyncio.run(_resume(restarted, ["invoice-9", "invoice-10", "invoice-12"]))
        after = {
            key: restarted.get_by_key(key)
            for key in ("invoice-9", "invoice-10", "invoice-11", "invoice-12")
        }
    finally:
        restarted.close()
    return {
        "same_job": first.id == again.id,
        "params": again.payload,
        "delayed_run_at_later": delayed.run_at > delayed.created_at,
        "broken": broken.status.value if broken is not None else None,
        "before_restart": {k: j.status.value for k, j in before_restart.items() if j},
        "after_restart": {
            k: {"status": j.status.value, "attempts": j.attempts, "result": j.result}
            for k, j in after.items()
            if j
        },
        "events": sorted(received, key=lambda event: str(event["key"])),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Seed 003: hurl, break, resume, events.")
    parser.add_argument("--url", default=f"sqlite:///{tempfile.mkdtemp()}/durably.db")
    print(json.dumps(main(parser.parse_args().url), indent=2))
