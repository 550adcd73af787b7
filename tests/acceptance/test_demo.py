"""``durably demo`` end to end: a real subprocess, real worker processes, a real HTTP endpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import durably
from durably.demo import DONE, expected_outcomes, script

SUMMARY = re.compile(
    r"summary: total=(?P<total>\d+) succeeded_first_time=(?P<first>\d+) "
    r"succeeded_after_retries=(?P<later>\d+) dead_letter=(?P<dead>\d+) \((?P<classes>[^)]*)\)"
)


def test_demo_finishes_every_job_as_the_seed_scripted(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("DURABLY_URL", None)

    done = subprocess.run(
        [sys.executable, "-m", "durably.cli", "demo", "--jobs", "60", "--seed", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    match = SUMMARY.search(done.stdout)
    assert match, done.stdout
    total, first, later, dead = (int(match[k]) for k in ("total", "first", "later", "dead"))
    by_class = dict(pair.split("=") for pair in match["classes"].split())
    assert total == 60
    assert first + later + dead == 60
    assert sum(int(n) for n in by_class.values()) == dead
    expected = expected_outcomes(1, 60)
    assert {"succeeded_first_time": first, "succeeded_after_retries": later} == {
        "succeeded_first_time": expected["succeeded_first_time"],
        "succeeded_after_retries": expected["succeeded_after_retries"],
    }
    assert {k: int(v) for k, v in by_class.items()} == {
        k: v for k, v in expected.items() if k in ("http_4xx", "exhausted")
    }
    assert "durably jobs ls --url sqlite:///demo.db --status dead_letter" in done.stdout

    with durably.Durably(f"sqlite:///{tmp_path / 'demo.db'}") as app:
        counts = app.stats()
        assert sum(counts.values()) == 60
        assert {status for (_queue, status), n in counts.items() if n} <= DONE
        batch = app.batch("demo-batch")
        assert batch.total == 20
        assert batch.done


def test_the_script_covers_every_kind_of_ending() -> None:
    outcomes = expected_outcomes(42, 300)

    assert sum(outcomes.values()) == 300
    assert outcomes["succeeded_first_time"] > 150
    assert outcomes["succeeded_after_retries"] > 0
    assert outcomes["http_4xx"] > 0
    assert outcomes["exhausted"] > 0
    assert script(42, 7) == script(42, 7)
    assert [script(1, i) for i in range(50)] != [script(2, i) for i in range(50)]
