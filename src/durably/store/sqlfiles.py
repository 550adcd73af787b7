"""Loading SQL from the package: named queries and versioned migrations.

Queries live in ``store/sql/<dialect>/*.sql`` split by ``-- name: <query_name>`` headers;
migrations in ``store/migrations/<dialect>/NNN_description.sql``. Nothing else in durably holds
SQL text.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from importlib import resources

__all__ = ["Migration", "load_migrations", "load_queries"]

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: applied in ``version`` order, recorded by version and name."""

    version: int
    name: str
    sql: str


@functools.cache
def load_queries(dialect: str) -> dict[str, str]:
    """Every named query of ``dialect``; a duplicate name is a packaging bug and raises."""
    queries: dict[str, str] = {}
    folder = resources.files("durably.store") / "sql" / dialect
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        text = entry.read_text(encoding="utf-8")
        parts = _NAME.split(text)
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise RuntimeError(f"query {name!r} is defined twice in {dialect} SQL files")
            queries[name] = (
                body.strip().rstrip(";").strip() if dialect != "sqlite" else body.strip()
            )
    return queries


@functools.cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    """The migrations of ``dialect`` in version order; gaps or duplicates raise."""
    folder = resources.files("durably.store") / "migrations" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise RuntimeError(
                f"{dialect} migrations must be numbered 001, 002, ... without gaps; "
                f"found {migration.version:03d} where {expected:03d} belongs"
            )
    return tuple(found)
