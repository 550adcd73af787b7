"""The ``durably`` command: run workers, inspect jobs, act on them as an operator, migrate, demo.

Every command takes ``--url`` (default ``$DURABLY_URL``, then ``sqlite:///durably.db``); those
that print data take ``--json``. A user mistake prints one ``error: ...`` line on stderr and
exits 2 (bad usage or input) or 1 (not found, invalid transition, conflict, store failure).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from durably import __version__
from durably.app import DEFAULT_URL, Durably
from durably.batches import BatchSummary
from durably.errors import (
    ConfigError,
    Conflict,
    DurablyError,
    InvalidTransition,
    JobNotFound,
    PayloadError,
    SchemaTooNew,
    StoreError,
    UnknownHandler,
)
from durably.job import JSON, Job, JobFilter, Status
from durably.store import from_url, mask_url
from durably.store.sqlfiles import load_migrations

__all__ = ["BadImport", "cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])

USAGE_EXIT = 2
FAILURE_EXIT = 1

_STATUSES = [s.value for s in Status]
_SECRET_IN_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):[^@\s/]+@")
_ERROR_WIDTH = 60
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class BadImport(DurablyError):
    """The module named by ``--import`` / ``--app`` cannot be loaded or holds no app."""


# Which exit code each kind of mistake gets; the first matching class wins.
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (BadImport, USAGE_EXIT),
    (ConfigError, USAGE_EXIT),
    (PayloadError, USAGE_EXIT),
    (UnknownHandler, USAGE_EXIT),
    (JobNotFound, FAILURE_EXIT),
    (InvalidTransition, FAILURE_EXIT),
    (Conflict, FAILURE_EXIT),
    (SchemaTooNew, FAILURE_EXIT),
    (StoreError, FAILURE_EXIT),  # StoreUnavailable included
    (DurablyError, FAILURE_EXIT),
)


def _one_line(message: str) -> str:
    """``message`` on one line with any URL password masked: errors must not leak secrets."""
    text = " ".join(message.split())
    return _SECRET_IN_URL.sub(r"\g<scheme>:***@", text)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {_one_line(message)}", err=True)
    raise click.exceptions.Exit(code)


class DurablyGroup(click.Group):
    """A click group that turns durably's exceptions into one ``error:`` line and an exit code.

    This is the CLI's only error-translation layer: commands just raise.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; translate known failures, hide tracebacks unless ``DURABLY_DEBUG``."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except Exception as exc:
            if os.environ.get("DURABLY_DEBUG"):
                raise
            for kind, code in _EXIT_CODES:
                if isinstance(exc, kind):
                    _fail(str(exc) or type(exc).__name__, code)
            _fail(
                f"unexpected {type(exc).__name__}: {exc} (set DURABLY_DEBUG=1 for the traceback)",
                FAILURE_EXIT,
            )


# -- shared options and helpers ----------------------------------------------------------------


def url_option(fn: F) -> F:
    """``--url``, from ``$DURABLY_URL``, else the default SQLite file."""
    return click.option(
        "--url",
        envvar="DURABLY_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="Store URL: sqlite:///path.db, postgresql://user@host/db or redis://host:6379/0 "
        "(env: DURABLY_URL).",
    )(fn)


