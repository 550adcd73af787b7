"""The Redis store: jobs in hashes, due times and leases in sorted sets, transitions in Lua.

Every state transition is one Lua script (``store/lua/<name>.lua``, each prefixed with
``_lib.lua``), so no transition is ever half applied and every time comes from the server's
``TIME`` (or, in tests, from the injected clock passed as an argument).

Key layout, all under the hash-tagged root ``{prefix}`` (one cluster slot per namespace)::

    {p}:schema                  schema version
    {p}:seq                     job id counter
    {p}:layout                  "retry-sets" once retrying jobs are indexed in :retry:<queue>
    {p}:job:<id>                hash: the job (JSON fields as JSON text, times in microseconds)
    {p}:job:<id>:attempts       list: attempt records (JSON), oldest first
    {p}:job:<id>:audit          list: audit entries (JSON), oldest first
    {p}:all                     zset: every job id (score = id)
    {p}:status:<status>         zset: job ids per status (score = id)
    {p}:counts                  hash: "<status>|<queue>" -> number of jobs
    {p}:due:<queue>             zset: waiting (pending, retrying) ids, score = run_at
    {p}:retry:<queue>           zset: the retrying ones again, claimed first (older versions of
                                durably know only :due:, so they can share the namespace)
    {p}:leases                  zset: running ids, score = lease expiry
    {p}:finished                zset: ids with finished_at, score = finished_at (for pruning)
    {p}:keys                    hash: idempotency key -> live job id
    {p}:key:<key>               zset: ids of every job that had the key (score = id)
    {p}:batch:<batch_id>        zset: ids of the batch (score = id)
    {p}:batchcounts:<batch_id>  hash: status -> number of the batch's jobs
    {p}:wake:<queue>            list: wake-up tokens, popped by ``wait`` with BLPOP
    {p}:interrupt:<hash>        list: a token that ends one worker's ``wait_and_claim`` (its
                                BLPOP watches it too); expires after a minute
    {p}:evseq                   outbox event id counter
    {p}:event:<eid>             hash: one outbox event (its payload's source data, lease, ...)
    {p}:events                  zset: undelivered event ids (score = id)
    {p}:jobevents:<id>          zset: a job's undelivered event ids, for in-order delivery

Index members are zero-padded ids so that ties on a score order by id.

The hot scripts (enqueue, claim, complete) take compact arguments instead of a JSON document per
job, batch their index updates into one command per key, and return little: the cost of a bulk
call is mostly Redis commands and values crossing between Lua and Redis, all on Redis's one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from durably.errors import (
    ConfigError,
    Conflict,
    DurablyError,
    InvalidTransition,
    JobNotFound,
    KeyTaken,
    PayloadError,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from durably.events import batch_payload, processed_payload
from durably.job import (
    ACTIONS,
    JSON,
    Attempt,
    AuditEntry,
    Completion,
    Event,
    Job,
    JobFilter,
    NewJob,
    Outcome,
    Status,
    dumps_json,
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

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
QUEUE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

SCHEMA_VERSION = 1
MIGRATIONS = ("001_initial",)
"""Redis has no DDL: a migration is a step of the key layout, recorded in ``{p}:schema``."""

SCRIPTS = (
    "migrate",
    "enqueue",
    "upsert",
    "claim",
    "heartbeat",
    "complete",
    "release",
    "act",
    "prune",
    "claim_events",
    "ack_events",
    "retry_event",
)
"""Every Lua script the store runs; each file in ``store/lua`` but ``_lib.lua`` is one of them."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_PAGE = 200
_DRAFT_SLICE = 256
"""Larger enqueues draft their results in slices of this many jobs while the script runs; an
event-loop turn between slices costs little next to a slice."""
_PRUNE_BATCH = 500


def _us(dt: datetime) -> int:
    """Microseconds since the epoch, exactly."""
    return (dt - _EPOCH) // _MICRO


def _seconds_us(seconds: float) -> int:
    return round(seconds * 1_000_000)


_DATETIMES: dict[str, datetime] = {}


def _dt(value: str) -> datetime:
    """A stored time (microseconds since the epoch). Cached: the jobs of one bulk call mostly
    share their timestamps (now, now + lease, their enqueue time)."""
    found = _DATETIMES.get(value)
    if found is None:
        if len(_DATETIMES) >= 4096:
            _DATETIMES.clear()
        found = _DATETIMES[value] = _EPOCH + timedelta(microseconds=int(value))
    return found


def _opt_dt(value: str | None) -> datetime | None:
    return None if value is None else _dt(value)


def _opt_int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: str | None) -> float | None:
    return None if value is None else float(value)


_SCALARS = (str, int, float, bool, type(None))


def _dumps(value: JSON, what: str) -> str:
    """Compact JSON (ASCII, so never a raw newline, which enqueue.lua relies on)."""
    try:
        return dumps_json(value)
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: a circular value
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}") from exc


_FLAT_OBJECTS: dict[str, dict[str, Any]] = {}


def _object(text: str) -> Any:
    """A stored JSON object (policy, meta), unshared. The few distinct policies (snapshots of
    scalars) are parsed once: a copy of the cached value is cheaper than parsing again."""
    if text == "{}":
        return {}
    found = _FLAT_OBJECTS.get(text)
    if found is not None:
        return found.copy()
    value = _loads(text)
    if type(value) is dict and all(type(v) in _SCALARS for v in value.values()):
        if len(_FLAT_OBJECTS) >= 256:
            _FLAT_OBJECTS.clear()
        _FLAT_OBJECTS[text] = value.copy()
    return value


_ENCODED: dict[int, tuple[Mapping[str, JSON], tuple[Any, ...], tuple[type, ...], str]] = {}


