"""``durably batches``: listing, showing and processing batches made through the API."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import durably
from durably.cli import cli
from durably.job import Status

# Retries are far away, so a burst worker leaves retrying items retrying.
POLICY = durably.RetryPolicy(max_attempts=2, initial=1000.0, cap=1000.0, jitter="none")

TASKS = """
import durably

app = durably.Durably("sqlite:///elsewhere.db")


@app.operation("charge")
def charge(payload):
    if payload.get("fail") == "permanent":
        raise durably.Permanent(f"card {payload['n']} declined")
    if payload.get("fail") == "flaky":
        raise ConnectionError(f"gateway down for {payload['n']}")
    return payload["n"]
"""


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def app(url: str) -> Iterator[durably.Durably]:
    app = durably.Durably(url)

    @app.operation("charge", policy=POLICY)
    def charge(payload: Any) -> Any:
        if payload.get("fail") == "permanent":
            raise durably.Permanent(f"card {payload['n']} declined")
        if payload.get("fail") == "flaky":
            raise ConnectionError(f"gateway down for {payload['n']}")
        return payload["n"]

    @app.operation("single")
    def single(payload: Any) -> None:
        return None

    yield app
    app.close()


@pytest.fixture(autouse=True)
def _logging(restore_logging: None) -> None:
    """Every CLI test restores the root logger (see ``restore_logging``)."""


@pytest.fixture
def tasks_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module holding an app with the batch's handler, importable from the cwd."""
    (tmp_path / "durably_batch_tasks.py").write_text(TASKS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "durably_batch_tasks", raising=False)
    return "durably_batch_tasks"


def run(*args: str) -> Result:
    return CliRunner(env={"USER": "tester", "COLUMNS": "250"}).invoke(
        cli, list(args), catch_exceptions=False
    )


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def assert_one_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


def cells(line: str) -> list[str]:
    """The cells of a table row (or header) line; [] for rules and other lines."""
    return [cell.strip() for cell in re.split("[│┃]", line)[1:-1]]


@pytest.fixture
def worked(app: durably.Durably) -> durably.Durably:
    """Batch ``orders`` (2 succeed, 1 dead-lettered, 1 retrying), then batch ``refunds`` (1
    succeeds), then a job in no batch, the newest."""
    app.enqueue_batch(
        "orders",
        "charge",
        [{"n": 0}, {"n": 1}, {"n": 2, "fail": "permanent"}, {"n": 3, "fail": "flaky"}],
    )
    app.enqueue_batch("refunds", "charge", [{"n": 10}])
    app.run_worker(burst=True, concurrency=2, poll_interval=0.05)
    app.enqueue("single", {})
    return app


# -- ls ------------------------------------------------------------------------------------------


def test_ls_json_lists_recent_batches_newest_first_with_exact_counts(
    worked: durably.Durably, url: str
) -> None:
    listed = json.loads(ok(run("batches", "ls", "--url", url, "--json")).stdout)

    assert [(b["batch_id"], b["total"], b["done"]) for b in listed] == [
        ("refunds", 1, True),
        ("orders", 4, False),
    ]
    orders = listed[1]["counts"]
    assert {k: v for k, v in orders.items() if v} == {
        "succeeded": 2,
        "dead_letter": 1,
        "retrying": 1,
    }
    assert set(orders) == {s.value for s in Status}


def test_ls_only_looks_through_the_newest_scan_jobs_and_stops_at_limit(
    worked: durably.Durably, url: str
) -> None:
    def ids(*extra: str) -> list[str]:
        out = ok(run("batches", "ls", "--url", url, "--json", *extra)).stdout
        return [b["batch_id"] for b in json.loads(out)]

    assert ids("--scan", "1") == []  # the newest job is in no batch
    assert ids("--scan", "2") == ["refunds"]
    assert ids("--limit", "1") == ["refunds"]
    # Counts are exact even when the scan saw only part of a batch.
    partial = json.loads(ok(run("batches", "ls", "--url", url, "--json", "--scan", "3")).stdout)
    assert [(b["batch_id"], b["total"]) for b in partial] == [("refunds", 1), ("orders", 4)]


def test_ls_table_shows_counts_and_done(worked: durably.Durably, url: str) -> None:
    out = ok(run("batches", "ls", "--url", url)).stdout
    header = next(cells(line) for line in out.splitlines() if "dead_letter" in line)
    rows = {c[0]: dict(zip(header, c, strict=True)) for c in map(cells, out.splitlines()) if c}
    assert set(rows) == {"batch", "orders", "refunds"}

    assert rows["orders"]["total"] == "4"
    assert (rows["orders"]["succeeded"], rows["orders"]["dead_letter"]) == ("2", "1")
    assert (rows["orders"]["retrying"], rows["orders"]["done"]) == ("1", "no")
    assert (rows["refunds"]["succeeded"], rows["refunds"]["done"]) == ("1", "yes")


