"""``python -m bench``: run the workloads against the stores, print a table, write JSON.

    python -m bench [--stores sqlite,postgres,redis] [--workloads W1,W2,W3,W4] [--runs 3]
                    [--scale 1.0] [--json PATH]

Exits 1 when any correctness check failed (a job lost, duplicated, or run early).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from bench import workloads
from bench.workloads import PG_URL, REDIS_URL, STORE_KINDS, BenchFailure

WORKLOADS = ("W1", "W2", "W3", "W4")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"

Case = tuple[dict[str, Any], Callable[[], dict[str, Any]]]
"""A row's identity (store, workload, variant; a peer's ``system``) and one run of it."""


class Sizes(NamedTuple):
    """Each workload's job counts at a ``--scale``."""

    drain: int
    retry: int
    latency: int
    backlog: int

    @classmethod
    def at(cls, scale: float) -> Sizes:
        """The issue's counts times ``scale``, each at least a handful."""

        def scaled(base: int, minimum: int) -> int:
            return max(minimum, round(base * scale))

        return cls(scaled(20_000, 10), scaled(3_000, 10), scaled(200, 5), scaled(200_000, 50))


def _row(kind: str, workload: str, variant: str) -> dict[str, Any]:
    return {"store": kind, "workload": workload, "variant": variant}


def _sync(
    factory: Callable[..., Coroutine[Any, Any, dict[str, Any]]], *args: Any, **kwargs: Any
) -> Callable[[], dict[str, Any]]:
    """One run of an async workload, in an event loop of its own."""
    return lambda: asyncio.run(factory(*args, **kwargs))


def cases(kind: str, names: Sequence[str], scale: float, concurrency: int) -> list[Case]:
    """The rows and runs of durably on one store."""
    drain, retry, latency, backlog = Sizes.at(scale)
    out: list[Case] = []
    if "W1" in names:
        for procs in (1, 2):
            out.append(
                (
                    _row(kind, "W1", f"{drain} jobs, {procs} proc x {concurrency}"),
                    _sync(
                        workloads.w1_drain,
                        kind,
                        jobs=drain,
                        processes=procs,
                        concurrency=concurrency,
                    ),
                )
            )
    if "W2" in names:
        out.append(
            (
                _row(kind, "W2", f"{retry} jobs x 3 attempts"),
                _sync(workloads.w2_retry, kind, jobs=retry, concurrency=concurrency),
            )
        )
    if "W3" in names:
        out.append(
            (
                _row(kind, "W3", f"{latency} jobs, 20 ms apart"),
                _sync(workloads.w3_latency, kind, jobs=latency, concurrency=concurrency),
            )
        )
    if "W4" in names:
        out.append(
            (
                _row(kind, "W4", f"{latency} jobs + {backlog} ahead"),
                _sync(
                    workloads.w4_backlog,
                    kind,
                    jobs=latency,
                    backlog=backlog,
                    concurrency=concurrency,
                ),
            )
        )
    return out


def store_versions(kinds: Sequence[str]) -> dict[str, str]:
    """Server versions of the stores benchmarked (or why they could not be read)."""
    versions: dict[str, str] = {}
    if "sqlite" in kinds:
        versions["sqlite"] = sqlite3.sqlite_version
    if "postgres" in kinds:
        try:
            import psycopg

            with psycopg.connect(PG_URL, connect_timeout=3) as conn:
                number = conn.info.server_version
            versions["postgres"] = f"{number // 10000}.{number % 10000}"
        except Exception as exc:  # report, do not stop: the workloads will fail loudly
            versions["postgres"] = f"unavailable: {exc}"
    if "redis" in kinds:
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
            try:
                versions["redis"] = str(client.info("server")["redis_version"])
            finally:
                client.close()
        except Exception as exc:
            versions["redis"] = f"unavailable: {exc}"
    return versions


def machine(kinds: Sequence[str]) -> dict[str, Any]:
    """Where the numbers come from."""
    import durably

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "durably": getattr(durably, "__version__", "unknown"),
        "stores": store_versions(kinds),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fmt(value: Any, digits: int = 0) -> str:
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _summary(workload: str, runs: list[dict[str, Any]]) -> list[str]:
    """Throughput, latency and extra cells of one row (medians over runs)."""

    def med(field: str) -> float:
        return workloads.median_of(runs, field)

    if workload == "W1":
        return [
            _fmt(med("enqueue_jobs_per_s")),
            f"{_fmt(med('processed_jobs_per_s'))} ({_fmt(med('wall_jobs_per_s'))} wall)",
            "-",
            "",
        ]
    if workload == "W2":
        lateness = f"late p50 {_fmt(med('retry_lateness_p50_ms'), 1)} / p99 " + _fmt(
            med("retry_lateness_p99_ms"), 1
        )
        return [
            "-",
            f"{_fmt(med('wall_jobs_per_s'))} wall",
            f"{lateness} ms",
            f"{_fmt(med('attempts'))} attempts, {_fmt(med('wall_s'), 2)} s",
        ]
    latency = (
        f"p50 {_fmt(med('latency_p50_ms'), 1)} / p99 {_fmt(med('latency_p99_ms'), 1)}"
        f" / max {_fmt(med('latency_max_ms'), 1)} ms"
    )
    extra = (
        f"after enqueue returned: p50 {_fmt(med('after_commit_p50_ms'), 1)} / p99 "
        f"{_fmt(med('after_commit_p99_ms'), 1)} ms"
    )
    if workload == "W4":
        extra += (
            f"; backlog {_fmt(med('backlog'))} untouched, enqueued at "
            f"{_fmt(med('backlog_enqueue_jobs_per_s'))}/s"
        )
    return ["-", "-", latency, extra]


