"""Other Python job queues, run through durably's workloads on the same machine in the same run.

``python -m bench.peers`` (or ``make bench-peers``) measures them; ``docs/performance.md`` puts
the figures beside durably's. Each adapter names the peer's best settings on this machine.
"""

from __future__ import annotations

import importlib

from bench.peers.harness import Adapter

__all__ = ["ADAPTERS", "load"]

ADAPTERS: dict[str, str] = {
    "huey/sqlite": "bench.peers.huey_peer:SqliteAdapter",
    "huey/postgres": "bench.peers.huey_peer:PostgresAdapter",
    "huey/redis": "bench.peers.huey_peer:RedisAdapter",
    "procrastinate/postgres": "bench.peers.procrastinate_peer:PostgresAdapter",
    "rq/redis": "bench.peers.rq_peer:RedisAdapter",
    "dramatiq/redis": "bench.peers.dramatiq_peer:RedisAdapter",
}
"""``peer/store`` to ``module:class``, imported only when that peer runs."""


def load(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``."""
    module, _, attr = ADAPTERS[name].partition(":")
    adapter: type[Adapter] = getattr(importlib.import_module(module), attr)
    return adapter
