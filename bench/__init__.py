"""Benchmarks of durably's stores and worker: ``python -m bench`` (see docs/performance.md)."""

from __future__ import annotations