def _encode_object(value: Mapping[str, JSON], what: str) -> str:
    """A policy or meta as JSON text. Enqueues pass the same policy snapshot again and again: a
    flat one is encoded once, and its text reused while the mapping holds the same items (in
    order, of the same types: ``1 == 1.0`` but their JSON differs)."""
    items = tuple(value.items())
    types = tuple(map(type, value.values()))
    known = _ENCODED.get(id(value))
    if known is not None and known[0] is value and known[1] == items and known[2] == types:
        return known[3]
    text = _dumps(dict(items), what)
    if all(t in _SCALARS for t in types):
        if len(_ENCODED) >= 256:
            _ENCODED.clear()
        _ENCODED[id(value)] = (value, items, types, text)
    return text


def _text(value: str | None) -> str | None:
    """Free text made valid UTF-8 (a lone surrogate, say from an exception message, becomes
    ``?``) so that Lua's JSON and Redis keep it intact."""
    return None if value is None else value.encode("utf-8", "replace").decode("utf-8")


def _field(value: object) -> str:
    """An optional job field as the hash stores it."""
    return repr(value) if isinstance(value, float) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


_STATUSES: Mapping[str, Status] = {s.value: s for s in Status}


_loads = loads_json


_JOB_FIELDS = (
    "id", "queue", "handler", "payload", "status", "attempts", "max_attempts", "policy",
    "run_at", "version", "created_at", "updated_at", "key", "timeout", "batch_id",
    "item_index", "event_scope", "meta", "worker_id", "lease_token", "lease_expires_at",
    "cancel_requested", "first_attempt_at", "finished_at", "classification", "last_error",
    "last_error_type", "result", "operator", "operator_notes",
)  # fmt: skip
# Jobs are built with positional arguments (keywords cost a fifth more, thousands of times per
# call): in this order.
if tuple(f.name for f in dataclasses.fields(Job)) != _JOB_FIELDS:
    raise ImportError("durably.job.Job has new fields: update durably.store.redis._JOB_FIELDS")


def _job(fields: Mapping[str, str], claim: _Claimed | None = None, token: str | None = None) -> Job:
    """A :class:`Job` from its hash fields (a missing field is ``None``); with ``claim``, as the
    claim that read them (under lease ``token``) left the job."""
    g = fields.get
    max_attempts = g("max_attempts")
    timeout = g("timeout")
    item_index = g("item_index")
    first_attempt_at = g("first_attempt_at")
    finished_at = g("finished_at")
    result = g("result")
    if claim is None:
        lease_expires_at = g("lease_expires_at")
        status = _STATUSES[fields["status"]]
        attempts = int(fields["attempts"])
        version = int(fields["version"])
        updated_at = _dt(fields["updated_at"])
        worker_id, lease_token = g("worker_id"), g("lease_token")
        expires = None if lease_expires_at is None else _dt(lease_expires_at)
        cancel_requested = g("cancel_requested") == "1"
        first = None if first_attempt_at is None else _dt(first_attempt_at)
    else:  # the claim's writes, the same as claim.lua's
        status = Status.RUNNING
        attempts = int(fields["attempts"]) + 1
        version = int(fields["version"]) + 1
        updated_at = claim.now
        worker_id, lease_token = claim.worker_id, token
        expires = claim.expires
        cancel_requested = False
        first = claim.now if first_attempt_at is None else _dt(first_attempt_at)
    return Job(  # positional: see _JOB_FIELDS
        int(fields["id"]),
        fields["queue"],
        fields["handler"],
        _loads(fields["payload"]),
        status,
        attempts,
        None if max_attempts is None else int(max_attempts),
        _object(g("policy", "{}")),
        _dt(fields["run_at"]),
        version,
        _dt(fields["created_at"]),
        updated_at,
        g("key"),
        None if timeout is None else float(timeout),
        g("batch_id"),
        None if item_index is None else int(item_index),
        g("event_scope"),
        _object(g("meta", "{}")),
        worker_id,
        lease_token,
        expires,
        cancel_requested,
        first,
        None if finished_at is None else _dt(finished_at),
        g("classification"),
        g("last_error"),
        g("last_error_type"),
        None if result is None else _loads(result),
        g("operator"),
        g("operator_notes"),
    )


def _event(fields: Mapping[str, str]) -> Event:
    """An :class:`Event` from its hash; the payload is built from the state it recorded."""
    data = json.loads(fields["data"])
    payload: dict[str, JSON]
    if fields["kind"] == "batch":
        counts = {str(k): int(v) for k, v in data["counts"].items()}
        payload = batch_payload(data["batch_id"], counts, _dt(data["at"]))
    else:
        payload = processed_payload(_job(data))
    return Event(
        id=int(fields["id"]),
        type=fields["type"],
        payload=payload,
        created_at=_dt(fields["created_at"]),
        job_id=_opt_int(fields.get("job_id")),
        attempts=int(fields["attempts"]),
        lease_token=fields.get("lease_token"),
    )


def _matches(job: Job, where: JobFilter) -> bool:
    return (
        (where.statuses is None or job.status in where.statuses)
        and (where.queue is None or job.queue == where.queue)
        and (where.handler is None or job.handler == where.handler)
        and (where.batch_id is None or job.batch_id == where.batch_id)
        and (where.classification is None or job.classification == where.classification)
        and (where.key is None or job.key == where.key)
    )