def test_ls_help_says_it_only_scans_the_newest_jobs() -> None:
    help_text = " ".join(ok(run("batches", "ls", "--help")).stdout.split())
    assert "among the newest --scan jobs" in help_text


def test_ls_on_an_empty_store_prints_an_empty_list(url: str) -> None:
    assert json.loads(ok(run("batches", "ls", "--url", url, "--json")).stdout) == []


# -- show ----------------------------------------------------------------------------------------


def test_show_json_has_counts_and_failing_items_with_reasons(
    worked: durably.Durably, url: str
) -> None:
    shown = json.loads(ok(run("batches", "show", "orders", "--url", url, "--json")).stdout)

    assert (shown["batch_id"], shown["total"], shown["done"]) == ("orders", 4, False)
    assert shown["counts"] == {"succeeded": 2, "dead_letter": 1, "retrying": 1}
    failing = [
        (f["item_index"], f["status"], f["attempts"], f["classification"], f["last_error"])
        for f in shown["failing"]
    ]
    assert failing == [
        (2, "dead_letter", 1, "permanent", "card 2 declined"),
        (3, "retrying", 1, "transient", "gateway down for 3"),
    ]
    jobs = {j.item_index: j.id for j in worked.jobs(durably.JobFilter(batch_id="orders"))}
    assert [f["job_id"] for f in shown["failing"]] == [jobs[2], jobs[3]]


def test_show_table_lists_failing_items(worked: durably.Durably, url: str) -> None:
    out = ok(run("batches", "show", "orders", "--url", url)).stdout

    assert "orders: 4 items" in out
    assert "not done" in out
    rows = {c[0]: c for c in map(cells, out.splitlines()) if c and c[0].isdigit()}
    assert set(rows) == {"2", "3"}
    assert rows["2"][2:] == ["dead_letter", "1", "permanent", "card 2 declined"]
    assert rows["3"][2:] == ["retrying", "1", "transient", "gateway down for 3"]


def test_show_a_finished_batch_says_done_with_no_failing_items(
    worked: durably.Durably, url: str
) -> None:
    shown = json.loads(ok(run("batches", "show", "refunds", "--url", url, "--json")).stdout)
    assert (shown["done"], shown["counts"], shown["failing"]) == (True, {"succeeded": 1}, [])


def test_show_an_unknown_batch_is_one_error_line(worked: durably.Durably, url: str) -> None:
    line = assert_one_error(run("batches", "show", "nope", "--url", url), 1)
    assert line == "error: no batch named 'nope'"


# -- process -------------------------------------------------------------------------------------


def test_process_runs_pending_and_retrying_items_and_prints_the_counts(
    app: durably.Durably, url: str, tasks_module: str, tmp_path: Path
) -> None:
    app.enqueue_batch(
        "payouts",
        "charge",
        [{"n": 0}, {"n": 1, "fail": "permanent"}, {"n": 2, "fail": "flaky"}],
        delay=1000.0,  # not due: only processing the batch runs them now
    )

    first = ok(
        run("batches", "process", "payouts", "--import", tasks_module, "--url", url, "--json")
    )

    assert json.loads(first.stdout) == {
        "batch_id": "payouts",
        "total_items": 3,
        "success_count": 1,
        "retry_count": 1,
        "manual_count": 1,
        "failed_count": 0,
    }
    summary = app.batch("payouts")
    assert dict(summary.counts) == {
        Status.SUCCEEDED: 1,
        Status.DEAD_LETTER: 1,
        Status.RETRYING: 1,
    }
    assert not (tmp_path / "elsewhere.db").exists()

    # Run again: the retrying item runs at once, fails its last attempt, goes to a person.
    second = ok(run("batches", "process", "payouts", "--import", tasks_module, "--url", url))
    lines = dict(line.split(":", 1) for line in second.stdout.splitlines())
    assert {k: int(v) for k, v in lines.items()} == {
        "total": 3,
        "succeeded": 0,
        "retry scheduled": 0,
        "sent to manual handling": 1,
        "failed to update": 0,
    }
    assert app.batch("payouts").done


def test_process_an_unknown_batch_is_one_error_line(
    app: durably.Durably, url: str, tasks_module: str
) -> None:
    result = run("batches", "process", "nope", "--import", tasks_module, "--url", url)
    assert assert_one_error(result, 1) == "error: no batch named 'nope'"


def test_process_without_an_import_is_a_usage_error(url: str) -> None:
    result = run("batches", "process", "orders", "--url", url)
    assert "--import" in assert_one_error(result, 2)