def json_option(fn: F) -> F:
    """``--json``: machine-readable output instead of tables."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        fn
    )


def actor_option(fn: F) -> F:
    """``--actor``, defaulting to the login name."""
    return click.option(
        "--actor",
        default=None,
        help="Who is acting, recorded in the audit trail (default: $USER).",
    )(fn)


def _console() -> Console:
    # Created per call, so that output goes to whatever sys.stdout is now (tests swap it).
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped output (grep, files, tests) gets whole values rather than 80-column ellipses.
        console.width = 200
    return console


def _open_app(url: str) -> Durably:
    """An app on ``url`` (no operations needed to read or act), closed when the command ends."""
    app = Durably(url, strict=False)
    click.get_current_context().call_on_close(app.close)
    return app


def _actor(actor: str | None) -> str:
    who = actor or os.environ.get("USER") or os.environ.get("USERNAME")
    if not who or not who.strip():
        raise ConfigError("say who is acting with --actor (no $USER to default to)")
    return who


def _print_json(value: JSON) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False))


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _truncate(text: str | None, width: int = _ERROR_WIDTH) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _attempts(job: Job) -> str:
    return f"{job.attempts}/{'∞' if job.max_attempts is None else job.max_attempts}"


def _status_style(status: str) -> str:
    return {
        "succeeded": "green",
        "dead_letter": "bold red",
        "retrying": "yellow",
        "running": "cyan",
        "resolved": "blue",
        "abandoned": "magenta",
        "cancelled": "dim",
    }.get(status, "")


def _status_text(status: str) -> Text:
    return Text(status, style=_status_style(status))


def _add_row(table: Table, *cells: str | Text) -> None:
    """Add a row whose strings are shown as they are: job data may hold ``[markup]``."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def _print_job_line(verb: str, job: Job, as_json: bool) -> None:
    if as_json:
        _print_json(job.to_dict())
        return
    who = f" by {job.operator}" if job.operator else ""
    click.echo(f"{verb} job {job.id}: now {job.status.value} (version {job.version}){who}")


# -- the command tree --------------------------------------------------------------------------


@click.group(cls=DurablyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="durably")
def cli() -> None:
    """durably: operations that must not be lost.

    Jobs are stored durably, run by workers under leases, retried by policy, and end
    succeeded or dead-lettered, where operators resolve, requeue, abandon or cancel them.
    """


@cli.command()
@json_option
def version(as_json: bool) -> None:
    """Print durably's version."""
    if as_json:
        _print_json({"durably": __version__, "python": platform.python_version()})
    else:
        click.echo(f"durably {__version__} (Python {platform.python_version()})")


# -- worker -------------------------------------------------------------------------------------


