"""The shared store: PostgreSQL through psycopg 3, for many workers on many hosts.

Each store lives in its own schema, reached through ``search_path`` set on every pooled
connection, so the SQL files stay unqualified. Hot-path operations (claim, heartbeat, complete,
release, small enqueues) are single statements on autocommit connections: one round trip each,
atomic, and no lock survives the statement. Claims use ``FOR UPDATE SKIP LOCKED`` so claimers pass
each other by. Completions that owe outbox events, and bulk enqueues of jobs without keys (COPY,
the jobs built here rather than read back), take a short transaction instead. Enqueues, retries
and requeues ``pg_notify`` a channel named after the schema; ``wait`` listens on it through a
dedicated connection, so an idle worker wakes within milliseconds.

Producers that already hold a psycopg connection can enqueue inside their own transaction with
:meth:`PostgresStore.enqueue_with` (sync) or :meth:`PostgresStore.enqueue_with_async`: the job
exists if and only if they commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import operator
import re
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
from psycopg import sql
from psycopg.rows import RowMaker, dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from durably.errors import (
    ConfigError,
    Conflict,
    InvalidTransition,
    JobNotFound,
    KeyTaken,
    PayloadError,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from durably.events import batch_payload, event_type, processed_payload
from durably.job import (
    ACTIONS,
    EVENT_STATUSES,
    LIVE,
    Action,
    Attempt,
    AuditEntry,
    Completion,
    Event,
    Job,
    JobFilter,
    NewJob,
    Outcome,
    Status,
    loads_json,
)
from durably.store import mask_url
from durably.store.base import (
    ActionRequest,
    ClaimRequest,
    EnqueueResult,
    HeartbeatResult,
    Lease,
)
from durably.store.sqlfiles import load_migrations, load_queries

__all__ = ["PostgresStore"]

logger = logging.getLogger(__name__)

Row = dict[str, Any]

_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_Q = load_queries("postgres")
# Queries holding {schema} / {channel}: filled with validated identifiers per store.
_TEMPLATES = (
    "create_schema",
    "drop_schema",
    "listen",
    "enqueue",
    "enqueue_one",
    "enqueue_copy",
    "live_jobs_by_keys",
)
# A concurrent producer can take a key between our insert and our look-up; a few rounds settle it.
_ENQUEUE_ROUNDS = 5
_PRUNE_CHUNK = 1000
_EVENT_STATUSES = frozenset(status.value for status in EVENT_STATUSES)
_NEXT_STATUS = 3  # where a completion item holds the job's next status


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_STATUS = {status.value: status for status in Status}


def _loads(data: bytes | bytearray | memoryview | str) -> Any:
    """psycopg's loads for json and jsonb columns on the pool's connections (PostgreSQL sends
    UTF-8, and jsonb prints no surrounding whitespace)."""
    return loads_json(data if isinstance(data, str) else bytes(data))


def _json(value: Any, what: str) -> str:
    try:
        return _dumps(value)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}") from exc


def _at(value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise StoreError(f"expected a timestamp from PostgreSQL, got {value!r}")
    return value.astimezone(UTC)


def _maybe_at(value: Any) -> datetime | None:
    return None if value is None else _at(value)


_JOB_FIELDS = tuple(field.name for field in dataclasses.fields(Job))
_JOB_ITEMS = operator.itemgetter(*_JOB_FIELDS)


def _positions(*names: str) -> tuple[int, ...]:
    return tuple(_JOB_FIELDS.index(name) for name in names)


(_STATUS_AT,) = _positions("status")
(_CANCEL_AT,) = _positions("cancel_requested")
_TIMES_AT = _positions("run_at", "created_at", "updated_at")
_MAYBE_TIMES_AT = _positions("lease_expires_at", "first_attempt_at", "finished_at")
_ID_AT, _PAYLOAD_AT, _POLICY_AT, _BATCH_AT, _ITEM_AT, _META_AT = _positions(
    "id", "payload", "policy", "batch_id", "item_index", "meta"
)
_JOB_VALUES = operator.attrgetter(*_JOB_FIELDS)


def _job_of(values: list[Any]) -> Job:
    """The one place a jobs row becomes a :class:`Job`: ``values`` in Job's field order."""
    values[_STATUS_AT] = _STATUS[values[_STATUS_AT]]
    values[_CANCEL_AT] = bool(values[_CANCEL_AT])
    for at in _TIMES_AT:
        values[at] = _at(values[at])
    for at in _MAYBE_TIMES_AT:
        if values[at] is not None:
            values[at] = _at(values[at])
    return Job(*values)


def _job(row: Mapping[str, Any]) -> Job:
    """A jobs row fetched as a dict."""
    return _job_of(list(_JOB_ITEMS(row)))


# Readers by result column names. A statement's columns rarely change (a migration adding one),
# and a new list simply gets its own reader; the bound only guards against unbounded growth.
_READERS: dict[tuple[bytes | None, ...], RowMaker[Job]] = {}
_MAX_READERS = 256


def _no_jobs(values: Sequence[Any]) -> Job:  # pragma: no cover - every caller reads jobs rows
    raise StoreError("expected jobs rows from PostgreSQL")


def _job_rows(cursor: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any]) -> RowMaker[Job]:
    """A row factory reading jobs rows straight into :class:`Job` objects.

    The column positions are worked out once per column list, found again by the result's
    column names: a few microseconds, where ``cursor.description`` builds a ``Column`` object
    per column (about 50 us for a jobs row) on every statement.
    """
    result = cursor.pgresult
    if result is None or not result.nfields:
        return _no_jobs
    fname = result.fname
    names = tuple([fname(i) for i in range(result.nfields)])
    read = _READERS.get(names)
    if read is None:
        decoded = [b"" if name is None else name.decode() for name in names]
        if not set(_JOB_FIELDS) <= set(decoded):
            return _no_jobs
        items = operator.itemgetter(*(decoded.index(name) for name in _JOB_FIELDS))

        def read(values: Sequence[Any]) -> Job:
            return _job_of(list(items(values)))

        if len(_READERS) >= _MAX_READERS:
            _READERS.clear()
        _READERS[names] = read
    return read