def run_cases(all_cases: Sequence[Case], runs: int) -> list[dict[str, Any]]:
    """Every case, ``runs`` times; failures are recorded, not raised."""
    console = Console(stderr=True)
    results: list[dict[str, Any]] = []
    for row, run in all_cases:
        entry: dict[str, Any] = {**row, "runs": [], "failures": []}
        label = " ".join(filter(None, [row.get("system"), row["store"], row["workload"]]))
        for n in range(runs):
            console.print(f"[bold]{label}[/] {row['variant']} (run {n + 1}/{runs}) ...")
            started = time.perf_counter()
            try:
                result = run()
            except BenchFailure as exc:
                console.print(f"[bold red]FAIL[/] {label}: {exc}")
                entry["failures"].append(str(exc))
                continue
            except Exception as exc:
                console.print(f"[bold red]ERROR[/] {label}: {exc!r}")
                traceback.print_exc()
                entry["failures"].append(f"{type(exc).__name__}: {exc}")
                continue
            result["elapsed_s"] = time.perf_counter() - started
            entry["runs"].append(result)
        results.append(entry)
    return results


def publish(
    results: list[dict[str, Any]],
    *,
    title: str,
    stores: Sequence[str],
    arguments: dict[str, Any],
    started: float,
    path: Path,
) -> int:
    """Print the table, write the JSON report; 1 when any check failed."""
    report = {
        "machine": machine(stores),
        "arguments": arguments,
        "elapsed_s": time.perf_counter() - started,
        "results": results,
    }
    Console(width=180).print(render(results, title))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    Console(stderr=True).print(f"results written to {path}")
    failed = [
        " ".join(filter(None, [e.get("system"), e["store"], e["workload"]]))
        for e in results
        if e["failures"]
    ]
    if failed:
        Console(stderr=True).print(f"[bold red]FAILED[/]: {', '.join(failed)}")
        return 1
    return 0


def render(
    results: list[dict[str, Any]], title: str = "durably benchmark (medians over runs)"
) -> Table:
    """The results as a Rich table (medians over runs); a first column names each system.

    Entries without a ``system`` (this benchmark's own) are durably's.
    """
    table = Table(title=title)
    table.add_column("system")
    for column in ("store", "workload", "variant", "enqueue/s", "processed/s", "latency"):
        table.add_column(column, justify="left" if column in ("store", "variant") else "right")
    table.add_column("peak RSS MB", justify="right")
    table.add_column("notes")
    table.add_column("check")
    for entry in results:
        runs = entry["runs"]
        check = "[red]FAIL[/]" if entry["failures"] else "[green]ok[/]"
        system = entry.get("system", "durably")
        if not runs:
            table.add_row(
                system, entry["store"], entry["workload"], entry["variant"], *["-"] * 5, check
            )
            continue
        enq, processed, latency, extra = _summary(entry["workload"], runs)
        rss = _fmt(workloads.median_of(runs, "peak_rss_mb"), 1)
        table.add_row(
            system,
            entry["store"],
            entry["workload"],
            entry["variant"],
            enq,
            processed,
            latency,
            rss,
            extra,
            check,
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print and save; 1 when any check failed."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--stores", default=",".join(STORE_KINDS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    names = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    unknown = [k for k in kinds if k not in STORE_KINDS] + [w for w in names if w not in WORKLOADS]
    if unknown or args.runs < 1 or args.scale <= 0:
        parser.error(f"bad arguments: {unknown or 'runs >= 1 and scale > 0'}")
    started = time.perf_counter()
    results = run_cases(
        [c for k in kinds for c in cases(k, names, args.scale, args.concurrency)], args.runs
    )
    return publish(
        results,
        title="durably benchmark (medians over runs)",
        stores=kinds,
        arguments={
            "stores": kinds,
            "workloads": names,
            "runs": args.runs,
            "scale": args.scale,
            "concurrency": args.concurrency,
            "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        },
        started=started,
        path=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