class _JobFormatter(logging.Formatter):
    """Log lines that name the job they are about, when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        """Add ``[job N]`` to records that carry a ``job_id``."""
        job_id = getattr(record, "job_id", None)
        record.job = f" [job {job_id}]" if job_id is not None else ""
        return super().format(record)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JobFormatter("%(asctime)s %(levelname)-7s %(name)s%(job)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _import(name: str) -> Any:
    if not _MODULE.match(name):
        raise BadImport(f"{name!r} is not a module name (like myapp.tasks)")
    try:
        return importlib.import_module(name)  # allowed: the operator names the module to load
    except ImportError as exc:
        raise BadImport(f"cannot import {name!r}: {exc}") from exc
    except Exception as exc:
        raise BadImport(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def find_app(imports: Sequence[str], app_ref: str | None) -> Durably:
    """Import ``imports`` (and the module of ``app_ref``) and return the one ``Durably`` app.

    ``app_ref`` is ``module:attribute``; without it the imported modules must hold exactly one
    ``Durably`` instance among their attributes.
    """
    # Like other task runners: modules of the project the operator is in are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    modules = [_import(name) for name in imports]
    if app_ref is not None:
        module_name, sep, attr = app_ref.partition(":")
        if not sep or not attr:
            raise BadImport(f"--app must look like module:attribute, not {app_ref!r}")
        found = getattr(_import(module_name), attr, None)
        if not isinstance(found, Durably):
            raise BadImport(f"{app_ref!r} is not a durably.Durably app")
        return found
    if not modules:
        raise BadImport("name the module holding your operations with --import (or --app)")
    apps: list[Durably] = []
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, Durably) and all(value is not a for a in apps):
                apps.append(value)
    if not apps:
        raise BadImport(
            f"no durably.Durably app found in {', '.join(imports)}; name it with --app module:attr"
        )
    if len(apps) > 1:
        raise BadImport(
            f"{len(apps)} Durably apps found in {', '.join(imports)}; choose one with "
            "--app module:attr"
        )
    return apps[0]


@cli.command()
@click.option("--url", default=None, help="Store URL (default: the URL the app was created with).")
@click.option(
    "--import",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="Module registering operations (repeatable), e.g. myapp.tasks.",
)
@click.option("--app", "app_ref", default=None, metavar="MODULE:ATTR", help="The app to run.")
@click.option("--queue", "queues", multiple=True, help="Queue to work (repeatable; default: all).")
@click.option("--concurrency", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--prefetch",
    type=click.IntRange(min=0),
    default=None,
    help="Jobs claimed ahead of free slots (default: as many as --concurrency).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help=(
        "Most jobs one claim takes (default: concurrency + prefetch, and a quarter of "
        "--concurrency, at least 10, while retries are due within seconds)."
    ),
)
@click.option(
    "--retention",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Delete finished jobs this many seconds old (default: keep them).",
)
@click.option("--burst", is_flag=True, help="Exit once no job is due instead of waiting for more.")
@click.option(
    "--lease", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True
)
@click.option("--poll", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds running jobs get to finish after SIGTERM/SIGINT before being interrupted.",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
def worker(
    url: str | None,
    imports: tuple[str, ...],
    app_ref: str | None,
    queues: tuple[str, ...],
    concurrency: int,
    prefetch: int | None,
    batch_size: int | None,
    retention: float | None,
    burst: bool,
    lease: float,
    poll: float,
    shutdown_timeout: float,
    log_level: str,
) -> None:
    """Run a worker for the operations registered in your module(s).

    SIGTERM or Ctrl-C stops claiming, lets running jobs finish (up to --shutdown-timeout) and
    hands unstarted jobs back.
    """
    _setup_logging(log_level)
    app = find_app(imports, app_ref)
    if url is not None and url != app.url:
        app.use_url(url)
    if not app.operations:
        raise ConfigError("the app has no registered operations: nothing to run")
    stats = app.run_worker(
        queues=list(queues) or None,
        concurrency=concurrency,
        prefetch=prefetch,
        batch_size=batch_size,
        retention=retention,
        burst=burst,
        lease_seconds=lease,
        poll_interval=poll,
        shutdown_timeout=shutdown_timeout,
        freeze_heap=True,  # this process is the worker's
    )
    logging.getLogger("durably.cli").info(
        "worker finished on %s: %s", mask_url(app.url), stats or "no jobs"
    )


# -- jobs ---------------------------------------------------------------------------------------


@cli.group(cls=DurablyGroup)
def jobs() -> None:
    """List, inspect and act on jobs (every action is audited)."""


def _job_filter(
    statuses: Iterable[str],
    queue: str | None,
    handler: str | None,
    batch: str | None,
    classification: str | None,
) -> JobFilter:
    chosen = frozenset(Status(s) for s in statuses)
    return JobFilter(
        statuses=chosen or None,
        queue=queue,
        handler=handler,
        batch_id=batch,
        classification=classification,
    )


def filter_options(fn: F) -> F:
    """The options that narrow a job listing or a bulk action."""
    for option in reversed(
        [
            click.option("--queue", default=None, help="Only this queue."),
            click.option("--handler", default=None, help="Only this operation."),
            click.option("--batch", default=None, help="Only this batch id."),
            click.option(
                "--classification", default=None, help="Only this failure classification."
            ),
        ]
    ):
        fn = option(fn)
    return fn


@jobs.command("ls")
@url_option
@json_option
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_STATUSES),
    help="Only this status (repeatable).",
)
@filter_options
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--after", type=int, default=None, help="Page on: jobs older than this id.")
def jobs_ls(
    url: str,
    as_json: bool,
    statuses: tuple[str, ...],
    queue: str | None,
    handler: str | None,
    batch: str | None,
    classification: str | None,
    limit: int,
    after: int | None,
) -> None:
    """List jobs, newest first."""
    app = _open_app(url)
    where = _job_filter(statuses, queue, handler, batch, classification)
    found = app.jobs(where, limit=limit, after_id=after)
    if as_json:
        _print_json([job.to_dict() for job in found])
        return
    table = Table(title=f"jobs ({len(found)})", expand=False)
    for name, justify in (
        ("id", "right"),
        ("status", "left"),
        ("handler", "left"),
        ("queue", "left"),
        ("attempts", "right"),
        ("classification", "left"),
        ("last error", "left"),
        ("run at", "left"),
        ("updated", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for job in found:
        _add_row(
            table,
            str(job.id),
            _status_text(job.status.value),
            job.handler,
            job.queue,
            _attempts(job),
            job.classification or "",
            _truncate(job.last_error, 40),
            _when(job.run_at),
            _when(job.updated_at),
        )
    console = _console()
    console.print(table)
    if len(found) == limit:
        console.print(f"more may match: --after {found[-1].id}")


@jobs.command("show")
@click.argument("job_id", type=int)
@url_option
@json_option
def jobs_show(job_id: int, url: str, as_json: bool) -> None:
    """Show a job, its attempt history and its audit trail."""
    app = _open_app(url)
    job = app.get(job_id)
    attempts = app.attempts(job_id)
    audit = app.audit(job_id)
    if as_json:
        _print_json(
            {
                "job": job.to_dict(),
                "attempts": [a.to_dict() for a in attempts],
                "audit": [e.to_dict() for e in audit],
            }
        )
        return
    console = _console()
    fields = Table(title=f"job {job.id}", show_header=False)
    fields.add_column("field", style="bold")
    fields.add_column("value", overflow="fold")
    for name, value in job.to_dict().items():
        if value is None or value == {}:
            continue
        if name == "status":
            fields.add_row(name, _status_text(str(value)))
            continue
        if isinstance(value, dict | list):
            value = json.dumps(value, ensure_ascii=False)
        fields.add_row(name, Text(str(value)))
    console.print(fields)

    history = Table(title=f"attempts ({len(attempts)})")
    for column in ("#", "worker", "started", "duration", "outcome", "classification", "error"):
        history.add_column(column, overflow="fold")
    for attempt in attempts:
        error = ": ".join(x for x in (attempt.error_type, attempt.error_message) if x)
        _add_row(
            history,
            str(attempt.number),
            attempt.worker_id,
            _when(attempt.started_at),
            "" if attempt.duration is None else f"{attempt.duration:.3f}s",
            attempt.outcome or "running",
            attempt.classification or "",
            _truncate(error, 80),
        )
    console.print(history)

    trail = Table(title=f"audit ({len(audit)})")
    for column in ("at", "actor", "action", "from", "to", "version", "notes"):
        trail.add_column(column, overflow="fold")
    for entry in audit:
        _add_row(
            trail,
            _when(entry.at),
            entry.actor,
            entry.action,
            entry.from_status,
            entry.to_status,
            str(entry.version),
            entry.notes or "",
        )
    console.print(trail)


@jobs.command("retry")
@click.argument("job_id", type=int)
@url_option
@json_option
@actor_option
@click.option("--notes", default=None, help="Why, for the audit trail.")
@click.option("--reset-attempts", is_flag=True, help="Start counting attempts from zero again.")
@click.option(
    "--expected-version",
    type=int,
    default=None,
    help="Refuse (exit 1) if the job changed since you read this version.",
)
def jobs_retry(
    job_id: int,
    url: str,
    as_json: bool,
    actor: str | None,
    notes: str | None,
    reset_attempts: bool,
    expected_version: int | None,
) -> None:
    """Requeue a dead-lettered, cancelled, abandoned or retrying job to run now."""
    app = _open_app(url)
    job = app.requeue(
        job_id,
        actor=_actor(actor),
        notes=notes,
        reset_attempts=reset_attempts,
        expected_version=expected_version,
    )
    _print_job_line("requeued", job, as_json)


@jobs.command("requeue")
@url_option
@json_option
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_STATUSES),
    default=["dead_letter"],
    show_default=True,
    help="Requeue jobs in this status (repeatable).",
)
@filter_options
@actor_option
@click.option("--notes", default=None, help="Why, for the audit trail.")
@click.option("--reset-attempts", is_flag=True, help="Start counting attempts from zero again.")
@click.option("--limit", type=click.IntRange(min=1), default=10_000, show_default=True)
def jobs_requeue(
    url: str,
    as_json: bool,
    statuses: tuple[str, ...],
    queue: str | None,
    handler: str | None,
    batch: str | None,
    classification: str | None,
    actor: str | None,
    notes: str | None,
    reset_attempts: bool,
    limit: int,
) -> None:
    """Requeue every matching job (each one audited); jobs that change meanwhile are skipped."""
    app = _open_app(url)
    where = _job_filter(statuses, queue, handler, batch, classification)
    done = app.requeue_many(
        where, actor=_actor(actor), notes=notes, reset_attempts=reset_attempts, limit=limit
    )
    if as_json:
        _print_json({"requeued": [job.id for job in done], "count": len(done)})
    else:
        click.echo(f"requeued {len(done)} job{'s' if len(done) != 1 else ''}")


def _operator_action(
    verb: str, method: Callable[..., Job]
) -> Callable[[int, str, bool, str | None, str | None, int | None], None]:
    def command(
        job_id: int,
        url: str,
        as_json: bool,
        actor: str | None,
        notes: str | None,
        expected_version: int | None,
    ) -> None:
        app = _open_app(url)
        bound = getattr(app, method.__name__)
        job = bound(job_id, actor=_actor(actor), notes=notes, expected_version=expected_version)
        _print_job_line(verb, job, as_json)
        if not notes and verb != "cancelled":
            click.echo(
                f"warning: no --notes: the audit trail does not say why job {job_id} was {verb}",
                err=True,
            )

    return command


def _register_action(name: str, verb: str, method: Callable[..., Job], doc: str) -> None:
    command = _operator_action(verb, method)
    command.__doc__ = doc
    command.__name__ = f"jobs_{name}"
    decorated: Any = command
    for decorator in (
        click.option(
            "--expected-version",
            type=int,
            default=None,
            help="Refuse (exit 1) if the job changed since you read this version.",
        ),
        click.option(
            "--notes",
            default=None,
            help="Why (optional but recommended: it is what the next operator reads).",
        ),
        actor_option,
        json_option,
        url_option,
        click.argument("job_id", type=int),
    ):
        decorated = decorator(decorated)
    jobs.command(name)(decorated)


_register_action(
    "resolve",
    "resolved",
    Durably.resolve,
    "Mark a dead-lettered job as handled by a person. --notes is optional but recommended.",
)
_register_action(
    "abandon",
    "abandoned",
    Durably.abandon,
    "Give up on a dead-lettered job on purpose. --notes is optional but recommended.",
)
_register_action(
    "cancel",
    "cancelled",
    Durably.cancel,
    "Cancel a pending, retrying or dead-lettered job; a running job's worker is asked to stop.",
)


# -- batches ------------------------------------------------------------------------------------


@cli.group(cls=DurablyGroup)
def batches() -> None:
    """List, inspect and process batches (jobs enqueued together under a batch id)."""


def _batch_row(summary: BatchSummary) -> dict[str, JSON]:
    return {
        "batch_id": summary.batch_id,
        "total": summary.total,
        "done": summary.done,
        "counts": {s.value: summary.counts.get(s, 0) for s in Status},
    }


def _recent_batch_ids(app: Durably, limit: int, scan: int) -> list[str]:
    """Batch ids among the newest ``scan`` jobs, most recent first (the store has no index)."""
    found: dict[str, None] = {}
    after: int | None = None
    seen = 0
    while seen < scan and len(found) < limit:
        page = app.jobs(JobFilter(), limit=min(500, scan - seen), after_id=after)
        if not page:
            break
        for job in page:
            if job.batch_id is not None:
                found.setdefault(job.batch_id, None)
                if len(found) == limit:
                    break
        seen += len(page)
        after = page[-1].id
    return list(found)


@batches.command("ls")
@url_option
@json_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--scan",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="How many of the newest jobs to look through for batch ids.",
)
def batches_ls(url: str, as_json: bool, limit: int, scan: int) -> None:
    """List recent batches with their counts by status.

    The store keeps no index of batches: this lists the batches among the newest --scan jobs,
    most recent first, each with exact counts.
    """
    app = _open_app(url)
    summaries = [app.batch(batch_id) for batch_id in _recent_batch_ids(app, limit, scan)]
    if as_json:
        _print_json([_batch_row(summary) for summary in summaries])
        return
    table = Table(title=f"batches ({len(summaries)})")
    table.add_column("batch")
    table.add_column("total", justify="right", style="bold")
    for status in _STATUSES:
        table.add_column(status, justify="right", style=_status_style(status))
    table.add_column("done")
    for summary in summaries:
        _add_row(
            table,
            summary.batch_id,
            str(summary.total),
            *(str(summary.counts.get(Status(s), 0)) for s in _STATUSES),
            "yes" if summary.done else "no",
        )
    _console().print(table)


@batches.command("show")
@click.argument("batch_id")
@url_option
@json_option
def batches_show(batch_id: str, url: str, as_json: bool) -> None:
    """Show a batch: counts by status and its failing items with their reasons."""
    app = _open_app(url)
    summary = app.batch(batch_id)
    if summary.total == 0:
        _fail(f"no batch named {batch_id!r}", FAILURE_EXIT)
    if as_json:
        _print_json(summary.to_dict())
        return
    console = _console()
    counts = ", ".join(f"{s.value} {summary.counts[s]}" for s in Status if summary.counts.get(s, 0))
    console.print(
        Text(
            f"batch {summary.batch_id}: {summary.total} item{'s' if summary.total != 1 else ''}"
            f" ({counts}), {'done' if summary.done else 'not done'}"
        )
    )
    failing = Table(title=f"failing items ({len(summary.failing)})")
    for name, justify in (
        ("item", "right"),
        ("job id", "right"),
        ("status", "left"),
        ("attempts", "right"),
        ("classification", "left"),
        ("last error", "left"),
    ):
        failing.add_column(name, justify=justify)  # type: ignore[arg-type]
    for item in summary.failing:
        _add_row(
            failing,
            "" if item.item_index is None else str(item.item_index),
            str(item.job_id),
            _status_text(item.status.value),
            str(item.attempts),
            item.classification or "",
            _truncate(item.last_error),
        )
    console.print(failing)


@batches.command("process")
@click.argument("batch_id")
@click.option("--url", default=None, help="Store URL (default: the URL the app was created with).")
@click.option(
    "--import",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="Module registering the batch's operations (repeatable), e.g. myapp.tasks.",
)
@click.option("--app", "app_ref", default=None, metavar="MODULE:ATTR", help="The app to use.")
@json_option
def batches_process(
    batch_id: str, url: str | None, imports: tuple[str, ...], app_ref: str | None, as_json: bool
) -> None:
    """Run the batch's pending and retrying items now, in this process.

    Items are claimed under leases, so a worker running meanwhile never runs the same item.
    """
    app = find_app(imports, app_ref)
    if url is not None and url != app.url:
        app.use_url(url)
    click.get_current_context().call_on_close(app.close)
    result = app.process_batch(batch_id)
    if result.total_items == 0:
        _fail(f"no batch named {batch_id!r}", FAILURE_EXIT)
    if as_json:
        _print_json(result.to_dict())
        return
    for label, count in (
        ("total", result.total_items),
        ("succeeded", result.success_count),
        ("retry scheduled", result.retry_count),
        ("sent to manual handling", result.manual_count),
        ("failed to update", result.failed_count),
    ):
        click.echo(f"{label + ':':<25}{count}")


# -- stats --------------------------------------------------------------------------------------


def stats_document(counts: dict[tuple[str, Status], int]) -> dict[str, Any]:
    """Counts per queue and status, with totals, as JSON-ready data."""
    queues: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(_STATUSES, 0)
    for (queue, status), n in sorted(counts.items()):
        queues.setdefault(queue, dict.fromkeys(_STATUSES, 0))[status.value] = n
        totals[status.value] += n
    return {"queues": queues, "totals": totals, "total": sum(totals.values())}


@cli.command()
@url_option
@json_option
def stats(url: str, as_json: bool) -> None:
    """Job counts per queue and status, with totals."""
    app = _open_app(url)
    document = stats_document(app.stats())
    if as_json:
        _print_json(document)
        return
    table = Table(title=f"jobs on {mask_url(url)}")
    table.add_column("queue")
    for status in _STATUSES:
        table.add_column(status, justify="right", style=_status_style(status))
    table.add_column("total", justify="right", style="bold")
    for queue, row in document["queues"].items():
        table.add_row(queue, *(str(row[s]) for s in _STATUSES), str(sum(row.values())))
    totals = document["totals"]
    table.add_row(
        "total", *(str(totals[s]) for s in _STATUSES), str(document["total"]), style="bold"
    )
    _console().print(table)


# -- migrate ------------------------------------------------------------------------------------


def _dialect(url: str) -> str | None:
    """The SQL dialect whose migration files describe ``url``'s store (None: no SQL)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgres"
    return None


