"""Worker subprocesses on every store kind, each test in a namespace of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import STORE_KINDS, drop_namespace, store_options
from durably import ConfigError, Durably
from durably.store import from_url

from .tasks import make_app

REPO = Path(__file__).resolve().parents[2]
# Polls of the store or of files a subprocess writes are bounded by this; a test that reaches it
# has failed.
DEADLINE = 20.0


@dataclasses.dataclass
class Target:
    """A store a worker subprocess and the test share: URL, namespace and the test's own app."""

    kind: str
    url: str
    options: dict[str, Any]
    app: Durably
    tmp_path: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLY_TEST_")}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env["DURABLY_TEST_URL"] = self.url
        env["DURABLY_URL"] = self.url
        if "schema" in self.options:
            env["DURABLY_TEST_SCHEMA"] = self.options["schema"]
        if "prefix" in self.options:
            env["DURABLY_TEST_PREFIX"] = self.options["prefix"]
        return env


@pytest.fixture(params=STORE_KINDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    url, options = store_options(request.param, tmp_path)
    try:
        app = make_app(url, **options)
    except (ImportError, ConfigError) as exc:  # a store module not written (or installed) yet
        pytest.skip(f"{request.param} store unavailable: {exc}")
    app.store()  # create (and migrate) the namespace before any worker starts
    try:
        yield Target(request.param, url, options, app, tmp_path)
    finally:
        app.close()

        async def drop() -> None:
            store = from_url(url, **options)
            await store.open()
            try:
                await drop_namespace(store)
            finally:
                await store.close()

        asyncio.run(drop())


@dataclasses.dataclass
class WorkerProcess:
    """A ``durably worker`` subprocess, its output in files (read them when a test fails)."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)


@pytest.fixture
def start_worker(target: Target) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str, *extra: str) -> WorkerProcess:
        out = target.tmp_path / f"{name}.out"
        err = target.tmp_path / f"{name}.err"
        command = [
            sys.executable,
            "-m",
            "durably.cli",
            "worker",
            "--url",
            target.url,
            "--import",
            "tests.acceptance.tasks",
            "--lease",
            "1",
            "--poll",
            "0.1",
            *extra,
        ]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                command, cwd=REPO, env=target.env(), stdout=stdout, stderr=stderr
            )
        worker = WorkerProcess(process, out, err)
        started.append(worker)
        return worker

    yield start
    for worker in started:  # only the processes this test started
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait(timeout=DEADLINE)


def wait_until(check: Callable[[], bool], what: str, worker: WorkerProcess | None = None) -> None:
    """Poll ``check`` until it holds, for at most :data:`DEADLINE` seconds."""
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            detail = f"\n--- worker output ---\n{worker.output()}" if worker else ""
            pytest.fail(f"gave up after {DEADLINE:g}s waiting for {what}{detail}")
        if worker is not None and worker.process.poll() is not None:
            if check():
                return
            pytest.fail(
                f"the worker exited ({worker.process.returncode}) before {what}:\n{worker.output()}"
            )
        time.sleep(0.05)
