"""Jobs, their attempts and audit trail, and the state machine they move through.

See ``docs/state-machine.md`` for the diagram. Every store applies exactly these transitions; the
contract suite checks that they do.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

__all__ = [
    "ACTIONS",
    "EVENT_STATUSES",
    "JSON",
    "LIVE",
    "TERMINAL",
    "Action",
    "Attempt",
    "AuditEntry",
    "BadPayload",
    "Classification",
    "Completion",
    "Event",
    "Job",
    "JobFilter",
    "NewJob",
    "Outcome",
    "Status",
    "decode_json",
]

JSON: TypeAlias = Any
"""A value that ``json.dumps`` accepts: dict, list, str, int, float, bool or None."""


@dataclasses.dataclass(frozen=True, slots=True)
class BadPayload:
    """Stands for a stored payload that is not valid JSON. The worker dead-letters such a job
    with classification ``bad_payload`` instead of running it (or crashing on it)."""

    raw: str
    error: str


_RAW_DECODE = json.JSONDecoder().raw_decode


def loads_json(text: str | bytes) -> Any:
    """``json.loads``, cheaper for the small compact documents stores read by the thousand.

    ``json.loads`` spends much of a small document's time in its Python wrappers (and, for
    bytes, encoding detection); ``raw_decode`` skips them. Anything it does not take whole
    (surrounding whitespace, an error) goes to ``json.loads``: same value, same error.
    """
    if not isinstance(text, str):
        text = bytes(text).decode()
    try:
        value, end = _RAW_DECODE(text)
    except ValueError:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def _json_encoder() -> Callable[[Any], str]:
    """Compact, ASCII-only JSON that refuses NaN and infinities: the payload encoding.

    ``JSONEncoder.encode`` builds a new C encoder on every call, most of the cost of encoding
    a small payload; this one is built once. It keeps no circular-reference markers (shared
    markers would make it unsafe across threads): a circular or absurdly deep value raises
    ``RecursionError`` instead.
    """
    plain = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C encoder
        return plain.encode
    encode = make(
        None,  # markers
        plain.default,
        json.encoder.encode_basestring_ascii,
        None,  # indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )
    join = "".join

    def dumps(value: Any) -> str:
        return join(encode(value, 0))

    return dumps


dumps_json: Callable[[Any], str] = _json_encoder()
"""``json.dumps(value, separators=(",", ":"), allow_nan=False)``, several times cheaper for
small values; raises ``TypeError``/``ValueError`` like it, and ``RecursionError`` for a
circular value (where ``json.dumps`` raises ``ValueError``)."""


def decode_json(text: str | bytes | None) -> JSON:
    """Decode a stored JSON column; undecodable text becomes a :class:`BadPayload`.

    Stores use this for payloads (and results), so one bad row can never break a claim.
    """
    if text is None:
        return None
    try:
        return loads_json(text)
    except (ValueError, TypeError) as exc:
        raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        return BadPayload(raw=raw[:1000], error=str(exc))


class Status(enum.StrEnum):
    """Where a job is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    DEAD_LETTER = "dead_letter"
    RESOLVED = "resolved"
    ABANDONED = "abandoned"
    CANCELLED = "cancelled"


TERMINAL: frozenset[Status] = frozenset(
    {Status.SUCCEEDED, Status.RESOLVED, Status.ABANDONED, Status.CANCELLED}
)
"""Statuses a job never leaves."""

LIVE: frozenset[Status] = frozenset({Status.PENDING, Status.RUNNING, Status.RETRYING})
"""Statuses in which a job still holds its idempotency key and may still run."""


class Classification(enum.StrEnum):
    """Why an attempt failed, or why a job was dead-lettered.

    Stores keep these as plain strings, so handlers and built-in operations may add their own
    (the HTTP operation uses ``http_4xx``).
    """

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    LEASE_EXPIRED = "lease_expired"
    UNKNOWN_HANDLER = "unknown_handler"
    BAD_PAYLOAD = "bad_payload"
    EXHAUSTED = "exhausted"
    BUDGET_EXHAUSTED = "budget_exhausted"
    POISON = "poison"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    HTTP_4XX = "http_4xx"


EVENT_STATUSES: frozenset[Status] = TERMINAL | {Status.DEAD_LETTER}
"""Reaching one of these writes a ``<scope>.processed`` event for a job with an event scope."""