def _attempt(row: Mapping[str, Any]) -> Attempt:
    return Attempt(
        job_id=row["job_id"],
        number=row["number"],
        worker_id=row["worker_id"],
        started_at=_at(row["started_at"]),
        finished_at=_maybe_at(row["finished_at"]),
        outcome=row["outcome"],
        classification=row["classification"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        duration=row["duration"],
    )


def _audit(row: Mapping[str, Any]) -> AuditEntry:
    return AuditEntry(
        job_id=row["job_id"],
        at=_at(row["at"]),
        actor=row["actor"],
        action=row["action"],
        from_status=row["from_status"],
        to_status=row["to_status"],
        version=row["version"],
        notes=row["notes"],
    )


def _event(row: Mapping[str, Any]) -> Event:
    return Event(
        id=row["id"],
        type=row["type"],
        payload=row["payload"],
        created_at=_at(row["created_at"]),
        job_id=row["job_id"],
        attempts=row["attempts"],
        lease_token=row["lease_token"],
    )


def _new_job_item(job: NewJob, index: int) -> str:
    """``job`` as the JSON object the insert statements read."""
    item = {
        "queue": job.queue,
        "handler": job.handler,
        "payload": job.payload,
        "max_attempts": job.max_attempts,
        "policy": dict(job.policy),
        "delay": max(0.0, float(job.delay)),
        "key": job.key,
        "timeout": job.timeout,
        "batch_id": job.batch_id,
        "item_index": job.item_index,
        "event_scope": job.event_scope,
        "meta": dict(job.meta),
    }
    return _json(item, f"job #{index} ({job.handler!r})")


@contextlib.contextmanager
def _translated(url: str, what: str) -> Iterator[None]:
    """Turn driver exceptions into durably's, cause chained, URL masked."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        # Covers refused/dropped connections, admin shutdowns and pool timeouts.
        raise StoreUnavailable(f"PostgreSQL at {url} is unavailable ({what}): {exc}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL error at {url} ({what}): {exc}") from exc


class _EnqueuePlan:
    """Collects enqueue results in input order across the insert and look-up rounds."""

    def __init__(self, jobs: Sequence[NewJob]) -> None:
        self.jobs = list(jobs)
        # Each job's JSON object, encoded once (the encoding is also its check).
        self.items = [_new_job_item(job, i) for i, job in enumerate(self.jobs)]
        self.results: list[EnqueueResult | None] = [None] * len(self.jobs)
        self.todo = list(range(len(self.jobs)))

    def insert(
        self, now: datetime | None, sequence: str, channel: str
    ) -> tuple[str, dict[str, Any]]:
        """The insert statement's name and parameters for the jobs still to settle."""
        if len(self.todo) == 1:
            # The usual single enqueue: a statement that is cheap to plan, and prepared.
            return "enqueue_one", {
                "now": now,
                "channel": channel,
                "job": self.items[self.todo[0]],
            }
        return "enqueue", {
            "now": now,
            "sequence": sequence,
            "channel": channel,
            "jobs": "[" + ",".join([self.items[i] for i in self.todo]) + "]",
        }

    def take_one(self, jobs: Sequence[Job]) -> None:
        """The single job still to settle, if it was inserted (else its key is taken)."""
        if jobs:
            self.results[self.todo[0]] = EnqueueResult(jobs[0], created=True)
            self.todo = []

    def take_inserted(self, rows: Sequence[Row]) -> None:
        for row in rows:
            index = self.todo[row["ord"] - 1]
            self.results[index] = EnqueueResult(_job(row), created=bool(row["created"]))
        self.todo = [i for i in self.todo if self.results[i] is None]

    def lookup_params(self) -> dict[str, Any]:
        return {"keys": sorted({k for i in self.todo if (k := self.jobs[i].key) is not None})}

    def take_live(self, rows: Sequence[Row]) -> None:
        live = {row["key"]: _job(row) for row in rows}
        for i in self.todo:
            found = live.get(self.jobs[i].key)
            if found is not None:
                self.results[i] = EnqueueResult(found, created=False)
        self.todo = [i for i in self.todo if self.results[i] is None]

    def done(self) -> list[EnqueueResult]:
        out = [r for r in self.results if r is not None]
        if len(out) != len(self.results):
            raise StoreError(
                "enqueue could not settle: idempotency keys kept changing hands under "
                "concurrent producers; retry the enqueue"
            )
        return out


# jsonb reads a number written with a positive exponent ("1e+23") back as an integer, which
# need not equal the float: a batch holding one takes the RETURNING path instead. A number
# follows a bracket, a comma, a colon or the start of a payload (texts are joined with NUL);
# "\u00e9" is no number.
_POSITIVE_EXPONENT = re.compile(r"(?:^|[\[,:\x00])\s*-?\d+(?:\.\d+)?[eE]\+?\d")
_SCALARS = frozenset({str, int, float, bool, type(None)})
# Beyond this many seconds, now + delay may not fit a Python datetime; the SQL path decides.
_MAX_DELAY = 1e10
# Rows per COPY write: the server parses one chunk while we format the next.
_COPY_CHUNK = 1000
# Below this many jobs one INSERT statement (one round trip) beats COPY's several.
_COPY_MIN = 32
_INT4_RANGE = range(-(2**31), 2**31)

# COPY's binary format: the server parses no text for numbers and timestamps, a third less work
# per row than the text format. Every field is its length then its bytes; NULL is length -1.
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_TRAILER = struct.pack("!h", -1)
_ROW_HEAD = struct.Struct("!hiq")  # the field count, then the id (a bigint: 8 bytes)
_LENGTH = struct.Struct("!i")
_INT4 = struct.Struct("!ii")
_FLOAT8 = struct.Struct("!id")
_TIMESTAMP = struct.Struct("!iq")  # microseconds since 2000-01-01 UTC
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_NULL = _LENGTH.pack(-1)
_COLUMNS = 14  # as listed in enqueue_copy


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    data = value.encode()
    return _LENGTH.pack(len(data)) + data


def _jsonb(data: bytes) -> bytes:
    return _LENGTH.pack(len(data) + 1) + b"\x01" + data  # jsonb's binary form: version 1, text


def _int4(value: int | None) -> bytes:
    return _NULL if value is None else _INT4.pack(4, value)


def _timestamptz(value: datetime) -> bytes:
    delta = value - _PG_EPOCH
    return _TIMESTAMP.pack(
        8, (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    )


def _plain(job: NewJob) -> bool:
    """Whether every column of ``job`` has the type the COPY is written for."""
    return (
        type(job.queue) is str
        and type(job.handler) is str
        and (job.batch_id is None or type(job.batch_id) is str)
        and (job.event_scope is None or type(job.event_scope) is str)
        and (
            job.max_attempts is None
            or (type(job.max_attempts) is int and job.max_attempts in _INT4_RANGE)
        )
        and (
            job.item_index is None
            or (type(job.item_index) is int and job.item_index in _INT4_RANGE)
        )
        and (
            job.timeout is None
            or (type(job.timeout) in (int, float) and math.isfinite(job.timeout))
        )
    )


def _copier(text: str) -> Callable[[], Any]:
    """Makes unshared copies of a JSON object: a shallow copy when nothing in it is mutable."""
    value = json.loads(text)
    if type(value) is dict and all(type(v) in _SCALARS for v in value.values()):
        return cast("Callable[[], Any]", value.copy)
    return functools.partial(json.loads, text)


class _Shape(NamedTuple):
    """What jobs of one bulk enqueue usually share: encoded once, decoded once."""

    queue: str
    handler: str
    max_attempts: int | None
    policy: str  # JSON
    timeout: float | None
    event_scope: str | None
    meta: str  # JSON
    delay: float

    @classmethod
    def of(cls, job: NewJob, index: int, encoded: dict[int, str]) -> _Shape | None:
        """``job``'s shape, or None when the COPY cannot carry it as the SQL path would."""
        delay = max(0.0, float(job.delay))
        if not delay <= _MAX_DELAY:
            return None
        texts = []
        for mapping, what in ((job.policy, "policy"), (job.meta, "meta")):
            text = encoded.get(id(mapping)) if mapping else "{}"
            if text is None:
                text = _json(dict(mapping), f"{what} of job #{index} ({job.handler!r})")
                if _POSITIVE_EXPONENT.search(text):
                    return None
                encoded[id(mapping)] = text
            texts.append(text)
        timeout = None if job.timeout is None else float(job.timeout)
        policy, meta = texts
        return cls(
            job.queue, job.handler, job.max_attempts, policy, timeout, job.event_scope, meta, delay
        )

    def fields(self, now: datetime) -> bytes:
        """The columns from queue to updated_at, in COPY's binary format."""
        return b"".join(
            (
                _text(self.queue),
                _text(self.handler),
                _int4(self.max_attempts),
                _text(self.policy),  # json's binary form is its text
                _NULL if self.timeout is None else _FLOAT8.pack(8, self.timeout),
                _text(self.event_scope),
                _jsonb(self.meta.encode()),
                _timestamptz(self.run_at(now)),
                _timestamptz(now),
                _timestamptz(now),
            )
        )

    def run_at(self, now: datetime) -> datetime:
        # rint(delay * 1e6) microseconds, as PostgreSQL's make_interval(secs => delay) counts.
        return now + timedelta(microseconds=round(self.delay * 1e6))


class _NotCopyable(Exception):
    """A job met while streaming a COPY needs the SQL path: the COPY is abandoned."""


class _CopyBatch:
    """Jobs without keys, COPYed in slices of ``_COPY_CHUNK`` rows: nothing to look up, so no row
    needs reading back.

    A slice is checked and encoded (:meth:`add`), sent (:meth:`data`) and its jobs built
    (:meth:`results`) while the server stores the slices before it, so the server starts after
    the first slice instead of after the whole batch. Each distinct policy, meta and
    :class:`_Shape` is encoded once; payloads arrive encoded (``NewJob.payload_json``) or are
    encoded here, and are decoded back one slice per call, so the returned jobs hold exactly what
    ``get`` will read.
    """

    def __init__(self, jobs: Sequence[NewJob]) -> None:
        self.jobs = jobs
        self.size = len(jobs)
        # Distinct queues, in order, for the reserve's notification; computed before any slice.
        self.queues: list[str] = list(dict.fromkeys([job.queue for job in jobs]))
        self.shapes: list[_Shape] = []
        self.shape_of: list[int] = []
        self.batch_ids: list[str | None] = []
        self.item_indexes: list[int | None] = []
        self.payloads: list[Any] = []
        self.rows: list[bytes] = []  # per job, its payload, batch_id and item_index fields
        self._numbers: dict[_Shape, int] = {}
        self._seen: dict[tuple[Any, ...], int] = {}  # the same, by identity and value: cheaper
        self._encoded: dict[int, str] = {}  # id(policy or meta mapping) -> its JSON
        self._batch_fields: dict[str | None, bytes] = {None: _NULL}
        self._fields: list[bytes] = []  # per shape: its columns at the reserved now
        self._templates: list[tuple[list[Any], Callable[[], Any], Callable[[], Any]]] = []

    @classmethod
    def of(cls, jobs: Sequence[NewJob]) -> _CopyBatch | None:
        """The batch, or None when a cheap look shows a job that needs the SQL path (a key, a
        queue that is no string); :meth:`add` finds the rarer cases."""
        if any(job.key is not None for job in jobs):
            return None
        batch = cls(jobs)
        return batch if all(type(queue) is str for queue in batch.queues) else None

    def slices(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.size, _COPY_CHUNK):
            yield start, min(start + _COPY_CHUNK, self.size)

    def add_all(self) -> bool:
        """:meth:`add` every slice: whether the whole batch can be COPYed."""
        return all(self.add(start, stop) for start, stop in self.slices())

    def add(self, start: int, stop: int) -> bool:
        """Check and encode jobs ``start`` to ``stop`` (the next ones); False when one needs the
        SQL path (an odd value; :meth:`of` already turned away keys). Raises
        :class:`PayloadError` for a payload, policy or meta that is not JSON."""
        texts: list[str] = []
        shapes, seen, encoded = self._numbers, self._seen, self._encoded
        shape_of, batch_ids, item_indexes = self.shape_of, self.batch_ids, self.item_indexes
        for index in range(start, stop):
            job = self.jobs[index]
            if not _plain(job):
                return False
            text = job.payload_json
            texts.append(
                _json(job.payload, f"job #{index} ({job.handler!r})") if text is None else text
            )
            policy, meta = job.policy, job.meta
            # Mappings are compared by identity: the app hands every job of a bulk enqueue the
            # same policy snapshot, and empty metas need no encoding at all.
            seen_key = (
                job.queue,
                job.handler,
                job.max_attempts,
                id(policy) if policy else 0,
                job.timeout,
                job.event_scope,
                id(meta) if meta else 0,
                job.delay,
            )
            number = seen.get(seen_key)
            if number is None:
                shape = _Shape.of(job, index, encoded)
                if shape is None:
                    return False
                number = shapes.get(shape)
                if number is None:
                    number = shapes[shape] = len(self.shapes)
                    self.shapes.append(shape)
                seen[seen_key] = number
            shape_of.append(number)
            batch_ids.append(job.batch_id)
            item_indexes.append(job.item_index)
        # The slice's payloads checked, decoded and encoded in one pass each (C speed); they are
        # joined on a character no JSON text holds raw.
        joined = "\x00".join(texts)
        if _POSITIVE_EXPONENT.search(joined) or joined.count("\x00") != len(texts) - 1:
            return False
        try:
            payloads = json.loads("[" + ",".join(texts) + "]")
        except ValueError:
            return False  # not JSON after all: let the server say so on the SQL path
        if len(payloads) != len(texts):
            return False
        self.payloads += payloads
        batch_fields = self._batch_fields
        for batch_id in set(batch_ids[start:stop]):
            if batch_id not in batch_fields:
                batch_fields[batch_id] = _text(batch_id)
        self.rows += [
            _jsonb(payload) + batch_fields[batch_id] + _int4(item)
            for payload, batch_id, item in zip(
                joined.encode().split(b"\x00"),
                batch_ids[start:stop],
                item_indexes[start:stop],
                strict=True,
            )
        ]
        return True

    def data(self, start: int, stop: int, ids: Sequence[int], now: datetime) -> bytes:
        """The COPY data of the added jobs ``start`` to ``stop``: the file header before the
        first, the trailer after the last."""
        fields = self._fields
        for shape in self.shapes[len(fields) :]:
            fields.append(shape.fields(now))
        head = _ROW_HEAD.pack
        data = b"".join(
            [
                head(_COLUMNS, 8, job_id) + row + fields[number]
                for job_id, row, number in zip(
                    ids[start:stop], self.rows[start:stop], self.shape_of[start:stop], strict=True
                )
            ]
        )
        if start == 0:
            data = _SIGNATURE + data
        return data + _TRAILER if stop == self.size else data

    def results(
        self, start: int, stop: int, ids: Sequence[int], now: datetime
    ) -> list[EnqueueResult]:
        """The stored jobs ``start`` to ``stop``, equal to what ``get`` reads (each with its own
        policy and meta)."""
        now = _at(now)
        # One Job per shape, its field values the template of every job of that shape: a list
        # copy and six stores per job, then Job's positional constructor.
        templates = self._templates
        for shape in self.shapes[len(templates) :]:
            model = Job(
                id=0,
                queue=shape.queue,
                handler=shape.handler,
                payload=None,
                status=Status.PENDING,
                attempts=0,
                max_attempts=shape.max_attempts,
                policy={},
                run_at=shape.run_at(now),
                version=1,
                created_at=now,
                updated_at=now,
                timeout=shape.timeout,
                event_scope=shape.event_scope,
                meta={},
            )
            templates.append((list(_JOB_VALUES(model)), _copier(shape.policy), _copier(shape.meta)))
        out: list[EnqueueResult] = []
        append = out.append
        for job_id, payload, number, batch_id, item in zip(
            ids[start:stop],
            self.payloads[start:stop],
            self.shape_of[start:stop],
            self.batch_ids[start:stop],
            self.item_indexes[start:stop],
            strict=True,
        ):
            template, policy, meta = templates[number]
            values = template.copy()
            values[_ID_AT] = job_id
            values[_PAYLOAD_AT] = payload
            values[_POLICY_AT] = policy()
            values[_BATCH_AT] = batch_id
            values[_ITEM_AT] = item
            values[_META_AT] = meta()
            append(EnqueueResult(Job(*values), True))
        return out


def _bulk(
    connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], jobs: Sequence[NewJob]
) -> bool:
    """Whether a caller's connection may take the COPY path: it takes several statements, atomic
    only inside the caller's transaction (begun, or about to be as autocommit is off), and
    writes UTF-8."""
    in_transaction = (
        not connection.autocommit
        or connection.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS
    )
    return in_transaction and connection.info.encoding == "utf-8" and len(jobs) >= _COPY_MIN


class _Waiter:
    __slots__ = ("event", "queues")

    def __init__(self, queues: frozenset[str]) -> None:
        self.queues = queues
        self.event = asyncio.Event()


class _Listener:
    """One LISTEN connection per store, reconnected when it drops, waking waiting workers."""

    def __init__(
        self,
        connect: Callable[[], Any],
        listen: sql.Composed,
    ) -> None:
        self._connect = connect
        self._listen = listen
        self._waiters: set[_Waiter] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._connected_before = False

    @property
    def ready(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="durably-postgres-listener"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ready = None
        self._connected_before = False

    def add(self, waiter: _Waiter) -> None:
        self._waiters.add(waiter)

    def discard(self, waiter: _Waiter) -> None:
        self._waiters.discard(waiter)

    def _wake(self, queue: str | None) -> None:
        for waiter in self._waiters:
            if queue is None or queue in waiter.queues:
                waiter.event.set()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                conn: psycopg.AsyncConnection[Any] = await self._connect()
            except psycopg.Error as exc:
                logger.warning(
                    "durably: LISTEN connection failed, retrying in %.2fs: %s", delay, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                await conn.execute(self._listen)
                delay = 0.05
                if self._connected_before:
                    # Notifications sent while we were away are lost: let every waiter look.
                    self._wake(None)
                self._connected_before = True
                self.ready.set()
                async for note in conn.notifies():
                    self._wake(note.payload)
            except psycopg.Error as exc:
                logger.warning("durably: LISTEN connection dropped, reconnecting: %s", exc)
            finally:
                self.ready.clear()
                with contextlib.suppress(psycopg.Error):
                    await conn.close()


class PostgresStore:
    """Jobs in a PostgreSQL schema (``postgresql://user@host/db``), shared by many workers.

    ``schema`` (default ``durably``) must match ``^[a-z_][a-z0-9_]{0,62}$``. ``clock`` replaces
    the database clock for every timestamp and comparison (tests only). ``min_size`` and
    ``max_size`` bound the connection pool; ``connect_timeout`` bounds how long a call waits for
    a connection before raising :class:`~durably.errors.StoreUnavailable`;
    ``application_name`` labels the sessions in ``pg_stat_activity``. With
    ``migrate_on_open=False``, ``open`` only refuses a newer schema and leaves pending migrations
    to :meth:`migrate`.

    >>> store = PostgresStore("postgresql://app@db/jobs", schema="billing")  # doctest: +SKIP
    >>> await store.open()  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = "durably",
        clock: Callable[[], datetime] | None = None,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        application_name: str | None = None,
        migrate_on_open: bool = True,
    ) -> None:
        if not isinstance(schema, str) or not _SCHEMA.match(schema):
            raise ConfigError(
                f"invalid PostgreSQL schema name {schema!r}: use 1 to 63 characters among "
                "a-z, 0-9 and _, not starting with a digit"
            )
        if min_size < 0 or max_size < 1 or min_size > max_size:
            raise ConfigError(
                f"pool sizes must satisfy 0 <= min_size <= max_size and max_size >= 1; "
                f"got min_size={min_size}, max_size={max_size}"
            )
        if connect_timeout <= 0:
            raise ConfigError(f"connect_timeout must be positive, not {connect_timeout!r}")
        self.url = mask_url(url)
        self.schema = schema
        self.channel = f"durably_{schema}"[:63]
        self.application_name = (application_name or f"durably/{schema}")[:63]
        self._conninfo = url
        self._clock = clock
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._migrate_on_open = migrate_on_open
        self._sequence = f"{schema}.jobs_id_seq"
        ident = sql.Identifier(schema)
        self._sql: dict[str, sql.Composed] = {
            name: sql.SQL(_Q[name]).format(schema=ident, channel=sql.Identifier(self.channel))
            for name in _TEMPLATES
        }
        self._pool: AsyncConnectionPool | None = None
        self._listener = _Listener(self._connect_listener, self._sql["listen"])

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        """``postgresql://user:password@host:5432/db``; ``?schema=name`` sets the schema.

        Other query parameters are libpq's (``sslmode=require``, ...).
        """
        parts = urlsplit(url)
        kept: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "schema":
                options.setdefault("schema", value)
            else:
                kept.append((name, value))
        return cls(parts._replace(query=urlencode(kept)).geturl(), **options)

    # -- plumbing ---------------------------------------------------------------------------

    def _now(self) -> datetime | None:
        """The injected clock's now, or None for "the database's now()"."""
        return self._clock() if self._clock is not None else None

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "application_name": self.application_name,
            "options": f"-c search_path={self.schema} -c timezone=UTC",
            "connect_timeout": max(1, round(self._connect_timeout)),
        }

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        set_json_loads(_loads, conn)

    async def _connect_listener(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self._conninfo, **self._connect_kwargs())

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[psycopg.AsyncConnection[Row]]:
        pool = self._pool
        if pool is None:
            raise StoreError(
                f"the PostgreSQL store at {self.url} is not open: call await store.open() first"
            )
        try:
            with _translated(self.url, what):
                async with pool.connection() as conn:
                    # The pool's connections are made with row_factory=dict_row.
                    yield cast("psycopg.AsyncConnection[Row]", conn)
        except StoreUnavailable:
            # The server dropped us (restart, pg_terminate_backend): throw out every dead idle
            # connection now, so the caller's retry gets a fresh one at once.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.check(), timeout=self._connect_timeout)
            raise

    async def _fetch(self, what: str, query: Any, params: Mapping[str, Any]) -> list[Row]:
        async with self._connection(what) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    async def _fetch_jobs(
        self, what: str, query: Any, params: Mapping[str, Any], *, prepare: bool | None = None
    ) -> list[Job]:
        async with self._connection(what) as conn, conn.cursor(row_factory=_job_rows) as cur:
            await cur.execute(query, params, prepare=prepare)
            return await cur.fetchall()

    async def _fetch_one(self, what: str, query: Any, params: Mapping[str, Any]) -> Row | None:
        async with self._connection(what) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchone()

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, then migrate the schema (created if missing) or refuse a newer one."""
        if self._pool is not None:
            return
        pool = AsyncConnectionPool(
            self._conninfo,
            kwargs={**self._connect_kwargs(), "row_factory": dict_row},
            min_size=self._min_size,
            max_size=self._max_size,
            open=False,
            # No per-checkout check: psycopg_pool backs off (1 s, 2 s, 4 s...) after each dead
            # connection it finds, so a pool full of cut sessions stalls callers for the whole
            # timeout. Dead connections are purged in one pass on the first failure instead.
            timeout=self._connect_timeout,
            name=self.application_name,
            configure=self._configure,
        )
        try:
            with _translated(self.url, "connect"):
                await pool.open(wait=True, timeout=self._connect_timeout)
            self._pool = pool
            if self._migrate_on_open:
                await self.migrate()
            else:
                await self.migrate(dry_run=True)  # raises SchemaTooNew, applies nothing
        except BaseException:
            self._pool = None
            await pool.close()
            raise

    async def close(self) -> None:
        """Stop listening and close the pool. Idempotent."""
        pool, self._pool = self._pool, None
        await self._listener.stop()
        if pool is not None:
            await pool.close()

    def _check_version(self, current: int, known: int) -> None:
        if current > known:
            raise SchemaTooNew(
                f"the schema {self.schema!r} at {self.url} is at version {current}, but this "
                f"durably knows only up to {known}: upgrade durably"
            )

    async def _current_version(self, conn: psycopg.AsyncConnection[Row]) -> int:
        cur = await conn.execute(_Q["migrations_table_exists"])
        row = await cur.fetchone()
        if row is None or not row["present"]:
            return 0
        cur = await conn.execute(_Q["schema_version"])
        row = await cur.fetchone()
        return 0 if row is None else int(row["version"])

    async def migrate(self, *, dry_run: bool = False) -> list[str]:
        """Apply pending migrations in one transaction under an advisory lock.

        Many processes opening at once queue on the lock; the first migrates, the others find
        nothing left to do. With ``dry_run`` only the pending names are returned.
        """
        migrations = load_migrations("postgres")
        async with self._connection("migrate") as conn:
            if dry_run:
                current = await self._current_version(conn)
                self._check_version(current, len(migrations))
                return [f"{m.version:03d}_{m.name}" for m in migrations[current:]]
            applied: list[str] = []
            async with conn.transaction():
                await conn.execute(_Q["migration_lock"], {"schema": self.schema})
                await conn.execute(self._sql["create_schema"])
                await conn.execute(_Q["create_migrations_table"])
                current = await self._current_version(conn)
                self._check_version(current, len(migrations))
                for migration in migrations[current:]:
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        _Q["record_migration"],
                        {"version": migration.version, "name": migration.name, "now": self._now()},
                    )
                    applied.append(f"{migration.version:03d}_{migration.name}")
            return applied

    async def schema_version(self) -> int:
        """The highest migration applied (0 for an empty schema)."""
        async with self._connection("schema_version") as conn:
            return await self._current_version(conn)

    async def now(self) -> datetime:
        """The store's clock: the database's ``now()``, or the injected one."""
        if self._clock is not None:
            return self._clock()
        row = await self._fetch_one("now", _Q["now"], {"now": None})
        if row is None:  # pragma: no cover - SELECT without FROM always yields a row
            raise StoreError("now() returned no row")
        return _at(row["now"])

    async def drop_namespace(self) -> None:
        """Drop the store's schema with everything in it (tests and teardown)."""
        await self._listener.stop()
        async with self._connection("drop_namespace") as conn:
            await conn.execute(self._sql["drop_schema"])

    # -- producers --------------------------------------------------------------------------

    async def _enqueue_async(
        self, conn: psycopg.AsyncConnection[Any], plan: _EnqueuePlan, *, ours: bool = True
    ) -> list[EnqueueResult]:
        """Settle ``plan``. On a caller's connection (not ``ours``) psycopg's own preparing
        rules (``prepare_threshold``) stand."""
        async with conn.cursor(row_factory=dict_row) as cur:
            for _ in range(_ENQUEUE_ROUNDS):
                name, params = plan.insert(self._now(), self._sequence, self.channel)
                if name == "enqueue_one":
                    async with conn.cursor(row_factory=_job_rows) as one:
                        await one.execute(self._sql[name], params, prepare=ours or None)
                        plan.take_one(await one.fetchall())
                else:
                    await cur.execute(self._sql[name], params)
                    plan.take_inserted(await cur.fetchall())
                if not plan.todo:
                    break
                await cur.execute(self._sql["live_jobs_by_keys"], plan.lookup_params())
                plan.take_live(await cur.fetchall())
                if not plan.todo:
                    break
        return plan.done()

    def _reserve_params(self, batch: _CopyBatch) -> dict[str, Any]:
        return {
            "now": self._now(),
            "sequence": self._sequence,
            "n": batch.size,
            "channel": self.channel,
            "queues": batch.queues,
        }

    @staticmethod
    def _reserved(row: Row | None) -> tuple[datetime, Sequence[int]]:
        if row is None:  # pragma: no cover - an aggregate always yields a row
            raise StoreError("could not reserve job ids")
        ids = row["ids"]
        return _at(row["now"]), range(row["low"], row["high"] + 1) if ids is None else ids

    async def _enqueue_copy(
        self, conn: psycopg.AsyncConnection[Any], batch: _CopyBatch, *, added: bool
    ) -> list[EnqueueResult]:
        """Reserve ids, COPY the rows, build the jobs while the server stores them. The caller
        holds the transaction. Unless every slice is ``added`` already, each is added just
        before it is sent: a job that needs the SQL path then raises :class:`_NotCopyable`."""
        out: list[EnqueueResult] = []
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_Q["enqueue_reserve"], self._reserve_params(batch))
            now, ids = self._reserved(await cur.fetchone())
            # libpq sends each slice on as it comes: the server stores it while we build its jobs
            # and encode the next.
            async with cur.copy(self._sql["enqueue_copy"]) as copy:
                for start, stop in batch.slices():
                    if not added and not batch.add(start, stop):
                        raise _NotCopyable
                    await copy.write(batch.data(start, stop, ids, now))
                    out += batch.results(start, stop, ids, now)
        return out

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[EnqueueResult]:
        """Insert all jobs in order and notify waiting workers, in one transaction.

        Large batches without keys are COPYed (ids reserved first, each slice sent as soon as it
        is encoded, jobs built here); a batch that turns out to need it, and any other, takes
        one ``INSERT ... ON CONFLICT`` statement that settles keys.
        """
        if not jobs:
            return []
        batch = _CopyBatch.of(jobs) if len(jobs) >= _COPY_MIN else None
        async with self._connection("enqueue") as conn:
            if batch is not None and conn.info.encoding == "utf-8":
                try:
                    async with conn.transaction():
                        return await self._enqueue_copy(conn, batch, added=False)
                except _NotCopyable:
                    pass  # rolled back: ids skipped, nothing stored, nobody notified
            return await self._enqueue_async(conn, _EnqueuePlan(jobs))

    async def enqueue_with_async(
        self, connection: psycopg.AsyncConnection[Any], jobs: Sequence[NewJob]
    ) -> list[EnqueueResult]:
        """Enqueue inside the caller's open transaction on ``connection`` (not committed here).

        The jobs exist, and workers are notified, only if the caller commits.
        """
        if not isinstance(connection, psycopg.AsyncConnection):
            raise ConfigError(
                "enqueue_with_async needs a psycopg.AsyncConnection; "
                "use enqueue_with for a synchronous psycopg.Connection"
            )
        if not jobs:
            return []
        batch = _CopyBatch.of(jobs) if _bulk(connection, jobs) else None
        # The caller's transaction cannot be rolled back here: every slice is added first.
        if batch is not None and not batch.add_all():
            batch = None
        with _translated(self.url, "enqueue_with_async"):
            if batch is None:
                return await self._enqueue_async(connection, _EnqueuePlan(jobs), ours=False)
            return await self._enqueue_copy(connection, batch, added=True)

    def enqueue_with(
        self, connection: psycopg.Connection[Any], jobs: Sequence[NewJob]
    ) -> list[EnqueueResult]:
        """Enqueue inside the caller's open transaction on a synchronous ``connection``.

        Nothing is committed here: the jobs exist, and workers are notified, only if the caller
        commits. Works whatever the connection's ``search_path``.

        >>> with psycopg.connect(url) as conn:  # doctest: +SKIP
        ...     conn.execute("INSERT INTO orders ...")
        ...     store.enqueue_with(conn, [NewJob("send_receipt", {"order": 42})])
        """
        if not isinstance(connection, psycopg.Connection):
            raise ConfigError(
                "enqueue_with needs a synchronous psycopg.Connection; "
                "use enqueue_with_async for a psycopg.AsyncConnection"
            )
        if not jobs:
            return []
        batch = _CopyBatch.of(jobs) if _bulk(connection, jobs) else None
        if batch is not None and not batch.add_all():
            batch = None
        with (
            _translated(self.url, "enqueue_with"),
            connection.cursor(row_factory=dict_row) as cur,
        ):
            if batch is not None:
                cur.execute(_Q["enqueue_reserve"], self._reserve_params(batch))
                now, ids = self._reserved(cur.fetchone())
                results: list[EnqueueResult] = []
                with cur.copy(self._sql["enqueue_copy"]) as copy:
                    for start, stop in batch.slices():
                        copy.write(batch.data(start, stop, ids, now))
                        results += batch.results(start, stop, ids, now)
                return results
            plan = _EnqueuePlan(jobs)
            for _ in range(_ENQUEUE_ROUNDS):
                name, params = plan.insert(self._now(), self._sequence, self.channel)
                if name == "enqueue_one":
                    with connection.cursor(row_factory=_job_rows) as one:
                        one.execute(self._sql[name], params)
                        plan.take_one(one.fetchall())
                else:
                    cur.execute(self._sql[name], params)
                    plan.take_inserted(cur.fetchall())
                if not plan.todo:
                    break
                cur.execute(self._sql["live_jobs_by_keys"], plan.lookup_params())
                plan.take_live(cur.fetchall())
                if not plan.todo:
                    break
        return plan.done()

    async def upsert(self, job: NewJob) -> EnqueueResult:
        """Enqueue by key, or replace the live job's content while it is not running."""
        if job.key is None:
            raise ConfigError("upsert needs a key")
        payload = _json(job.payload, f"payload of {job.handler!r}")
        meta = _json(dict(job.meta), f"meta of {job.handler!r}")
        policy = _json(dict(job.policy), f"policy of {job.handler!r}")
        async with self._connection("upsert") as conn:
            for _ in range(_ENQUEUE_ROUNDS):
                async with conn.transaction():
                    cur = await conn.execute(_Q["live_job_by_key_for_update"], {"key": job.key})
                    live = await cur.fetchone()
                    if live is None:
                        result = (await self._enqueue_async(conn, _EnqueuePlan([job])))[0]
                        if result.created:
                            return result
                        continue  # another producer took the key meanwhile: update theirs
                    if live["status"] == Status.RUNNING.value:
                        return EnqueueResult(_job(live), created=False)
                    cur = await conn.execute(
                        _Q["upsert_live"],
                        {
                            "id": live["id"],
                            "payload": payload,
                            "meta": meta,
                            "policy": policy,
                            "max_attempts": job.max_attempts,
                            "timeout": job.timeout,
                            "event_scope": job.event_scope,
                            "queue": job.queue,
                            "handler": job.handler,
                            "now": self._now(),
                        },
                    )
                    row = await cur.fetchone()
                    await conn.execute(_Q["notify"], {"channel": self.channel, "queue": job.queue})
                    return EnqueueResult(_job(row if row is not None else live), created=False)
        raise StoreError(f"upsert of key {job.key!r} could not settle under concurrent producers")

    # -- workers ----------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> list[Job]:
        """Claim due jobs under fresh leases, with their attempt rows, in one statement: due
        retries first, then pending jobs, each oldest ``run_at`` first."""
        if request.limit <= 0 or not request.queues:
            return []
        params: dict[str, Any] = {
            "now": self._now(),
            "queues": list(dict.fromkeys(request.queues)),  # one index walk per queue
            "worker_id": request.worker_id,
            "limit": request.limit,
            "lease_seconds": float(request.lease_seconds),
        }
        if request.batch_id is None:
            # Prepared at once: its estimates do not depend on the parameters, so after five
            # custom plans the server keeps one generic plan (planning cost more than running).
            return await self._fetch_jobs("claim", _Q["claim"], params, prepare=True)
        params.update(batch_id=request.batch_id, due_only=request.due_only)
        return await self._fetch_jobs("claim", _Q["claim_batch"], params)

    async def heartbeat(self, leases: Sequence[Lease], lease_seconds: float) -> HeartbeatResult:
        """Extend every lease still held, in one statement."""
        if not leases:
            return HeartbeatResult(frozenset(), frozenset())
        rows = await self._fetch(
            "heartbeat",
            _Q["heartbeat"],
            {
                "now": self._now(),
                "lease_seconds": float(lease_seconds),
                "ids": [lease.job_id for lease in leases],
                "tokens": [lease.lease_token for lease in leases],
            },
        )
        return HeartbeatResult(
            frozenset(r["id"] for r in rows),
            frozenset(r["id"] for r in rows if r["cancel_requested"]),
        )

    async def complete(self, completions: Sequence[Completion]) -> list[bool]:
        """Apply attempt endings, each fenced by its lease token.

        One autocommitted statement applies every completion that owes no outbox event; the
        others (a job with an event scope reaching an event status) are left to one transaction
        that applies them and writes their events.
        """
        if not completions:
            return []
        # Positional, as the complete query reads them.
        items: list[tuple[Any, ...]] = []
        for ord_, c in enumerate(completions):
            succeeded = c.outcome is Outcome.SUCCEEDED
            items.append(
                (
                    ord_,
                    c.job_id,
                    c.lease_token,
                    c.next_status.value,  # at _NEXT_STATUS
                    c.result,
                    None if succeeded else c.classification,
                    None if succeeded else c.error_type,
                    None if succeeded else c.error_message,
                    max(0.0, float(c.retry_in)),
                    c.require_expired,
                    c.row_outcome,
                    c.row_classification,
                    c.error_type,
                    c.error_message,
                    c.duration,
                )
            )
        now = self._now()
        params: dict[str, Any] = {
            "now": now,
            "items": _json(items, "completion result"),
            "channel": self.channel,
            "defer_events": True,
            "event_statuses": sorted(_EVENT_STATUSES),
        }
        applied = [False] * len(completions)
        async with self._connection("complete") as conn:
            # Autocommitted: each completion's job and attempt rows change together, and the
            # usual batch (no outbox events owed) takes one round trip, no BEGIN or COMMIT.
            cur = await conn.execute(_Q["complete"], params)
            for row in await cur.fetchall():
                applied[row["ord"]] = True
            # Left alone: those owing events, and those whose lease was lost (fenced again
            # below, applying nothing). Completions to other statuses never owe events.
            owing = [
                item
                for item, done in zip(items, applied, strict=True)
                if not done and item[_NEXT_STATUS] in _EVENT_STATUSES
            ]
            if owing:
                params.update(items=_json(owing, "completion result"), defer_events=False)
                for ord_ in await self._complete_with_events(conn, params, now):
                    applied[ord_] = True
        return applied

    async def _complete_with_events(
        self, conn: psycopg.AsyncConnection[Row], params: Mapping[str, Any], now: datetime | None
    ) -> list[int]:
        """Apply completions and the outbox events they owe in one transaction; return the
        positions applied. Pipelined: BEGIN travels with the statement, writes with reads."""
        applied: list[int] = []
        async with conn.pipeline(), conn.transaction():
            cur = await conn.execute(_Q["complete"], params)
            owed: list[int] = []
            for row in await cur.fetchall():
                applied.append(row["ord"])
                if row["event_scope"] is not None and Status(row["status"]) in EVENT_STATUSES:
                    owed.append(row["id"])
            if owed:
                # Whole rows only for the jobs that owe events, read back under this
                # transaction's row locks, so they are exactly the rows just written.
                cur = await conn.execute(_Q["jobs_by_ids"], {"ids": owed})
                jobs = [_job(row) for row in await cur.fetchall()]
                # Batch locks in a fixed order, so two completers never wait on each other in a
                # cycle.
                for job in sorted(jobs, key=lambda j: (j.batch_id or "", j.id)):
                    await self._emit(conn, Status.RUNNING, job, now)
        return applied

    async def _emit(
        self,
        conn: psycopg.AsyncConnection[Row],
        before: Status,
        after: Job,
        now: datetime | None,
    ) -> None:
        """Write the outbox events a change owes, inside the caller's transaction."""
        if after.status not in EVENT_STATUSES or after.event_scope is None:
            return  # events are opt-in per job: no scope, no outbox rows
        await conn.execute(
            _Q["insert_event"],
            {
                "job_id": after.id,
                "type": event_type(after.event_scope),
                "payload": _json(processed_payload(after), f"result of job {after.id}"),
                "now": now,
            },
        )
        if after.batch_id is None or before not in LIVE:
            return
        await conn.execute(_Q["batch_lock"], {"schema": self.schema, "batch_id": after.batch_id})
        cur = await conn.execute(_Q["batch_counts"], {"batch_id": after.batch_id})
        counts = {row["status"]: int(row["n"]) for row in await cur.fetchall()}
        if any(counts.get(status.value, 0) for status in LIVE):
            return
        await conn.execute(
            _Q["insert_event"],
            {
                "job_id": None,
                "type": event_type(after.event_scope, "batch_completed"),
                "payload": _dumps(batch_payload(after.batch_id, counts, after.updated_at)),
                "now": now,
            },
        )

    async def release(self, leases: Sequence[Lease]) -> int:
        """Hand back claimed jobs that never started, as if never claimed."""
        if not leases:
            return 0
        rows = await self._fetch(
            "release",
            _Q["release"],
            {
                "now": self._now(),
                "ids": [lease.job_id for lease in leases],
                "tokens": [lease.lease_token for lease in leases],
                "channel": self.channel,
            },
        )
        return len(rows)

    async def expired(self, limit: int) -> list[Job]:
        """Running jobs whose lease has expired on the store's clock, oldest expiry first."""
        if limit <= 0:
            return []
        return await self._fetch_jobs(
            "expired", _Q["expired"], {"now": self._now(), "limit": limit}
        )

    async def next_due_in(self, queues: Sequence[str]) -> float | None:
        """Seconds until the earliest waiting job in ``queues`` is due; None if none waits."""
        if not queues:
            return None
        row = await self._fetch_one(
            "next_due_in", _Q["next_due"], {"now": self._now(), "queues": list(queues)}
        )
        if row is None or row["seconds"] is None:
            return None
        return max(0.0, float(row["seconds"]))

    async def start_listening(self, timeout: float = 10.0) -> bool:
        """Open the LISTEN connection now, so the first :meth:`wait` misses nothing.

        Returns True once listening, False if it could not start within ``timeout``.
        """
        if self._pool is None:
            raise StoreError(
                f"the PostgreSQL store at {self.url} is not open: call await store.open() first"
            )
        self._listener.start()
        try:
            await asyncio.wait_for(self._listener.ready.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True

    async def wait(self, queues: Sequence[str], timeout: float) -> bool:
        """Block until a NOTIFY for one of ``queues`` arrives (True) or ``timeout`` passes."""
        if self._pool is None:
            raise StoreError(
                f"the PostgreSQL store at {self.url} is not open: call await store.open() first"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        self._listener.start()
        waiter = _Waiter(frozenset(queues))
        self._listener.add(waiter)
        try:
            await asyncio.wait_for(waiter.event.wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return waiter.event.is_set()
        finally:
            self._listener.discard(waiter)
        return True

    # -- operators --------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job:
        """The job, or ``JobNotFound``."""
        row = await self._fetch_one("get", _Q["get_job"], {"id": job_id})
        if row is None:
            raise JobNotFound(job_id)
        return _job(row)

    async def get_by_key(self, key: str) -> Job | None:
        """The live job holding ``key``, else the newest job that had it, else None."""
        async with self._connection("get_by_key") as conn:
            cur = await conn.execute(_Q["live_job_by_key"], {"key": key})
            row = await cur.fetchone()
            if row is None:
                cur = await conn.execute(_Q["latest_job_by_key"], {"key": key})
                row = await cur.fetchone()
        return None if row is None else _job(row)

    async def list_jobs(
        self, where: JobFilter, *, limit: int = 100, after_id: int | None = None
    ) -> list[Job]:
        """Jobs matching ``where``, newest first, below ``after_id`` if given."""
        if limit <= 0:
            return []
        return await self._fetch_jobs(
            "list_jobs",
            _Q["list_jobs"],
            {
                "statuses": (
                    None if where.statuses is None else sorted(s.value for s in where.statuses)
                ),
                "queue": where.queue,
                "handler": where.handler,
                "batch_id": where.batch_id,
                "classification": where.classification,
                "key": where.key,
                "after_id": after_id,
                "limit": limit,
            },
        )

    async def attempts(self, job_id: int) -> list[Attempt]:
        """The job's attempts, oldest first."""
        rows = await self._fetch("attempts", _Q["list_attempts"], {"id": job_id})
        return [_attempt(r) for r in rows]

    async def audit(self, job_id: int) -> list[AuditEntry]:
        """The job's audit trail, oldest first."""
        rows = await self._fetch("audit", _Q["list_audit"], {"id": job_id})
        return [_audit(r) for r in rows]

    async def act(self, request: ActionRequest) -> Job:
        """Apply one operator action and its audit entry in one transaction."""
        rule = ACTIONS[request.action]
        now = self._now()
        async with self._connection("act") as conn:
            try:
                async with conn.transaction():
                    cur = await conn.execute(_Q["get_job_for_update"], {"id": request.job_id})
                    row = await cur.fetchone()
                    if row is None:
                        raise JobNotFound(request.job_id)
                    before = _job(row)
                    if (
                        request.expected_version is not None
                        and before.version != request.expected_version
                    ):
                        raise Conflict(before.id, request.expected_version, before.version)
                    cancel_running = (
                        request.action is Action.CANCEL and before.status is Status.RUNNING
                    )
                    if before.status not in rule.sources and not cancel_running:
                        raise InvalidTransition(
                            before.id,
                            before.status.value,
                            request.action.value,
                            frozenset(s.value for s in rule.sources),
                        )
                    params: dict[str, Any] = {"id": before.id, "now": now}
                    if cancel_running:
                        query = _Q["act_request_cancel"]
                    elif request.action is Action.REQUEUE:
                        if before.key is not None:
                            cur = await conn.execute(_Q["live_job_by_key"], {"key": before.key})
                            holder = await cur.fetchone()
                            if holder is not None and holder["id"] != before.id:
                                raise KeyTaken(before.id, holder["id"])
                        params["reset"] = request.reset_attempts
                        query = _Q["act_requeue"]
                    else:
                        params.update(
                            status=rule.target.value, actor=request.actor, notes=request.notes
                        )
                        query = _Q["act_end"]
                    cur = await conn.execute(query, params)
                    after_row = await cur.fetchone()
                    if after_row is None:  # pragma: no cover - the row is locked by us
                        raise JobNotFound(request.job_id)
                    after = _job(after_row)
                    if after.status is not before.status:
                        await self._emit(conn, before.status, after, now)
                    await conn.execute(
                        _Q["insert_audit"],
                        {
                            "id": after.id,
                            "now": now,
                            "actor": request.actor,
                            "action": request.action.value,
                            "from_status": before.status.value,
                            "to_status": after.status.value,
                            "version": after.version,
                            "notes": request.notes,
                        },
                    )
                    if after.status is Status.PENDING:
                        await conn.execute(
                            _Q["notify"], {"channel": self.channel, "queue": after.queue}
                        )
            except psycopg.errors.UniqueViolation as exc:
                # A producer took the key between our look-up and the update.
                cur = await conn.execute(_Q["live_job_by_key"], {"key": before.key})
                holder = await cur.fetchone()
                if holder is None:
                    raise StoreError(
                        f"cannot requeue job {request.job_id}: its key changed hands "
                        "concurrently; retry the action"
                    ) from exc
                raise KeyTaken(request.job_id, holder["id"]) from exc
        return after

    async def counts(self) -> dict[tuple[str, Status], int]:
        """How many jobs per (queue, status)."""
        rows = await self._fetch("counts", _Q["counts"], {})
        return {(r["queue"], Status(r["status"])): int(r["n"]) for r in rows}

    async def prune(self, older_than: float, statuses: frozenset[Status]) -> int:
        """Delete finished jobs (attempts and audit cascade) in chunks, one transaction each."""
        if not statuses:
            return 0
        params = {
            "now": self._now(),
            "older_than": float(older_than),
            "statuses": sorted(s.value for s in statuses),
            "limit": _PRUNE_CHUNK,
        }
        total = 0
        async with self._connection("prune") as conn:
            while True:
                cur = await conn.execute(_Q["prune"], params)
                total += cur.rowcount
                if cur.rowcount < _PRUNE_CHUNK:
                    return total

    # -- outbox -----------------------------------------------------------------------------

    async def claim_events(self, limit: int, lease_seconds: float) -> list[Event]:
        """Lease due events, oldest first, never overtaking an older event of the same job."""
        if limit <= 0:
            return []
        rows = await self._fetch(
            "claim_events",
            _Q["claim_events"],
            {"now": self._now(), "limit": limit, "lease_seconds": float(lease_seconds)},
        )
        return sorted((_event(r) for r in rows), key=lambda e: e.id)

    async def ack_events(self, events: Sequence[Event]) -> int:
        """Delete delivered events, fenced by their lease token; return how many."""
        if not events:
            return 0
        async with self._connection("ack_events") as conn:
            cur = await conn.execute(
                _Q["ack_events"],
                {"ids": [e.id for e in events], "tokens": [e.lease_token for e in events]},
            )
            return cur.rowcount

    async def retry_event(self, event: Event, retry_in: float, error: str) -> bool:
        """Make a failed delivery due again in ``retry_in`` seconds (fenced by lease token)."""
        async with self._connection("retry_event") as conn:
            cur = await conn.execute(
                _Q["retry_event"],
                {
                    "now": self._now(),
                    "retry_in": max(0.0, float(retry_in)),
                    "error": error[:4000],
                    "id": event.id,
                    "token": event.lease_token,
                },
            )
            return cur.rowcount == 1