async def _migrate(url: str, dry_run: bool) -> list[str]:
    store = from_url(url, migrate_on_open=False)
    await store.open()
    try:
        return await store.migrate(dry_run=dry_run)
    finally:
        await store.close()


@cli.command()
@url_option
@json_option
@click.option("--dry-run", is_flag=True, help="List pending migrations (and their SQL) only.")
def migrate(url: str, as_json: bool, dry_run: bool) -> None:
    """Apply pending schema migrations (stores also migrate themselves when opened)."""
    names = asyncio.run(_migrate(url, dry_run))
    dialect = _dialect(url)
    sql = {}
    if dry_run and dialect is not None:
        sql = {f"{m.version:03d}_{m.name}": m.sql for m in load_migrations(dialect)}
    if as_json:
        _print_json(
            {
                "url": mask_url(url),
                "dry_run": dry_run,
                "migrations": [{"name": n, "sql": sql.get(n)} for n in names],
            }
        )
        return
    if not names:
        click.echo(f"{mask_url(url)} is up to date")
        return
    verb = "pending" if dry_run else "applied"
    for name in names:
        click.echo(f"{verb}: {name}")
        if name in sql:
            click.echo(f"-- {name}.sql\n{sql[name].rstrip()}\n")


# -- demo ---------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--url",
    default=None,
    help="Store URL for the demo (default: a fresh sqlite:///demo.db in this folder).",
)
@json_option
@click.option("--jobs", "n_jobs", type=click.IntRange(min=1, max=100_000), default=300)
@click.option("--workers", type=click.IntRange(min=1, max=32), default=2, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
def demo(url: str | None, as_json: bool, n_jobs: int, workers: int, seed: int) -> None:
    """Run jobs against a local flaky HTTP endpoint and summarise how each one ended."""
    from durably.demo import run_demo

    summary = run_demo(
        url=url, jobs=n_jobs, workers=workers, seed=seed, console=_console(), quiet=as_json
    )
    if as_json:
        _print_json(dataclasses.asdict(summary))
    if not summary.complete:
        raise click.exceptions.Exit(FAILURE_EXIT)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``durably`` script (exits with the command's code)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="durably")


if __name__ == "__main__":
    main()
