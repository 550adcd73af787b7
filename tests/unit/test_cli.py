"""The ``durably`` command, driven with click's CliRunner against a temporary SQLite file."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import durably
from durably.cli import cli
from durably.job import Status


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def app(url: str) -> Iterator[durably.Durably]:
    app = durably.Durably(url)

    @app.operation("send", policy=durably.RetryPolicy(max_attempts=1))
    def send(payload: Any) -> Any:
        if isinstance(payload, dict) and payload.get("fail"):
            raise durably.Permanent(f"customer {payload['fail']} does not exist")
        return {"sent": payload}

    @app.operation("report", queue="reports")
    def report(payload: Any) -> None:
        return None

    yield app
    app.close()


@pytest.fixture(autouse=True)
def _logging(restore_logging: None) -> None:
    """Every CLI test restores the root logger (see ``restore_logging``)."""


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env={"USER": "tester", "COLUMNS": "250", **(env or {})}).invoke(
        cli, list(args), catch_exceptions=False
    )


def dead_job(app: durably.Durably, customer: int = 7) -> durably.Job:
    job = app.enqueue("send", {"fail": customer})
    app.run_worker(burst=True, concurrency=1, poll_interval=0.05)
    dead = app.get(job.id)
    assert dead.status is Status.DEAD_LETTER
    return dead


def assert_one_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


# -- reading --------------------------------------------------------------------------------------


def test_ls_json_lists_the_jobs_created_through_the_api(app: durably.Durably, url: str) -> None:
    first = app.enqueue("send", {"n": 1})
    second = app.enqueue("report", {"n": 2})

    result = run("jobs", "ls", "--url", url, "--json")

    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [(j["id"], j["handler"], j["queue"], j["status"]) for j in listed] == [
        (second.id, "report", "reports", "pending"),
        (first.id, "send", "default", "pending"),
    ]
    assert listed[1]["payload"] == {"n": 1}


def test_ls_filters_by_status_handler_and_queue(app: durably.Durably, url: str) -> None:
    dead = dead_job(app)
    waiting = app.enqueue("report", {"n": 2})

    by_status = json.loads(
        run("jobs", "ls", "--url", url, "--json", "--status", "dead_letter").stdout
    )
    by_queue = json.loads(run("jobs", "ls", "--url", url, "--json", "--queue", "reports").stdout)
    by_class = json.loads(
        run("jobs", "ls", "--url", url, "--json", "--classification", "permanent").stdout
    )

    assert [j["id"] for j in by_status] == [dead.id]
    assert [j["id"] for j in by_queue] == [waiting.id]
    assert [j["id"] for j in by_class] == [dead.id]


def test_ls_table_shows_status_attempts_and_error(app: durably.Durably, url: str) -> None:
    dead = dead_job(app, customer=42)

    result = run("jobs", "ls", "--url", url)

    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if f" {dead.id} " in line)
    assert "dead_letter" in row
    assert "send" in row
    assert "1/1" in row
    assert "permanent" in row
    assert "customer 42 does not exist" in row


def test_show_prints_fields_attempts_and_audit(app: durably.Durably, url: str) -> None:
    dead = dead_job(app)
    app.requeue(dead.id, actor="alice", notes="customer created")

    table = run("jobs", "show", str(dead.id), "--url", url)
    as_json = json.loads(run("jobs", "show", str(dead.id), "--url", url, "--json").stdout)

    assert table.exit_code == 0, table.output
    assert "attempts (1)" in table.stdout
    assert "audit (1)" in table.stdout
    assert "customer 7 does not exist" in table.stdout
    assert "alice" in table.stdout
    assert "customer created" in table.stdout
    assert as_json["job"]["id"] == dead.id
    assert as_json["job"]["status"] == "pending"
    assert [a["classification"] for a in as_json["attempts"]] == ["permanent"]
    assert [
        (e["actor"], e["action"], e["from_status"], e["to_status"]) for e in as_json["audit"]
    ] == [("alice", "requeue", "dead_letter", "pending")]


def test_stats_counts_per_queue_and_status(app: durably.Durably, url: str) -> None:
    dead_job(app)
    app.enqueue("send", {"n": 1})
    app.enqueue("report", {"n": 2})
    app.enqueue("report", {"n": 3})

    document = json.loads(run("stats", "--url", url, "--json").stdout)
    table = run("stats", "--url", url)

    assert document["queues"]["default"]["dead_letter"] == 1
    assert document["queues"]["default"]["pending"] == 1
    assert document["queues"]["reports"]["pending"] == 2
    assert document["totals"]["pending"] == 3
    assert document["total"] == 4
    rows = [line.split("│") for line in table.stdout.splitlines() if line.startswith("│")]
    total_row = next(cells for cells in rows if cells[1].strip() == "total")
    assert [cell.strip() for cell in total_row[2:-1]] == [
        "3", "0", "0", "0", "1", "0", "0", "0", "4"
    ]  # fmt: skip


# -- acting ---------------------------------------------------------------------------------------


def test_retry_requeues_and_audits_the_actor(app: durably.Durably, url: str) -> None:
    dead = dead_job(app)

    result = run(
        "jobs", "retry", str(dead.id), "--url", url, "--actor", "alice", "--notes", "fixed",
        "--reset-attempts", "--expected-version", str(dead.version),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert f"requeued job {dead.id}: now pending" in result.stdout
    job = app.get(dead.id)
    assert job.status is Status.PENDING
    assert job.attempts == 0
    [entry] = app.audit(dead.id)
    assert (entry.actor, entry.action, entry.notes) == ("alice", "requeue", "fixed")


def test_actor_defaults_to_the_login_name(app: durably.Durably, url: str) -> None:
    dead = dead_job(app)

    result = run("jobs", "resolve", str(dead.id), "--url", url, env={"USER": "carol"})

    assert result.exit_code == 0, result.output
    assert "warning: no --notes" in result.stderr
    [entry] = app.audit(dead.id)
    assert entry.actor == "carol"
    assert app.get(dead.id).status is Status.RESOLVED


@pytest.mark.parametrize(
    ("command", "status"),
    [("resolve", Status.RESOLVED), ("abandon", Status.ABANDONED), ("cancel", Status.CANCELLED)],
)
def test_operator_actions_change_status_and_are_audited(
    app: durably.Durably, url: str, command: str, status: Status
) -> None:
    dead = dead_job(app)

    result = run(
        "jobs", command, str(dead.id), "--url", url, "--actor", "bob", "--notes", "ticket 12",
        "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == status.value
    assert app.get(dead.id).status is status
    [entry] = app.audit(dead.id)
    assert (entry.actor, entry.action, entry.to_status, entry.notes) == (
        "bob", command, status.value, "ticket 12"
    )  # fmt: skip


def test_cancel_a_pending_job(app: durably.Durably, url: str) -> None:
    job = app.enqueue("send", {"n": 1})

    result = run("jobs", "cancel", str(job.id), "--url", url, "--actor", "dave")

    assert result.exit_code == 0, result.output
    assert app.get(job.id).status is Status.CANCELLED
    assert app.audit(job.id)[0].actor == "dave"


def test_bulk_requeue_takes_only_the_matching_jobs(app: durably.Durably, url: str) -> None:
    first, second = dead_job(app, 1), dead_job(app, 2)
    waiting = app.enqueue("report", {"n": 3})

    result = run(
        "jobs", "requeue", "--url", url, "--status", "dead_letter", "--handler", "send",
        "--classification", "permanent", "--actor", "ops", "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["requeued"]) == [first.id, second.id]
    assert app.get(first.id).status is Status.PENDING
    assert app.get(second.id).status is Status.PENDING
    assert app.get(waiting.id).version == waiting.version
    assert [e.actor for e in app.audit(first.id)] == ["ops"]


# -- mistakes -------------------------------------------------------------------------------------


def test_bad_url_scheme_is_a_usage_error_without_the_password() -> None:
    result = run("jobs", "ls", "--url", "mysql://admin:hunter2@db.example/jobs")

    line = assert_one_error(result, 2)
    assert "unsupported store URL" in line
    assert "hunter2" not in result.output


def test_missing_sqlite_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = run("stats", "--url", f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}")

    assert "is missing" in assert_one_error(result, 2)


def test_unknown_job_id(app: durably.Durably, url: str) -> None:
    app.enqueue("send", {"n": 1})

    assert (
        assert_one_error(run("jobs", "show", "999", "--url", url), 1) == "error: no job with id 999"
    )


def test_invalid_transition(app: durably.Durably, url: str) -> None:
    job = app.enqueue("send", {"n": 1})

    result = run("jobs", "resolve", str(job.id), "--url", url, "--actor", "a", "--notes", "n")

    assert "cannot resolve job" in assert_one_error(result, 1)
    assert app.get(job.id).status is Status.PENDING


def test_version_conflict(app: durably.Durably, url: str) -> None:
    dead = dead_job(app)

    result = run(
        "jobs", "retry", str(dead.id), "--url", url, "--actor", "a",
        "--expected-version", str(dead.version - 1),
    )  # fmt: skip

    assert "changed: expected version" in assert_one_error(result, 1)
    assert app.get(dead.id).status is Status.DEAD_LETTER


def test_unreachable_store() -> None:
    result = run("stats", "--url", "redis://127.0.0.1:1/0")

    assert "unavailable" in assert_one_error(result, 1)


def test_missing_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))

    result = run("worker", "--import", "no_such_module_for_durably", "--burst")

    assert "cannot import 'no_such_module_for_durably'" in assert_one_error(result, 2)


def test_import_without_an_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "durably_cli_empty.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "durably_cli_empty", raising=False)

    result = run("worker", "--import", "durably_cli_empty", "--burst")

    assert "no durably.Durably app found" in assert_one_error(result, 2)


# -- worker, migrate, version ---------------------------------------------------------------------


def test_worker_runs_the_module_app_on_the_given_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    (tmp_path / "durably_cli_tasks.py").write_text(
        "import durably\n"
        "app = durably.Durably('sqlite:///elsewhere.db')\n"
        "@app.operation('double')\n"
        "def double(payload):\n"
        "    return payload * 2\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "durably_cli_tasks", raising=False)
    producer = durably.Durably(url, strict=False)
    job = producer.enqueue("double", 21)

    assert gc.get_freeze_count() == 0
    try:
        result = run(
            "worker", "--import", "durably_cli_tasks", "--url", url, "--burst",
            "--concurrency", "2", "--poll", "0.05",
        )  # fmt: skip
        # The process is the worker's: its start-up heap is frozen out of the collector.
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process is not

    assert result.exit_code == 0, result.output
    done = producer.get(job.id)
    producer.close()
    assert (done.status, done.result) == (Status.SUCCEEDED, 42)
    assert f"[job {job.id}]" in result.stderr
    assert not (tmp_path / "elsewhere.db").exists()


def test_migrate_dry_run_lists_pending_migrations_without_applying(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"

    dry = run("migrate", "--url", url, "--dry-run")
    again = run("migrate", "--url", url, "--dry-run", "--json")
    applied = run("migrate", "--url", url)
    after = run("migrate", "--url", url)

    assert dry.exit_code == 0, dry.output
    assert "pending: 001_initial" in dry.stdout
    assert "CREATE TABLE jobs" in dry.stdout
    pending = json.loads(again.stdout)["migrations"]
    assert pending[0]["name"] == "001_initial"
    assert "CREATE TABLE jobs" in pending[0]["sql"]
    assert "applied: 001_initial" in applied.stdout
    assert "up to date" in after.stdout


def test_version() -> None:
    result = run("version", "--json")

    assert json.loads(result.stdout)["durably"] == durably.__version__