class Outcome(enum.StrEnum):
    """What a worker (or the rescuer) decided at the end of an attempt: the job's next status."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    CANCELLED = "cancelled"


class Action(enum.StrEnum):
    """Operator actions, each audited."""

    CANCEL = "cancel"
    RESOLVE = "resolve"
    REQUEUE = "requeue"
    ABANDON = "abandon"


@dataclasses.dataclass(frozen=True, slots=True)
class ActionRule:
    """Which statuses an operator action starts from and where it leads."""

    sources: frozenset[Status]
    target: Status


ACTIONS: Mapping[Action, ActionRule] = {
    # A running job cannot be cancelled outright: its worker is asked to stop (cancel_requested).
    Action.CANCEL: ActionRule(
        frozenset({Status.PENDING, Status.RETRYING, Status.DEAD_LETTER}), Status.CANCELLED
    ),
    Action.RESOLVE: ActionRule(frozenset({Status.DEAD_LETTER}), Status.RESOLVED),
    Action.ABANDON: ActionRule(frozenset({Status.DEAD_LETTER}), Status.ABANDONED),
    Action.REQUEUE: ActionRule(
        frozenset({Status.DEAD_LETTER, Status.CANCELLED, Status.ABANDONED, Status.RETRYING}),
        Status.PENDING,
    ),
}
"""The operator transitions. Stores apply them guarded by these source statuses."""


_T = TypeVar("_T")


class _Factory:
    """The default of a field with a default factory, in a quick ``__init__``'s signature."""

    def __repr__(self) -> str:
        return "<factory>"


_NO_VALUE: Any = _Factory()


def _quick_init(cls: type[_T]) -> type[_T]:
    """Give a frozen slotted dataclass a faster ``__init__`` with the same signature.

    The dataclass's own ``__init__`` sets each field with ``object.__setattr__``, half the cost
    of building the jobs a store reads or writes by the thousand; this one calls each slot's
    setter, bound once. Same parameters, defaults and default factories; no ``__post_init__``.
    """
    if "__post_init__" in dir(cls):  # pragma: no cover - guarded for future fields
        raise TypeError(f"{cls.__name__} has a __post_init__; _quick_init would skip it")
    params: list[str] = []
    lines: list[str] = []
    env: dict[str, Any] = {"_NO_VALUE": _NO_VALUE}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        env[f"_set_{field.name}"] = cls.__dict__[field.name].__set__
        if field.default is not dataclasses.MISSING:
            env[f"_default_{field.name}"] = field.default
            params.append(f"{field.name}=_default_{field.name}")
        elif field.default_factory is not dataclasses.MISSING:
            env[f"_factory_{field.name}"] = field.default_factory
            params.append(f"{field.name}=_NO_VALUE")
            lines.append(f"        if {field.name} is _NO_VALUE:")
            lines.append(f"            {field.name} = _factory_{field.name}()")
        else:
            params.append(field.name)
        lines.append(f"        _set_{field.name}(self, {field.name})")
    names = ", ".join(env)
    source = (
        f"def _make({names}):\n"
        f"    def __init__(self, {', '.join(params)}):\n" + "\n".join(lines) + "\n"
        "    return __init__\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, {}, namespace)  # noqa: S102 - our own field names only, as dataclasses does
    init = namespace["_make"](**env)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    init.__annotations__ = dict(cls.__init__.__annotations__)  # for help() and signature()
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@_quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class NewJob:
    """A job to enqueue. ``policy`` is the policy snapshot (``RetryPolicy.to_dict()``)."""

    handler: str
    payload: JSON
    queue: str = "default"
    key: str | None = None
    max_attempts: int | None = None
    policy: Mapping[str, JSON] = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    """Seconds from the store's now until the first attempt may run."""
    timeout: float | None = None
    """Seconds one attempt may take; ``None`` means no limit."""
    batch_id: str | None = None
    item_index: int | None = None
    event_scope: str | None = None
    meta: Mapping[str, JSON] = dataclasses.field(default_factory=dict)
    """Free-form context carried to logs and events: ``request_id``, ``trace_id``, ..."""
    payload_json: str | None = dataclasses.field(default=None, compare=False, repr=False)
    """``payload`` already encoded as compact JSON (the app encodes it once to check its size);
    a store may write it instead of encoding the payload again. ``None``: the store encodes."""


@_quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """A stored job, as read from a store. Immutable: every change produces a new version."""

    id: int
    queue: str
    handler: str
    payload: JSON
    status: Status
    attempts: int
    max_attempts: int | None
    policy: Mapping[str, JSON]
    run_at: datetime
    version: int
    created_at: datetime
    updated_at: datetime
    key: str | None = None
    timeout: float | None = None
    batch_id: str | None = None
    item_index: int | None = None
    event_scope: str | None = None
    meta: Mapping[str, JSON] = dataclasses.field(default_factory=dict)
    worker_id: str | None = None
    lease_token: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    first_attempt_at: datetime | None = None
    """Start of the first attempt since enqueue (or requeue): where the time budget starts."""
    finished_at: datetime | None = None
    classification: str | None = None
    last_error: str | None = None
    last_error_type: str | None = None
    result: JSON = None
    operator: str | None = None
    operator_notes: str | None = None

    @property
    def terminal(self) -> bool:
        """True when the job can never change again on its own or by an operator (but requeue)."""
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, JSON]:
        """A JSON-ready dict (datetimes as ISO 8601 strings)."""
        out: dict[str, JSON] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            out[field.name] = value
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One run of a job: who ran it, when, and how it ended."""

    job_id: int
    number: int
    worker_id: str
    started_at: datetime
    finished_at: datetime | None = None
    outcome: str | None = None
    """``succeeded``, ``failed``, ``cancelled``, ``lease_expired``; ``None`` while running."""
    classification: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    duration: float | None = None

    def to_dict(self) -> dict[str, JSON]:
        """A JSON-ready dict."""
        return {
            f.name: (v.isoformat() if isinstance(v, datetime) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEntry:
    """One operator action on a job."""

    job_id: int
    at: datetime
    actor: str
    action: str
    from_status: str
    to_status: str
    version: int
    notes: str | None = None

    def to_dict(self) -> dict[str, JSON]:
        """A JSON-ready dict."""
        return {
            f.name: (v.isoformat() if isinstance(v, datetime) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }


@_quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """The end of one attempt, as decided by the core (worker or rescuer), for a store to apply.

    A store applies it only if the job is still ``running`` under ``lease_token`` (fencing); with
    ``require_expired`` (the rescuer) also only if that lease has expired on the store's clock.
    """

    job_id: int
    lease_token: str
    attempt: int
    outcome: Outcome
    result: JSON = None
    classification: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    retry_in: float = 0.0
    """For ``Outcome.RETRY``: seconds from the store's now until the next attempt may run."""
    duration: float | None = None
    attempt_outcome: str | None = None
    """What to record on the attempt row; derived from ``outcome`` when ``None``."""
    attempt_classification: str | None = None
    """Why this attempt failed, when it differs from the job's verdict in ``classification``
    (a last ``timeout`` attempt of a job dead-lettered as ``exhausted``); the attempt row
    records this, falling back to ``classification``."""
    require_expired: bool = False

    @property
    def next_status(self) -> Status:
        """The job's status once this completion is applied."""
        return _STATUS_AFTER[self.outcome]

    @property
    def row_outcome(self) -> str:
        """What the attempt row records as its outcome."""
        return self.attempt_outcome or _ATTEMPT_OUTCOME[self.outcome]

    @property
    def row_classification(self) -> str | None:
        """What the attempt row records as its classification."""
        return self.attempt_classification or self.classification


