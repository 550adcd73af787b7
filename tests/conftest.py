"""Fixtures shared by every test tier: real services, fresh namespaces, a fake clock."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

import pytest

from durably.errors import ConfigError
from durably.store import Store, from_url
from durably.testing import FakeClock

PG_URL = os.environ.get("DURABLY_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DURABLY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("DURABLY_REQUIRE_SERVICES") == "1"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip loudly when ``name`` is down on a laptop; fail when CI requires services."""
    if _reachable(host, port):
        return
    reason = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} and DURABLY_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {reason}; start it to run these tests")


def unique_name(prefix: str) -> str:
    """A fresh identifier for one test's schema or key prefix."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pg_url() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return PG_URL


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


STORE_KINDS = ("sqlite", "postgres", "redis")


def store_options(kind: str, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """URL and constructor options that give ``kind`` a namespace of its own."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'durably.db'}", {}
    if kind == "postgres":
        require_service("PostgreSQL", "127.0.0.1", 5432)
        return PG_URL, {"schema": unique_name("durably_test")}
    if kind == "redis":
        require_service("Redis", "127.0.0.1", 6379)
        return REDIS_URL, {"prefix": unique_name("durably-test")}
    raise ValueError(kind)


async def drop_namespace(store: Store) -> None:
    """Remove everything a test store created (its schema or its keys)."""
    dropper = getattr(store, "drop_namespace", None)
    if dropper is not None:
        await dropper()


@pytest.fixture
def make_store(tmp_path: Any) -> Callable[..., Store]:
    """Build (unopened) stores of a kind, each in a fresh namespace; the caller opens, drops
    (``drop_namespace``) and closes them."""

    def build(kind: str, clock: Callable[[], datetime] | None = None, **extra: Any) -> Store:
        url, options = store_options(kind, tmp_path)
        options.update(extra)
        return from_url(url, clock=clock, **options)

    return build


@pytest.fixture(params=STORE_KINDS)
async def store(
    request: pytest.FixtureRequest, tmp_path: Any, clock: FakeClock
) -> AsyncIterator[Store]:
    """An opened store of every kind, on a fake clock, in a fresh namespace."""
    url, options = store_options(request.param, tmp_path)
    try:
        st = from_url(url, clock=clock.now, **options)
    except (ImportError, ConfigError) as exc:  # a backend or its extra is not installed
        pytest.skip(f"{request.param} store unavailable: {exc}")
    await st.open()
    try:
        yield st
    finally:
        await drop_namespace(st)
        await st.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo the root-logger set-up `durably worker` does, as a program should, after a test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