def _check_queue(queue: str) -> str:
    if not QUEUE_PATTERN.match(queue):
        raise ConfigError(
            f"invalid queue name {queue!r}: use 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    return queue


_ITEM_INDEX = re.compile(r"-?[0-9]+")


@dataclasses.dataclass(slots=True)
class _Template:
    """What a run of enqueued jobs shares: everything but payload, key and item index."""

    queue: str
    handler: str
    policy: str
    meta: str
    delay_us: int
    max_attempts: str | None
    timeout: str | None
    batch_id: str | None
    event_scope: str | None
    number: int = 0
    """Its place in the script's arguments, from 1."""
    # Filled in by _Enqueue.draft: what the template's created jobs share.
    jobs: int = 0
    max_attempts_value: int | None = None
    timeout_value: float | None = None
    policy_copy: Callable[[], Any] = dict
    meta_copy: Callable[[], Any] = dict

    def args(self) -> list[str | int]:
        return [
            self.queue,
            self.handler,
            self.policy,
            self.meta,
            self.delay_us,
            self.max_attempts or "",
            self.timeout or "",
            "" if self.batch_id is None else "=" + self.batch_id,
            "" if self.event_scope is None else "=" + self.event_scope,
        ]

    def prepare(self) -> None:
        self.max_attempts_value = _opt_int(self.max_attempts)
        self.timeout_value = _opt_float(self.timeout)
        self.policy_copy = self._copier(self.policy)
        self.meta_copy = self._copier(self.meta)

    def _copier(self, text: str) -> Callable[[], Any]:
        """Makes a decoded, unshared copy of ``text`` (policy or meta) per call: a shallow copy
        when nothing in it is mutable (a policy snapshot), else one of ``jobs`` copies decoded in
        one parse."""
        if text == "{}":
            return dict
        value = _object(text)
        if text in _FLAT_OBJECTS:
            return value.copy  # type: ignore[no-any-return]
        return list(_loads("[" + ",".join([text] * self.jobs) + "]")).pop


class _Enqueue:
    """One enqueue call: the arguments of enqueue.lua, then the results built from its reply.

    A created job is built here from what was sent rather than read back: the script returns
    only the first new id and its clock.
    """

    def __init__(self, jobs: Sequence[NewJob]) -> None:
        self.templates: list[_Template] = []
        # (template, key, item index) and the payload JSON per job, in order.
        self.rows: list[tuple[_Template, str | None, str | None]] = []
        self.payloads: list[str] = []
        self.runs: list[str | int] = []
        by_shape: dict[tuple[Any, ...], _Template] = {}
        texts: dict[int, tuple[Mapping[str, JSON], str]] = {}

        def text(value: Mapping[str, JSON], what: str) -> str:
            # Bulk enqueues share one policy snapshot: encode it once per call.
            known = texts.get(id(value))
            if known is None or known[0] is not value:
                known = (value, _encode_object(value, what))
                texts[id(value)] = known
            return known[1]

        run: tuple[_Template, bool, bool] | None = None
        start = 0
        keys: list[str] = []
        items: list[str] = []
        for job in jobs:
            policy, meta = job.policy, job.meta
            shape = (
                job.queue,
                job.handler,
                text(policy, "policy") if policy else "{}",
                text(meta, "meta") if meta else "{}",
                job.delay,
                job.max_attempts,
                job.timeout,
                job.batch_id,
                job.event_scope,
            )
            template = by_shape.get(shape)
            if template is None:
                template = _Template(
                    queue=_check_queue(job.queue),
                    handler=job.handler,
                    policy=shape[2],
                    meta=shape[3],
                    delay_us=max(0, _seconds_us(job.delay)),
                    max_attempts=None if job.max_attempts is None else _field(job.max_attempts),
                    timeout=None if job.timeout is None else _field(job.timeout),
                    batch_id=None if job.batch_id is None else _field(job.batch_id),
                    event_scope=None if job.event_scope is None else _field(job.event_scope),
                )
                by_shape[shape] = template
                self.templates.append(template)
                template.number = len(self.templates)
            key = None if job.key is None else _field(job.key)
            item = None
            if job.item_index is not None:
                item = _field(job.item_index)
                if not _ITEM_INDEX.fullmatch(item):
                    raise ConfigError(f"item_index must be an integer, not {job.item_index!r}")
            this_run = (template, key is not None, item is not None)
            if this_run != run:
                if run is not None:
                    self._add_run(run, start, keys, items)
                run, start, keys, items = this_run, len(self.payloads), [], []
            encoded = job.payload_json
            # The runs' payloads are joined by newlines: only compact JSON text can be taken
            # as it is.
            if encoded is None or "\n" in encoded:
                encoded = _dumps(job.payload, "payload")
            self.payloads.append(encoded)
            if key is not None:
                keys.append(key)
            if item is not None:
                items.append(item)
            self.rows.append((template, key, item))
        if run is not None:
            self._add_run(run, start, keys, items)

    def _add_run(
        self, run: tuple[_Template, bool, bool], start: int, keys: list[str], items: list[str]
    ) -> None:
        template, has_keys, has_items = run
        number = template.number
        payloads = self.payloads[start:]
        self.runs.append(f"{number},{len(payloads)},{int(has_keys)},{int(has_items)}")
        self.runs.append("\n".join(payloads))
        self.runs += keys
        if has_items:
            self.runs.append(",".join(items))

    def args(self, now: str) -> list[str | int]:
        args: list[str | int] = [now, len(self.templates)]
        for template in self.templates:
            args += template.args()
        return args + self.runs

    def draft(self) -> Iterator[list[EnqueueResult]]:
        """The results as if every job was created, all but what the reply tells (id, times),
        in slices of ``_DRAFT_SLICE`` jobs: drafted while the script runs, completed by
        :meth:`finish`."""
        # Decoded copies, as a read would return them; one parse for the whole call.
        payloads = _loads("[" + ",".join(self.payloads) + "]")
        for template in self.templates:
            template.jobs = 0
        for template, _key, _item in self.rows:
            template.jobs += 1
        for template in self.templates:
            template.prepare()
        pending = Status.PENDING
        rows = self.rows
        for start in range(0, len(rows), _DRAFT_SLICE):
            stop = start + _DRAFT_SLICE
            yield [
                EnqueueResult(
                    Job(  # positional: see _JOB_FIELDS
                        0,
                        template.queue,
                        template.handler,
                        payload,
                        pending,
                        0,
                        template.max_attempts_value,
                        template.policy_copy(),
                        _EPOCH,
                        1,
                        _EPOCH,
                        _EPOCH,
                        key,
                        template.timeout_value,
                        template.batch_id,
                        None if item is None else int(item),
                        template.event_scope,
                        template.meta_copy(),
                    ),
                    True,
                )
                for (template, key, item), payload in zip(
                    rows[start:stop], payloads[start:stop], strict=True
                )
            ]

    def finish(self, reply: Sequence[Any], draft: list[EnqueueResult]) -> list[EnqueueResult]:
        """The results: ``draft`` with the ids and times of the reply, and the jobs that live
        keys held instead of the drafts that were not created."""
        now_text, first_id, found = reply
        now_us = int(now_text)
        now = _dt(now_text)
        for position in range(0, len(found), 2):
            draft[int(found[position]) - 1] = EnqueueResult(
                _job(_loads(str(found[position + 1]))), False
            )
        run_at = {id(t): _dt(str(now_us + t.delay_us)) for t in self.templates}
        next_id = int(first_id)
        set_id, set_run_at, set_created, set_updated = _DRAFT_SETTERS
        # The drafts are not out yet: completing them in place is cheaper than building anew.
        for (template, _key, _item), result in zip(self.rows, draft, strict=True):
            if result.created:
                job = result.job
                set_id(job, next_id)
                set_run_at(job, run_at[id(template)])
                set_created(job, now)
                set_updated(job, now)
                next_id += 1
        return draft


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Marks an abandoned task's outcome as seen (else asyncio logs it as never retrieved)."""
    if not task.cancelled():
        task.exception()


_DRAFT_SETTERS = tuple(
    Job.__dict__[name].__set__ for name in ("id", "run_at", "created_at", "updated_at")
)
"""Slot setters of the fields :meth:`_Enqueue.finish` completes (Job is frozen to its users)."""


_OUTCOME_CODES: Mapping[str, str] = {
    Outcome.SUCCEEDED: "s",
    Outcome.RETRY: "r",
    Outcome.DEAD_LETTER: "d",
    Outcome.CANCELLED: "c",
}


def _completion_args(c: Completion) -> list[str | int]:
    """One completion as complete.lua reads it (see there)."""
    code = _OUTCOME_CODES[Outcome(c.outcome)]
    # Tokens are hex; one that is not can match no lease, and must not break the header.
    token = c.lease_token if c.lease_token.isalnum() else "-"
    ending = '"outcome":' + encode_basestring_ascii(c.row_outcome)
    row_classification = c.row_classification
    if row_classification is not None:
        ending += ',"classification":' + encode_basestring_ascii(_text(row_classification) or "")
    error_type = _text(c.error_type)
    if error_type is not None:
        ending += ',"error_type":' + encode_basestring_ascii(error_type)
    error_message = _text(c.error_message)
    if error_message is not None:
        ending += ',"error_message":' + encode_basestring_ascii(error_message)
    if c.duration is not None:
        ending += f',"duration":"{float(c.duration)!r}"'
    fields: list[str | int] = []
    if code != "s":
        for name, value in (
            ("c", _text(c.classification)),
            ("m", error_message),
            ("t", error_type),
        ):
            if value is not None:
                fields += [name, value]
    job_id = int(c.job_id)
    spec = f"{job_id} {job_id:016d} {token} {code}"
    retry_us = max(0, _seconds_us(c.retry_in))
    has_result = c.result is not None
    if retry_us or c.require_expired or has_result or fields:
        spec += f" {retry_us} {int(c.require_expired)} {int(has_result)} {len(fields) // 2}"
    spec += "\n" + ending
    if has_result:
        spec += "\n" + _dumps(c.result, "result")
    return [spec, *fields]


class _Claimed:
    """A claimed job from the fields claim.lua read before claiming it, with the claim's writes
    (the same as the script's: see there) applied: cheaper than reading the hash back."""

    __slots__ = ("expires", "now", "worker_id")

    def __init__(self, now: str, worker_id: str, expires: str) -> None:
        self.now = _dt(now)
        self.worker_id = worker_id
        self.expires = _dt(expires)

    def job(self, row: Sequence[str], token: str) -> Job:
        flat = iter(row)
        return _job(dict(zip(flat, flat, strict=True)), self, token)


def _load_script(name: str) -> str:
    lua = resources.files("durably.store").joinpath("lua")
    return (
        lua.joinpath("_lib.lua").read_text("utf-8")
        + "\n"
        + lua.joinpath(f"{name}.lua").read_text("utf-8")
    )


class RedisStore:
    """A :class:`~durably.store.base.Store` on Redis (5.0+; 7+ recommended).

    >>> store = RedisStore("redis://localhost:6379/0", prefix="billing")  # doctest: +SKIP
    >>> await store.open()  # doctest: +SKIP

    Redis must not evict keys (``maxmemory-policy noeviction``) and should persist with AOF
    (see ``docs/redis.md``); ``open()`` refuses an evicting server unless ``allow_eviction``.
    Several applications may share one server with different ``prefix`` values.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "durably",
        clock: Callable[[], datetime] | None = None,
        allow_eviction: bool = False,
        socket_timeout: float | None = 30.0,
        socket_connect_timeout: float = 5.0,
        max_connections: int | None = None,
    ) -> None:
        if not PREFIX_PATTERN.match(prefix):
            raise ConfigError(
                f"invalid Redis prefix {prefix!r}: use 1-64 letters, digits, '_', '.', ':' or '-'"
            )
        self.url = mask_url(url)
        self.prefix = prefix
        self._raw_url = url
        self._root = "{" + prefix + "}"
        self._clock = clock
        self._allow_eviction = allow_eviction
        self._socket_timeout = socket_timeout
        self._connect_timeout = socket_connect_timeout
        self._max_connections = max_connections
        self.client_name = f"durably:{prefix}:{secrets.token_hex(6)}"
        """Unique ``CLIENT SETNAME`` of this store's connections (``:wait`` for wake-ups)."""
        self._client: aioredis.Redis | None = None
        self._waiter: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self.script_calls: dict[str, int] = dict.fromkeys(SCRIPTS, 0)
        """How often each Lua script ran (lets tests prove no script is dead)."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore:
        """A store for a ``redis://``, ``rediss://`` or ``unix://`` URL (options: ``__init__``).

        ``?prefix=name`` in the URL sets the key prefix (so the CLI's ``--url`` can reach any
        app's namespace); an explicit ``prefix=`` option wins.
        """
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for name, value in query if name == "prefix"]
        if prefixes:
            options.setdefault("prefix", prefixes[-1])
            rest = urlencode([(name, value) for name, value in query if name != "prefix"])
            url = urlunsplit(parts._replace(query=rest))
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    # -- plumbing --------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return ":".join((self._root, *parts))

    def _connect(self, name: str, socket_timeout: float | None) -> aioredis.Redis:
        # No automatic retries: re-sending a script whose reply was lost could apply it twice.
        # A connection killed while idle is replaced when next taken from the pool.
        kwargs: dict[str, Any] = {
            "decode_responses": True,
            "client_name": name,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": self._connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
        }
        if self._max_connections is not None:
            kwargs["max_connections"] = self._max_connections
        client: aioredis.Redis = aioredis.Redis.from_url(self._raw_url, **kwargs)
        return client

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreError(f"{self!r} is not open: await store.open() first")
        return self._client

    @contextlib.asynccontextmanager
    async def _errors(self, doing: str) -> AsyncIterator[None]:
        try:
            yield
        except DurablyError:
            raise
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise StoreUnavailable(
                f"Redis at {self.url} is unavailable while {doing}: {exc}"
            ) from exc
        except redis_errors.RedisError as exc:
            raise StoreError(f"Redis at {self.url} failed while {doing}: {exc}") from exc

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(_us(self._clock()))

    async def _run(self, name: str, args: Sequence[str | int]) -> Any:
        self.script_calls[name] += 1
        script = self._scripts[name]
        client = self._redis
        # EVALSHA directly rather than through AsyncScript.__call__, whose per-call overhead
        # shows in the latency of single-job calls; a flushed script cache is handled alike.
        try:
            return await client.evalsha(script.sha, 1, self._root, *args)
        except redis_errors.NoScriptError:
            script.sha = await client.script_load(script.script)
            return await client.evalsha(script.sha, 1, self._root, *args)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, refuse an evicting server, refuse a newer schema, migrate if behind."""
        if self._client is not None:
            return
        client = self._connect(self.client_name, self._socket_timeout)
        self._client = client
        self._waiter = self._connect(self.client_name + ":wait", None)
        self._scripts = {name: client.register_script(_load_script(name)) for name in SCRIPTS}
        try:
            async with self._errors("opening"):
                await self._check_eviction(client)
                await self.migrate()
        except BaseException:
            await self.close()
            raise

    async def _check_eviction(self, client: aioredis.Redis) -> None:
        try:
            config = await client.config_get("maxmemory-policy")
        except redis_errors.ResponseError as exc:
            log.warning(
                "cannot read maxmemory-policy of Redis at %s (%s); make sure it is 'noeviction', "
                "or Redis may silently drop jobs under memory pressure",
                self.url,
                exc,
            )
            return
        policy = config.get("maxmemory-policy", "noeviction")
        if policy != "noeviction" and not self._allow_eviction:
            raise ConfigError(
                f"Redis at {self.url} has maxmemory-policy {policy!r}: under memory pressure it "
                "would silently evict jobs. Run 'CONFIG SET maxmemory-policy noeviction' (and set "
                "it in redis.conf), or pass allow_eviction=True if losing jobs is acceptable."
            )

    async def close(self) -> None:
        """Release connections. Idempotent."""
        clients = [c for c in (self._client, self._waiter) if c is not None]
        self._client = self._waiter = None
        for client in clients:
            with contextlib.suppress(redis_errors.RedisError, OSError):
                await client.aclose()

    async def migrate(self, *, dry_run: bool = False) -> list[str]:
        """Bring the key layout to this code's schema (atomically); return the steps applied."""
        async with self._errors("migrating"):
            current, _applied = await self._run(
                "migrate", [SCHEMA_VERSION, "1" if dry_run else "0"]
            )
        current = int(current)
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"Redis prefix {self.prefix!r} at {self.url} has schema {current}, newer than "
                f"this durably ({SCHEMA_VERSION}); upgrade durably to use it"
            )
        return list(MIGRATIONS[current:SCHEMA_VERSION])

    async def schema_version(self) -> int:
        """The schema recorded under the prefix (0 for an empty namespace)."""
        async with self._errors("reading the schema version"):
            value = await self._redis.get(self._k("schema"))
        return int(value or 0)

    async def now(self) -> datetime:
        """The store's clock: the injected one, else Redis ``TIME``."""
        if self._clock is not None:
            return self._clock()
        async with self._errors("reading the time"):
            seconds, micros = await self._redis.time()
        return _EPOCH + timedelta(seconds=int(seconds), microseconds=int(micros))

    async def drop_namespace(self) -> None:
        """Delete every key under this store's prefix (tests and teardown)."""
        async with self._errors("dropping the namespace"):
            batch: list[str] = []
            async for key in self._redis.scan_iter(match=self._k("*"), count=500):
                batch.append(key)
                if len(batch) >= 500:
                    await self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                await self._redis.unlink(*batch)

    # -- producers -------------------------------------------------------------------------

    def _spec(self, job: NewJob) -> str:
        fields: dict[str, str] = {
            "queue": _check_queue(job.queue),
            "handler": job.handler,
            "payload": _dumps(job.payload, "payload"),
            "policy": _dumps(dict(job.policy), "policy"),
            "meta": _dumps(dict(job.meta), "meta"),
        }
        optional: dict[str, object] = {
            "key": job.key,
            "max_attempts": job.max_attempts,
            "timeout": job.timeout,
            "batch_id": job.batch_id,
            "item_index": job.item_index,
            "event_scope": job.event_scope,
        }
        for name, value in optional.items():
            if value is not None:
                fields[name] = repr(value) if isinstance(value, float) else str(value)
        return json.dumps({"f": fields, "delay": max(0, _seconds_us(job.delay))})

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[EnqueueResult]:
        """Insert jobs in one script call, in order; live keys return their job."""
        if not jobs:
            return []
        call = _Enqueue(jobs)
        args = call.args(self._now_arg())
        draft: list[EnqueueResult] = []
        async with self._errors("enqueueing"):
            if len(jobs) <= _DRAFT_SLICE:
                reply = await self._run("enqueue", args)
                for part in call.draft():
                    draft += part
            else:
                # The script runs on the server while the results are drafted here, a slice at a
                # time: each pause lets the call's task on until it has sent the script.
                running = asyncio.ensure_future(self._run("enqueue", args))
                try:
                    for part in call.draft():
                        await asyncio.sleep(0)
                        draft += part
                except BaseException:
                    running.cancel()
                    # Should it fail as well, this error supersedes its own: mark that one seen.
                    running.add_done_callback(_retrieve)
                    raise
                reply = await running
        return call.finish(reply, draft)

    async def upsert(self, job: NewJob) -> EnqueueResult:
        """Enqueue by key, or replace the live (not running) job's payload, meta and policy."""
        if job.key is None:
            raise ConfigError("upsert needs a job with a key")
        spec = self._spec(job)
        async with self._errors("upserting"):
            created, doc = await self._run("upsert", [self._now_arg(), spec])
        return EnqueueResult(_job(json.loads(doc)), created == 1)

    # -- workers ---------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> list[Job]:
        """Claim due jobs under fresh leases (see :class:`ClaimRequest`)."""
        if request.limit <= 0 or not request.queues:
            return []
        args, tokens = self._claim_args(request)
        async with self._errors("claiming"):
            reply = await self._run("claim", args)
        return self._claimed(request, reply, tokens)

    def _claim_args(self, request: ClaimRequest) -> tuple[list[str | int], str]:
        """The claim script's arguments, and the lease tokens they hand out."""
        queues = [_check_queue(q) for q in dict.fromkeys(request.queues)]
        tokens = secrets.token_hex(16 * request.limit)  # 32 characters per job
        args: list[str | int] = [
            self._now_arg(),
            request.worker_id,
            request.limit,
            _seconds_us(request.lease_seconds),
            request.batch_id or "",
            "1" if request.due_only else "0",
            len(queues),
            *queues,
            tokens,
        ]
        return args, tokens

    @staticmethod
    def _claimed(request: ClaimRequest, reply: Any, tokens: str) -> list[Job]:
        now = reply[0]
        expires = str(int(now) + _seconds_us(request.lease_seconds))
        attempt = _Claimed(now, request.worker_id, expires)
        return [attempt.job(row, tokens[32 * k : 32 * k + 32]) for k, row in enumerate(reply[1:])]

    def _interrupt_key(self, worker_id: str) -> str:
        # Hashed: a worker id may hold any character, and a key built from it must not.
        return self._k("interrupt", hashlib.sha256(worker_id.encode()).hexdigest()[:32])

    async def wait_and_claim(self, request: ClaimRequest, timeout: float) -> list[Job]:
        """BLPOP on the queues' wake lists and the worker's interrupt list, the claim behind it.

        Both go in one pipeline on the wait connection: Redis runs the claim script as soon
        as the BLPOP is served (or times out), and both replies come back together.
        """
        if self._waiter is None:
            raise StoreError(f"{self!r} is not open: await store.open() first")
        if request.limit <= 0 or not request.queues:
            return []
        if timeout <= 0:
            return await self.claim(request)  # BLPOP's timeout 0 would block for ever
        keys = [self._k("wake", _check_queue(q)) for q in request.queues]
        keys.append(self._interrupt_key(request.worker_id))
        args, tokens = self._claim_args(request)
        script = self._scripts["claim"]
        self.script_calls["claim"] += 1
        pipe = self._waiter.pipeline(transaction=False)
        pipe.blpop(keys, timeout=timeout)
        pipe.evalsha(script.sha, 1, self._root, *args)
        async with self._errors("waiting for jobs and claiming"):
            try:
                _, reply = await pipe.execute()
            except redis_errors.NoScriptError:
                # The server lost its scripts (a restart, SCRIPT FLUSH): the wait is over.
                return await self.claim(request)
        return self._claimed(request, reply, tokens)

    async def interrupt_wait(self, worker_id: str) -> None:
        """Push a token onto the worker's interrupt list (a minute to live)."""
        key = self._interrupt_key(worker_id)
        async with self._errors("interrupting a wait"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.lpush(key, "1")
            pipe.expire(key, 60)
            await pipe.execute()

    async def heartbeat(self, leases: Sequence[Lease], lease_seconds: float) -> HeartbeatResult:
        """Extend the leases still held; report which were renewed and which should cancel."""
        if not leases:
            return HeartbeatResult(frozenset(), frozenset())
        args: list[str | int] = [self._now_arg(), _seconds_us(lease_seconds)]
        for lease in leases:
            args += [lease.job_id, lease.lease_token]
        async with self._errors("heartbeating"):
            renewed, cancel = await self._run("heartbeat", args)
        return HeartbeatResult(
            frozenset(int(i) for i in renewed), frozenset(int(i) for i in cancel)
        )

    async def complete(self, completions: Sequence[Completion]) -> list[bool]:
        """Apply attempt endings in one script call, fenced by lease token."""
        if not completions:
            return []
        args: list[str | int] = [self._now_arg()]
        for c in completions:
            args += _completion_args(c)
        async with self._errors("completing"):
            applied = await self._run("complete", args)
        return [flag == 1 for flag in applied]

    async def release(self, leases: Sequence[Lease]) -> int:
        """Hand back claimed, unstarted jobs as if never claimed; return how many."""
        if not leases:
            return 0
        args: list[str | int] = [self._now_arg()]
        for lease in leases:
            args += [lease.job_id, lease.lease_token]
        async with self._errors("releasing"):
            released = await self._run("release", args)
        return int(released)

    async def expired(self, limit: int) -> list[Job]:
        """Running jobs whose lease expired on the store's clock, oldest expiry first."""
        if limit <= 0:
            return []
        now = _us(await self.now())
        async with self._errors("listing expired leases"):
            members = await self._redis.zrangebyscore(
                self._k("leases"), "-inf", f"({now}", start=0, num=limit
            )
            jobs = await self._fetch(int(str(m)) for m in members)
        return [
            j
            for j in jobs
            if j.status is Status.RUNNING
            and j.lease_expires_at is not None
            and _us(j.lease_expires_at) < now
        ]

    async def next_due_in(self, queues: Sequence[str]) -> float | None:
        """Seconds until the earliest waiting job in ``queues`` is due (0 if due now)."""
        if not queues:
            return None
        async with self._errors("reading due times"):
            pipe = self._redis.pipeline(transaction=False)
            for queue in queues:
                pipe.zrange(self._k("due", _check_queue(queue)), 0, 0, withscores=True)
            heads = await pipe.execute()
        scores = [float(head[0][1]) for head in heads if head]
        if not scores:
            return None
        now = _us(await self.now())
        return max(0.0, (min(scores) - now) / 1_000_000)

    async def wait(self, queues: Sequence[str], timeout: float) -> bool:
        """Block (BLPOP on the queues' wake lists) until an enqueue wakes us or ``timeout``."""
        if self._waiter is None:
            raise StoreError(f"{self!r} is not open: await store.open() first")
        if not queues:
            await asyncio.sleep(max(0.0, timeout))
            return False
        keys = [self._k("wake", _check_queue(q)) for q in queues]
        async with self._errors("waiting for jobs"):
            if timeout <= 0:
                pipe = self._waiter.pipeline(transaction=False)
                for key in keys:
                    pipe.lpop(key)
                return any(v is not None for v in await pipe.execute())
            popped = await self._waiter.blpop(keys, timeout=timeout)
        return popped is not None

    # -- operators -------------------------------------------------------------------------

    async def _fetch(self, ids: Iterable[int]) -> list[Job]:
        """The jobs with these ids, in order, skipping ids that no longer exist."""
        pipe = self._redis.pipeline(transaction=False)
        count = 0
        for job_id in ids:
            pipe.hgetall(self._k("job", str(job_id)))
            count += 1
        if not count:
            return []
        return [_job(fields) for fields in await pipe.execute() if fields]

    async def get(self, job_id: int) -> Job:
        """The job, or ``JobNotFound``."""
        async with self._errors("reading a job"):
            fields = await self._redis.hgetall(self._k("job", str(int(job_id))))
        if not fields:
            raise JobNotFound(job_id)
        return _job({str(k): str(v) for k, v in fields.items()})

    async def get_by_key(self, key: str) -> Job | None:
        """The live job holding ``key``, else the newest job that had it, else None."""
        async with self._errors("reading a job by key"):
            live = await self._redis.hget(self._k("keys"), key)
            candidates = [int(live)] if live is not None else []
            newest = await self._redis.zrevrange(self._k("key", key), 0, 0)
            candidates += [int(str(m)) for m in newest]
            for job in await self._fetch(candidates):
                if job.key == key:
                    return job
        return None

    async def list_jobs(
        self, where: JobFilter, *, limit: int = 100, after_id: int | None = None
    ) -> list[Job]:
        """Jobs matching ``where``, newest first, below ``after_id`` if given."""
        if limit <= 0:
            return []
        if where.key is not None:
            sources = [self._k("key", where.key)]
        elif where.batch_id is not None:
            sources = [self._k("batch", where.batch_id)]
        elif where.statuses is not None:
            sources = [self._k("status", Status(s).value) for s in where.statuses]
        else:
            sources = [self._k("all")]
        found: list[Job] = []
        below = after_id
        async with self._errors("listing jobs"):
            while sources and len(found) < limit:
                ids = await self._page(sources, below)
                if not ids:
                    break
                found += [j for j in await self._fetch(ids) if _matches(j, where)]
                below = ids[-1]
        return found[:limit]

    async def _page(self, sources: Sequence[str], below: int | None) -> list[int]:
        """The next ``_PAGE`` ids (descending) below ``below`` across the index sets."""
        top = "+inf" if below is None else f"({below}"
        pipe = self._redis.pipeline(transaction=False)
        for source in sources:
            pipe.zrevrangebyscore(source, top, "-inf", start=0, num=_PAGE)
        merged = {int(m) for members in await pipe.execute() for m in members}
        return sorted(merged, reverse=True)[:_PAGE]

    async def attempts(self, job_id: int) -> list[Attempt]:
        """The job's attempts, oldest first."""
        entries = await self._history(job_id, "attempts")
        return [
            Attempt(
                job_id=int(e["job_id"]),
                number=int(e["number"]),
                worker_id=e["worker_id"],
                started_at=_dt(e["started_at"]),
                finished_at=_opt_dt(e.get("finished_at")),
                outcome=e.get("outcome"),
                classification=e.get("classification"),
                error_type=e.get("error_type"),
                error_message=e.get("error_message"),
                duration=_opt_float(e.get("duration")),
            )
            for e in entries
        ]

    async def audit(self, job_id: int) -> list[AuditEntry]:
        """The job's audit trail, oldest first."""
        entries = await self._history(job_id, "audit")
        return [
            AuditEntry(
                job_id=int(e["job_id"]),
                at=_dt(e["at"]),
                actor=e["actor"],
                action=e["action"],
                from_status=e["from_status"],
                to_status=e["to_status"],
                version=int(e["version"]),
                notes=e.get("notes"),
            )
            for e in entries
        ]

    async def _history(self, job_id: int, kind: str) -> list[dict[str, str]]:
        """The job's ``attempts`` or ``audit`` entries (none for an unknown job)."""
        async with self._errors(f"reading {kind}"):
            raw = await self._redis.lrange(self._k("job", str(int(job_id)), kind), 0, -1)
        return [json.loads(entry) for entry in raw]

    async def act(self, request: ActionRequest) -> Job:
        """Apply one operator action with its audit entry (see :class:`ActionRequest`)."""
        rule = ACTIONS[request.action]
        spec: dict[str, object] = {
            "id": int(request.job_id),
            "action": request.action.value,
            "target": rule.target.value,
            "sources": sorted(s.value for s in rule.sources),
            "actor": _text(request.actor),
            "reset": request.reset_attempts,
        }
        if request.notes is not None:
            spec["notes"] = _text(request.notes)
        if request.expected_version is not None:
            spec["expected_version"] = request.expected_version
        async with self._errors(f"applying {request.action.value}"):
            reply = await self._run("act", [self._now_arg(), json.dumps(spec)])
        code = reply[0]
        if code == "ok":
            return _job(json.loads(reply[1]))
        if code == "notfound":
            raise JobNotFound(request.job_id)
        if code == "conflict":
            raise Conflict(request.job_id, request.expected_version or 0, int(reply[1]))
        if code == "invalid":
            raise InvalidTransition(
                request.job_id,
                str(reply[1]),
                request.action.value,
                frozenset(s.value for s in rule.sources),
            )
        if code == "keytaken":
            raise KeyTaken(request.job_id, int(reply[1]))
        raise StoreError(f"unexpected reply from the act script: {reply!r}")

    async def counts(self) -> dict[tuple[str, Status], int]:
        """How many jobs per (queue, status)."""
        async with self._errors("counting jobs"):
            raw = await self._redis.hgetall(self._k("counts"))
        out: dict[tuple[str, Status], int] = {}
        for field, value in raw.items():
            status, _, queue = str(field).partition("|")
            if int(value) > 0:
                out[(queue, Status(status))] = int(value)
        return out

    async def prune(self, older_than: float, statuses: frozenset[Status]) -> int:
        """Delete jobs in ``statuses`` finished ``older_than`` seconds ago, in bounded batches."""
        if not statuses:
            return 0
        names = sorted(Status(s).value for s in statuses)
        total = 0
        async with self._errors("pruning"):
            while True:
                args: list[str | int] = [
                    self._now_arg(),
                    _seconds_us(older_than),
                    _PRUNE_BATCH,
                    *names,
                ]
                deleted, more = await self._run("prune", args)
                total += int(deleted)
                if not more:
                    return total

    # -- outbox ----------------------------------------------------------------------------

    async def claim_events(self, limit: int, lease_seconds: float) -> list[Event]:
        """Lease due events, oldest id first, never overtaking an older event of the same job."""
        if limit <= 0:
            return []
        tokens = [secrets.token_hex(16) for _ in range(limit)]
        args: list[str | int] = [self._now_arg(), limit, _seconds_us(lease_seconds), *tokens]
        async with self._errors("claiming events"):
            rows = await self._run("claim_events", args)
        return sorted((_event(_pairs(fields)) for fields in rows), key=lambda e: e.id)

    async def ack_events(self, events: Sequence[Event]) -> int:
        """Delete delivered events, fenced by their lease token; return how many."""
        args: list[str | int] = []
        for event in events:
            if event.lease_token is not None:
                args += [event.id, event.lease_token]
        if not args:
            return 0
        async with self._errors("acknowledging events"):
            return int(await self._run("ack_events", args))

    async def retry_event(self, event: Event, retry_in: float, error: str) -> bool:
        """Make a failed delivery due again in ``retry_in`` seconds (fenced by lease token)."""
        if event.lease_token is None:
            return False
        args: list[str | int] = [
            self._now_arg(),
            event.id,
            event.lease_token,
            max(0, _seconds_us(retry_in)),
            _text(error[:4000]) or "",
        ]
        async with self._errors("retrying an event"):
            return int(await self._run("retry_event", args)) == 1