_STATUS_AFTER: Mapping[Outcome, Status] = {
    Outcome.SUCCEEDED: Status.SUCCEEDED,
    Outcome.RETRY: Status.RETRYING,
    Outcome.DEAD_LETTER: Status.DEAD_LETTER,
    Outcome.CANCELLED: Status.CANCELLED,
}
_ATTEMPT_OUTCOME: Mapping[Outcome, str] = {
    Outcome.SUCCEEDED: "succeeded",
    Outcome.RETRY: "failed",
    Outcome.DEAD_LETTER: "failed",
    Outcome.CANCELLED: "cancelled",
}


@dataclasses.dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs to list or act on in bulk. Every field narrows; ``None`` means any."""

    statuses: frozenset[Status] | None = None
    queue: str | None = None
    handler: str | None = None
    batch_id: str | None = None
    classification: str | None = None
    key: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """An outcome event waiting in a store's outbox for delivery (at least once, in order per
    job). ``payload`` is built by :func:`durably.events.processed_payload` (or the batch twin)."""

    id: int
    type: str
    payload: Mapping[str, JSON]
    created_at: datetime
    job_id: int | None = None
    attempts: int = 0
    lease_token: str | None = None

    def to_dict(self) -> dict[str, JSON]:
        """A JSON-ready dict."""
        return {
            "id": self.id,
            "type": self.type,
            "payload": dict(self.payload),
            "created_at": self.created_at.isoformat(),
            "job_id": self.job_id,
            "attempts": self.attempts,
        }
