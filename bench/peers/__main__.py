"""``python -m bench.peers``: durably's workloads against other Python job queues.

    python -m bench.peers [--peers huey/sqlite,rq/redis,...] [--workloads W1,W2,W3,W4]
                          [--runs 3] [--scale 1.0] [--json PATH]

Prints the same table as ``python -m bench`` with a row per peer and store, and writes JSON.
Exits 1 when any correctness check failed.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.__main__ import WORKLOADS, Case, Sizes, publish, run_cases
from bench.peers import ADAPTERS, harness, load

DEFAULT_JSON = Path(__file__).resolve().parents[1] / "results" / "peers.json"


def cases(adapter: type[harness.Adapter], names: Sequence[str], scale: float) -> list[Case]:
    """The rows and runs of one peer on one store."""
    drain, retry, latency, backlog = Sizes.at(scale)
    c = adapter.concurrency

    def row(workload: str, variant: str) -> dict[str, str]:
        return {
            "system": f"{adapter.peer} {adapter.version()}",
            "store": adapter.store,
            "workload": workload,
            "variant": variant,
        }

    out: list[Case] = []
    if "W1" in names:
        for procs in (1, 2):
            out.append(
                (
                    row("W1", f"{drain} jobs, {procs} proc x {c}"),
                    functools.partial(harness.w1_drain, adapter, jobs=drain, processes=procs),
                )
            )
    if "W2" in names:
        out.append(
            (
                row("W2", f"{retry} jobs x 3 attempts, 1 proc x {c}"),
                functools.partial(harness.w2_retry, adapter, jobs=retry),
            )
        )
    if "W3" in names:
        out.append(
            (
                row("W3", f"{latency} jobs, 20 ms apart"),
                functools.partial(harness.w3_latency, adapter, jobs=latency),
            )
        )
    if "W4" in names:
        out.append(
            (
                row("W4", f"{latency} jobs + {backlog} ahead"),
                functools.partial(harness.w4_backlog, adapter, jobs=latency, backlog=backlog),
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print and save; 1 when any check failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--peers", default=",".join(ADAPTERS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    names = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    unknown = [p for p in peers if p not in ADAPTERS] + [w for w in names if w not in WORKLOADS]
    if unknown or args.runs < 1 or args.scale <= 0:
        parser.error(
            f"bad arguments: {unknown or 'runs >= 1 and scale > 0'} (peers: {', '.join(ADAPTERS)})"
        )
    started = time.perf_counter()
    adapters = [load(p) for p in peers]
    results = run_cases([c for a in adapters for c in cases(a, names, args.scale)], args.runs)
    return publish(
        results,
        title="peers on durably's workloads (medians over runs)",
        stores=sorted({a.store for a in adapters}),
        arguments={
            "peers": peers,
            "workloads": names,
            "runs": args.runs,
            "scale": args.scale,
            "command": " ".join([Path(sys.executable).name, "-m", "bench.peers", *sys.argv[1:]]),
        },
        started=started,
        path=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
