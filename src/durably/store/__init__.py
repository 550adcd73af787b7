"""Stores: where jobs live. ``from_url`` picks one by URL scheme."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from durably.errors import ConfigError
from durably.store.base import Store

__all__ = ["Store", "from_url", "mask_url"]


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def from_url(url: str, **options: Any) -> Store:
    """Open-able store for ``url``: ``sqlite:///path.db``, ``postgresql://...``, ``redis://...``.

    ``options`` go to the store's constructor (for example ``schema=`` for PostgreSQL or
    ``prefix=`` for Redis). The store is not connected until ``await store.open()``.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        from durably.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url, **options)
    if scheme in ("postgresql", "postgres"):
        try:
            from durably.store.postgres import PostgresStore
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise ConfigError(
                "PostgreSQL needs the 'postgres' extra: pip install 'durably[postgres]'"
            ) from exc
        return PostgresStore.from_url(url, **options)
    if scheme in ("redis", "rediss", "unix"):
        try:
            from durably.store.redis import RedisStore
        except ImportError as exc:  # pragma: no cover - depends on installed extras
            raise ConfigError(
                "Redis needs the 'redis' extra: pip install 'durably[redis]'"
            ) from exc
        return RedisStore.from_url(url, **options)
    raise ConfigError(
        f"unsupported store URL {mask_url(url)!r}: use sqlite:///path.db, "
        "postgresql://user@host/db or redis://host:6379/0"
    )
