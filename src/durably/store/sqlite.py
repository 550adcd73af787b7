"""The embedded store: one SQLite file in WAL mode, safe for several worker processes on one host.

Every call runs on one dedicated thread that owns the connection, so the event loop never blocks
on the database. Writes that must see a consistent state (claims, completions, operator actions)
run in ``BEGIN IMMEDIATE`` transactions, which take SQLite's write lock up front: two processes
can never claim the same job, and no transaction has to be retried half way.

Workers of other processes learn of new work through a wake-up channel (see :class:`_Listener`),
with ``PRAGMA data_version`` polling as the fallback.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import itertools
import json
import json.encoder
import operator
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from durably.errors import (
    ConfigError,
    Conflict,
    InvalidTransition,
    JobNotFound,
    KeyTaken,
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
    decode_json,
    loads_json,
)
from durably.store.base import (
    ActionRequest,
    ClaimRequest,
    EnqueueResult,
    HeartbeatResult,
    Lease,
)
from durably.store.sqlfiles import load_migrations, load_queries

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_Q = load_queries("sqlite")

_WAKE_POLL = 0.05
"""Seconds between ``PRAGMA data_version`` checks while the wake-up channel is open. Only writers
that cannot reach the channel (another user, an older durably, the sqlite3 shell) wait this long;
without a channel ``wake_interval`` applies."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Encoder:
    """``_dumps`` without the encoder ``json.dumps`` builds on every call: a few microseconds a
    value, which is most of a bulk enqueue's Python time. One per store, used on its thread only
    (the circular-reference check keeps its state here)."""

    def __init__(self) -> None:
        self._markers: dict[int, Any] = {}
        plain = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
        self._plain = plain.encode
        make: Callable[..., Callable[[Any, int], list[str]]] | None = getattr(
            json.encoder, "c_make_encoder", None
        )
        self._c = (
            None
            if make is None
            else make(
                self._markers,
                plain.default,
                json.encoder.encode_basestring,
                None,
                ":",
                ",",
                False,
                False,
                True,
            )
        )

    def __call__(self, value: Any) -> str:
        if self._c is None:
            return self._plain(value)
        try:
            return "".join(self._c(value, 0))
        except BaseException:
            self._markers.clear()  # a failed encoding leaves its containers marked
            raise


_loads = loads_json
_decode = decode_json


class _Mappings:
    """The policies and metas of jobs written or read together, each distinct one encoded and
    decoded once: the jobs of one operation share one policy."""

    _FLAT = (str, int, float, bool, type(None))

    def __init__(self, encode: _Encoder | None = None) -> None:
        self._encode = encode
        self._texts: dict[int, str] = {}  # by id: the jobs keep their mappings alive meanwhile
        self._decoded: dict[str, tuple[dict[str, Any], bool]] = {}

    def encode(self, value: Mapping[str, Any]) -> str:
        if not value:
            return "{}"
        text = self._texts.get(id(value))
        if text is None:
            encode = self._encode or _dumps
            text = self._texts[id(value)] = encode(dict(value))
        return text

    def decode(self, text: str) -> Any:
        """A fresh object, as ``_loads(text)`` would return."""
        if text == "{}":
            return {}
        value, flat = self._decode(text)
        return dict(value) if flat else _loads(text)  # a copy shares only immutable values

    def copies(self, text: str, count: int) -> Iterable[Any]:
        """``count`` fresh objects, as ``_loads(text)`` would return each."""
        value, flat = self._decode(text)
        return map(dict, itertools.repeat(value, count)) if flat else map(_loads, [text] * count)

    def _decode(self, text: str) -> tuple[Any, bool]:
        found = self._decoded.get(text)
        if found is None:
            value = _loads(text)
            flat = type(value) is dict and all(type(v) in self._FLAT for v in value.values())
            found = self._decoded[text] = (value, flat)
        return found


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _time(times: dict[float, datetime], value: float) -> datetime:
    """``value`` as a datetime, remembered: rows read together share most of their timestamps."""
    found = times.get(value)
    if found is None:
        found = times[value] = datetime.fromtimestamp(value, UTC)
    return found


_STATUSES = {s.value: s for s in Status}
_RUN_AT_ID = operator.itemgetter(8, 0)
"""Sort key of a jobs row: (run_at, id)."""


_consume = deque[Any](maxlen=0).extend
"""Run an iterator to its end, keeping nothing."""


def _setters(cls: type[Any]) -> tuple[Callable[[Any, Any], None], ...] | None:
    """The slot setters of a slotted dataclass's fields in field order, or None if it has
    other attributes (then only its constructor can build it)."""
    found = []
    for field in dataclasses.fields(cls):
        descriptor = cls.__dict__.get(field.name)
        if type(descriptor) is not types.MemberDescriptorType:
            return None
        found.append(descriptor.__set__)
    if "__post_init__" in dir(cls):
        return None
    return tuple(found)


_SETTERS: dict[type[Any], tuple[Callable[[Any, Any], None], ...] | None] = {}


def _build(cls: type[T], count: int, columns: Sequence[Iterable[Any]]) -> list[T]:
    """``count`` instances of the slotted dataclass ``cls``, column by column.

    ``columns`` holds one iterable per field (in field order), at least one of them finite.
    Each column is set by one C-level loop over all instances: constructing thousands of
    30-field frozen dataclasses one by one (an ``object.__setattr__`` per field and instance) was
    the largest cost of a bulk enqueue. The instances are those the constructor would build
    (``cls`` has no ``__post_init__``; see :func:`_setters`). Only worth it for many instances:
    for a few, the constructor is cheaper than 30 column loops.
    """
    setters = _SETTERS.get(cls, ())
    if setters == ():
        setters = _SETTERS[cls] = _setters(cls)
    if setters is None:
        return list(itertools.starmap(cls, zip(*columns, strict=False)))  # some repeat
    built: list[T] = list(map(object.__new__, itertools.repeat(cls, count)))
    for setter, values in zip(setters, columns, strict=True):
        _consume(map(setter, built, values))
    return built


_JOB_DEFAULTS = tuple(
    itertools.repeat(f.default)
    for f in dataclasses.fields(Job)[[f.name for f in dataclasses.fields(Job)].index("meta") + 1 :]
)
"""The fields after ``meta`` of a job just enqueued: their defaults until the first claim."""


def _jobs(rows: Iterable[Sequence[Any]]) -> list[Job]:
    """Jobs from ``SELECT *`` rows of ``jobs``, read by position (the column order of
    001_initial.sql is the field order of ``Job``)."""
    times: dict[float, datetime] = {}
    mappings = _Mappings()
    out: list[Job] = []
    for (
        id_,
        queue,
        handler,
        payload,
        status,
        attempts,
        max_attempts,
        policy,
        run_at,
        version,
        created_at,
        updated_at,
        key,
        timeout,
        batch_id,
        item_index,
        event_scope,
        meta,
        worker_id,
        lease_token,
        lease_expires_at,
        cancel_requested,
        first_attempt_at,
        finished_at,
        classification,
        last_error,
        last_error_type,
        result,
        operator_,
        operator_notes,
    ) in rows:
        out.append(
            Job(
                id_,
                queue,
                handler,
                _decode(payload),
                _STATUSES.get(status) or Status(status),
                attempts,
                max_attempts,
                mappings.decode(policy),
                _time(times, run_at),
                version,
                _time(times, created_at),
                _time(times, updated_at),
                key,
                timeout,
                batch_id,
                item_index,
                event_scope,
                mappings.decode(meta),
                worker_id,
                lease_token,
                None if lease_expires_at is None else _time(times, lease_expires_at),
                bool(cancel_requested),
                None if first_attempt_at is None else _time(times, first_attempt_at),
                None if finished_at is None else _time(times, finished_at),
                classification,
                last_error,
                last_error_type,
                _decode(result),
                operator_,
                operator_notes,
            )
        )
    return out


_ROW_SLOTS = (
    "queue",
    "handler",
    "payload",
    "max_attempts",
    "policy",
    "run_at",
    "now",
    "timeout",
    "batch_id",
    "item_index",
    "event_scope",
    "meta",
)
"""The values of a keyless insert row (the slots of insert_jobs_row), in the order the
columns are gathered."""


@functools.cache
def _insert_rows(shared: tuple[bool, ...], count: int) -> str:
    """The keyless insert of ``count`` jobs. Slot ``i`` of every row is the one parameter all
    rows share where ``shared[i]`` (numbered first, in slot order), else one per row."""
    slots: dict[str, str] = {}
    varying: list[str] = []
    for slot, same in zip(_ROW_SLOTS, shared, strict=True):
        if same:
            slots[slot] = f"?{len(slots) + 1}"
        else:
            varying.append(slot)
    first = len(slots) + 1
    rows = []
    for row in range(count):
        for i, slot in enumerate(varying):
            slots[slot] = f"?{first + row * len(varying) + i}"
        rows.append(_Q["insert_jobs_row"].format(**slots))
    return _Q["insert_jobs_keyless"].format(rows=",".join(rows))


_INSERT_CHUNK = 256
"""Most jobs per keyless insert statement (fewer where SQLite allows fewer parameters)."""


def _job(row: Sequence[Any]) -> Job:
    return _jobs((row,))[0]


def _named(conn: sqlite3.Connection) -> sqlite3.Cursor:
    """A cursor whose rows are read by column name (the connection's rows are plain tuples)."""
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    return cursor


def _exact(job: NewJob) -> bool:
    """True when every column of ``job`` reads back as the value given (no type affinity
    conversion), so the stored job can be built without reading it back."""
    return (
        type(job.queue) is str
        and type(job.handler) is str
        and (job.key is None or type(job.key) is str)
        and (job.max_attempts is None or type(job.max_attempts) is int)
        and (job.timeout is None or type(job.timeout) in (float, int))
        and (job.batch_id is None or type(job.batch_id) is str)
        and (job.item_index is None or type(job.item_index) is int)
        and (job.event_scope is None or type(job.event_scope) is str)
    )


def _distinct_runs(completions: Sequence[Completion]) -> Iterator[Sequence[Completion]]:
    """Consecutive slices holding each job at most once: one slice is applied as a whole, and
    slices in order, which is what applying every completion in order would do."""
    start = 0
    seen: set[int] = set()
    for i, c in enumerate(completions):
        if c.job_id in seen:
            yield completions[start:i]
            start, seen = i, set()
        seen.add(c.job_id)
    yield completions[start:]


class _Wakeups:
    """Wakes waiting workers of this process when a job for their database becomes runnable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, weakref.WeakSet[_Waiter]] = {}

    def add(self, path: str, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.setdefault(path, weakref.WeakSet()).add(waiter)

    def discard(self, path: str, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.get(path, weakref.WeakSet()).discard(waiter)

    def notify(self, path: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Wake ``path``'s waiters; those of ``loop``, the caller's own, at once."""
        with self._lock:
            waiters = list(self._waiters.get(path, ()))
        for waiter in waiters:
            if waiter.loop is loop:
                waiter.event.set()
            else:
                waiter.wake()


class _Waiter:
    __slots__ = ("__weakref__", "event", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self.loop.call_soon_threadsafe(self.event.set)


_WAKEUPS = _Wakeups()

# -- the cross-process wake-up channel ------------------------------------------------------

_SOCKET_NAME = re.compile(r"^(\d+)\.[0-9a-f]{8}$")
_SUN_PATH_MAX = 100
"""Longest socket path we bind or send to, in bytes (the OS limit is 104 to 108)."""


def _channel_dir(db_path: str) -> str:
    return f"{db_path}-wake"


class _Listener:
    """One process's end of the wake-up channel of one database file.

    The channel is a directory next to the database (``<db>-wake``) holding one UNIX datagram
    socket per process that waits on it, named ``<pid>.<random>``. After each commit that makes
    work runnable, the committing process sends one byte to every socket but its own
    (:func:`_wake_processes`). The socket is read by the event loops of this process's waiting
    workers (:meth:`attach` while a wait lasts): a datagram wakes a waiting loop directly, where
    a receiving thread cost one more idle thread's wake-up, and a busy worker is not woken for
    every commit of another process. Every
    loop with a waiter watches the socket, and whichever drains it wakes every waiter, so none
    misses the datagram another loop read. Between waits datagrams queue (a sender that finds
    the queue full drops its byte: the queue wakes the next waiter anyway). The socket takes the
    database file's read/write permissions, so whoever may write the database may wake its
    workers. A process that dies leaves its socket behind: the next sender finds it refusing
    datagrams and removes it.
    """

    def __init__(self, key: str, db_path: str) -> None:
        self.key = key
        self.pid = os.getpid()
        self.users = 0
        self._loops: dict[asyncio.AbstractEventLoop, int] = {}  # watching loop -> its waits
        self._lock = threading.Lock()
        directory = _channel_dir(db_path)
        self.path = os.path.join(directory, f"{self.pid}.{secrets.token_hex(4)}")
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise OSError(f"socket path too long: {self.path!r}")
        mode = os.stat(db_path).st_mode & 0o666
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for _ in range(3):  # another process may remove the empty folder in between
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory)
                    # Enter and create where the database may be read and written.
                    os.chmod(directory, mode | (mode & 0o444) >> 2)
                try:
                    sock.bind(self.path)
                    break
                except FileNotFoundError:
                    continue
            else:
                raise OSError(f"cannot create {directory!r}")
            os.chmod(self.path, mode)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._fd = sock.fileno()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the socket from ``loop`` (the running one) for one more wait."""
        with self._lock:
            waits = self._loops.get(loop, 0)
            self._loops[loop] = waits + 1
        if not waits:
            try:
                loop.add_reader(self._fd, self._readable, loop)
            except BaseException:
                with self._lock:
                    self._loops.pop(loop, None)
                raise

    def detach(self, loop: asyncio.AbstractEventLoop) -> None:
        """One wait of ``loop`` (the running one) is over; the last stops its watching."""
        with self._lock:
            waits = self._loops.pop(loop, 1) - 1
            if waits:
                self._loops[loop] = waits
        if not waits:
            loop.remove_reader(self._fd)  # also once closed: the selector ignores a closed fd

    def _readable(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:  # a burst needs one wake-up only
                self._sock.recv(16)
        except OSError:  # drained (BlockingIOError), or closed
            pass
        _WAKEUPS.notify(self.key, loop)

    def close(self) -> None:
        """Stop receiving and remove the socket."""
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):  # only if no other process listens
            os.rmdir(os.path.dirname(self.path))


_LISTENERS: dict[str, _Listener] = {}
_LISTENERS_LOCK = threading.Lock()


def _listen(key: str, db_path: str) -> _Listener | None:
    """This process's listener for ``db_path`` (one more user), or None where none can open."""
    if not hasattr(socket, "AF_UNIX"):
        return None
    with _LISTENERS_LOCK:
        listener = _LISTENERS.get(key)
        if listener is None or listener.pid != os.getpid():  # a forked child needs its own
            try:
                listener = _Listener(key, db_path)
            except OSError:
                return None
            _close_listeners_at_exit()
            _LISTENERS[key] = listener
        listener.users += 1
        return listener


def _unlisten(listener: _Listener) -> None:
    with _LISTENERS_LOCK:
        listener.users -= 1
        if listener.users > 0:
            return
        if _LISTENERS.get(listener.key) is listener:
            del _LISTENERS[listener.key]
    listener.close()


@functools.cache
def _close_listeners_at_exit() -> None:
    atexit.register(_close_listeners)


def _close_listeners() -> None:
    with _LISTENERS_LOCK:
        listeners = [x for x in _LISTENERS.values() if x.pid == os.getpid()]
        _LISTENERS.clear()
    for listener in listeners:
        listener.close()


class _Targets:
    """The sockets of a channel folder, listed again only when the folder has changed."""

    __slots__ = ("listed_at", "mtime", "paths", "pid")

    def __init__(self, directory: str, mtime: int) -> None:
        self.pid = os.getpid()
        self.mtime = mtime
        self.listed_at = time.time_ns()
        own = str(self.pid)
        self.paths = []
        for name in os.listdir(directory):
            match = _SOCKET_NAME.match(name)
            if match is not None and match[1] != own:  # this process is woken directly
                self.paths.append(os.path.join(directory, name))

    def current(self, mtime: int) -> bool:
        # A folder's mtime comes from a coarse clock: a change made in the same tick as the
        # listing would leave it unchanged, so a listing that close to the last change is
        # never trusted.
        return (
            mtime == self.mtime
            and self.listed_at - mtime > _LISTING_MARGIN_NS
            and self.pid == os.getpid()
        )


_LISTING_MARGIN_NS = 100_000_000
_TARGETS: dict[str, _Targets] = {}
_SENDER: list[socket.socket] = []  # this process's unbound datagram socket, made at first use
_SENDER_LOCK = threading.Lock()


def _sender() -> socket.socket:
    with _SENDER_LOCK:
        if not _SENDER or _SENDER[0].fileno() < 0:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            _SENDER[:] = [sock]
        return _SENDER[0]


def _wake_processes(directory: str) -> None:
    """Send one byte to the socket of every other process waiting on the database.

    The folder is listed again only when its mtime shows a socket came or went: one ``stat``
    per wake-up instead of a listing and a fresh socket.
    """
    try:
        mtime = os.stat(directory).st_mtime_ns
        targets = _TARGETS.get(directory)
        if targets is None or not targets.current(mtime):
            targets = _TARGETS[directory] = _Targets(directory, mtime)
        if not targets.paths:
            return
        sock = _sender()
    except OSError:
        return  # no folder (no process has ever waited), or no datagram sockets: waiters poll
    for path in targets.paths:
        try:
            sock.sendto(b"\0", path)
        except ConnectionRefusedError:  # nobody receives: its process has gone
            with contextlib.suppress(OSError):
                os.unlink(path)
        except OSError:
            pass  # a full queue (it wakes anyway), a vanished socket, or no permission


# -- the store's thread ---------------------------------------------------------------------


class _Thread:
    """The one thread that owns a store's connection, running calls in submission order.

    Leaner than ``run_in_executor`` on a one-worker ``ThreadPoolExecutor``: a call is one queue
    put, and its result one ``call_soon_threadsafe``, with no concurrent future to chain to an
    asyncio one. A single job's enqueue or claim spends as long in that hand-off as in SQLite.
    A call whose caller was cancelled still runs (as an executor call that had started would):
    the caller cannot know how far it got either way.
    """

    def __init__(self) -> None:
        self._calls: SimpleQueue[
            tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]] | None
        ] = SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="durably-sqlite", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        calls = self._calls
        while True:
            call = calls.get()
            if call is None:
                return
            fn, loop, future = call
            try:
                _hand(loop, future, _succeed, fn())
            except BaseException as exc:  # handed to the caller, as an executor would
                _hand(loop, future, _fail, exc)
            del call, fn, loop, future  # nothing kept alive while idle

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the thread; the future (of the running loop) gets its outcome."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((fn, loop, future))
        return future

    def stop(self) -> None:
        """End the thread once the calls queued so far have run."""
        self._calls.put(None)


def _hand(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    setter: Callable[[asyncio.Future[Any], Any], None],
    value: Any,
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
        loop.call_soon_threadsafe(setter, future, value)


def _succeed(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # the caller may have been cancelled
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# -- events ---------------------------------------------------------------------------------


def _emit(
    conn: sqlite3.Connection, before: Status, after: Job, now: float, *, last: bool = True
) -> None:
    """Write the outbox events a change owes, inside the caller's transaction.

    ``last`` is False when a later change in the same call moves another live job of the same
    batch: the batch cannot have completed at this change, so it is not checked.
    """
    if after.status not in EVENT_STATUSES or after.event_scope is None:
        return  # events are opt-in per job: no scope, no outbox rows
    conn.execute(
        _Q["insert_event"],
        (after.id, event_type(after.event_scope), _dumps(processed_payload(after)), now, now),
    )
    if (
        last
        and after.batch_id is not None
        and before in LIVE
        and conn.execute(_Q["batch_live_count"], (after.batch_id,)).fetchone()[0] == 0
    ):
        counts = dict(conn.execute(_Q["batch_counts"], (after.batch_id,)).fetchall())
        conn.execute(
            _Q["insert_event"],
            (
                None,
                event_type(after.event_scope, "batch_completed"),
                _dumps(batch_payload(after.batch_id, counts, after.updated_at)),
                now,
                now,
            ),
        )


def _event(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        type=row["type"],
        payload=json.loads(row["payload"]),
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        job_id=row["job_id"],
        attempts=row["attempts"],
        lease_token=row["lease_token"],
    )


class _KeylessInsert:
    """An enqueue of jobs that hold no key, many rows per statement.

    Without keys nothing can conflict, so every row is inserted. ``jobs.id`` is AUTOINCREMENT and
    the transaction holds the write lock, so the new ids are the contiguous range ending at the
    last rowid inserted, in input order. The jobs returned are built from what was written (the
    JSON decoded back from the very text stored), unless a value is of a type SQLite would
    convert: then they are read back.

    The caller's thread plans the statements, and builds the jobs while the store's thread runs
    them (SQLite releases the GIL while it works); only the ids are set afterwards.
    """

    def __init__(self, jobs: Sequence[NewJob], now: float, max_params: int) -> None:
        count = self.count = len(jobs)
        self.now = now
        # Not the store's encoder: that one belongs to the store's thread.
        encode = _Encoder()
        mappings = self._mappings = _Mappings(encode)
        exact = True

        def gather(name: str, types: tuple[type, ...]) -> list[Any]:
            """The values of one field, or the one value all jobs share. Values of a type SQLite
            would convert are not shared (1 and 1.0 are equal), and make ``exact`` False."""
            nonlocal exact
            column = list(map(operator.attrgetter(name), jobs))
            if not set(map(type, column)).issubset(types):
                exact = False
                return column
            return column[:1] if column.count(column[0]) == count else column

        def encoded(name: str) -> list[str]:
            found = list(map(operator.attrgetter(name), jobs))
            if not any(found):
                return ["{}"]
            if len(set(map(id, found))) == 1:  # the jobs of one operation share one policy
                return [mappings.encode(found[0])]
            texts = list(map(mappings.encode, found))
            return texts[:1] if texts.count(texts[0]) == count else texts

        timeouts = list(map(operator.attrgetter("timeout"), jobs))
        if int in set(map(type, timeouts)):  # REAL affinity: stored, and read back, as a float
            timeouts = [float(t) if type(t) is int else t for t in timeouts]
        if set(map(type, timeouts)).issubset((float, type(None))):
            timeout = timeouts[:1] if timeouts.count(timeouts[0]) == count else timeouts
        else:
            exact = False
            timeout = timeouts
        delays = list(map(operator.attrgetter("delay"), jobs))
        run_at = [now] if max(delays) <= 0 else [now + max(0.0, delay) for delay in delays]
        payloads = [job.payload_json or encode(job.payload) for job in jobs]  # the app's text
        # One list per slot of insert_jobs_row (see _ROW_SLOTS); one value: all jobs share it.
        self.columns: list[list[Any]] = [
            gather("queue", (str,)),
            gather("handler", (str,)),
            payloads[:1] if payloads.count(payloads[0]) == count else payloads,
            gather("max_attempts", (int, type(None))),
            encoded("policy"),
            run_at[:1] if run_at.count(run_at[0]) == count else run_at,
            [now],
            timeout,
            gather("batch_id", (str, type(None))),
            gather("item_index", (int, type(None))),
            gather("event_scope", (str, type(None))),
            encoded("meta"),
        ]
        self.exact = exact
        self.shared = shared = tuple(len(column) == 1 for column in self.columns)
        self.values = [c[0] for c, same in zip(self.columns, shared, strict=True) if same]
        varying = [c for c, same in zip(self.columns, shared, strict=True) if not same]
        self.width = width = len(varying)
        self.params = (
            varying[0]
            if width == 1
            else list(itertools.chain.from_iterable(zip(*varying, strict=True)))
        )
        most = (max_params - len(self.values)) // max(1, width)
        self.size = 1 << (min(_INSERT_CHUNK, most).bit_length() - 1)

    def write(self, conn: sqlite3.Connection) -> list[Job] | range:
        """Insert the rows (in the caller's transaction): their ids, or the jobs read back."""
        count, width, size = self.count, self.width, self.size
        inserted = 0
        start = 0
        cursor = conn.cursor()
        while start < count:
            while size > count - start:
                size //= 2  # the tail in power-of-two chunks: few distinct statements to cache
            cursor.execute(
                _insert_rows(self.shared, size),
                self.values + self.params[start * width : (start + size) * width],
            )
            inserted += cursor.rowcount
            start += size
        last = cursor.lastrowid
        if inserted != count or last is None:  # pragma: no cover - nothing can conflict
            raise StoreError(f"enqueue inserted {inserted} jobs, expected {count}")
        if not self.exact:
            return _jobs(conn.execute(_Q["jobs_in_id_range"], (last - count, last)).fetchall())
        return range(last - count + 1, last + 1)

    def build(self) -> list[Job]:
        """The jobs as written, with id 0 until :meth:`write` tells their ids."""
        columns, shared, count, now = self.columns, self.shared, self.count, self.now
        mappings = self._mappings
        created = datetime.fromtimestamp(now, UTC)
        times = {now: created}
        repeat = itertools.repeat

        def column(slot: int) -> Iterable[Any]:
            return repeat(columns[slot][0]) if shared[slot] else columns[slot]

        def decoded(slot: int) -> Iterable[Any]:
            if shared[slot]:
                return mappings.copies(columns[slot][0], count)
            return map(mappings.decode, columns[slot])

        return _build(
            Job,
            count,
            (
                repeat(0),
                column(0),
                column(1),
                decoded(2) if shared[2] else map(_loads, columns[2]),
                repeat(Status.PENDING),
                repeat(0),
                column(3),
                decoded(4),
                (
                    repeat(_time(times, columns[5][0]))
                    if shared[5]
                    else map(functools.partial(_time, times), columns[5])
                ),
                repeat(1),
                repeat(created),
                repeat(created),
                repeat(None),
                column(7),
                column(8),
                column(9),
                column(10),
                decoded(11),
                *_JOB_DEFAULTS,
            ),
        )


def _set_ids(jobs: list[Job], ids: range) -> list[Job]:
    """Give jobs built before their insert finished their ids (nobody else has seen them)."""
    _consume(map(object.__setattr__, jobs, itertools.repeat("id"), ids))
    return jobs


class SQLiteStore:
    """Jobs in one SQLite file (``sqlite:///path/to.db``; ``sqlite:///:memory:`` for tests).

    ``clock`` replaces the system clock for every timestamp and comparison (tests).
    ``synchronous`` is SQLite's ``PRAGMA synchronous``: ``FULL`` (default) survives power loss,
    ``NORMAL`` survives process crashes and is faster. ``wake_interval`` is how often a waiting
    worker polls for other processes' commits when the wake-up channel cannot be used.
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = 10.0,
        synchronous: str = "FULL",
        wake_interval: float = 0.005,
        migrate_on_open: bool = True,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigError(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}"
            )
        self.path = path
        self.url = f"sqlite:///{path}"
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._wake_interval = wake_interval
        self._migrate_on_open = migrate_on_open
        self._conn: sqlite3.Connection | None = None
        self._thread: _Thread | None = None
        self._wake_key = path if path == ":memory:" else str(Path(path).resolve())
        self._channel = None if path == ":memory:" else _channel_dir(self._wake_key)
        self._listener: _Listener | None = None
        self._can_listen = self._channel is not None
        self._encode = _Encoder()
        self._max_params = 999  # SQLite's limit of parameters per statement, read on connecting
        # PRAGMA data_version when this store last read the jobs (claim, next_due_in): a commit
        # by another process after that read wakes the next wait at once.
        self._seen_version: int | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``sqlite:///:memory:``.

        Query parameters (``?synchronous=NORMAL&busy_timeout=5``) set constructor options.
        """
        parts = urlsplit(url)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc not in ("", "localhost") or not path:
            raise ConfigError(
                f"bad SQLite URL {url!r}: use sqlite:///relative/path.db, "
                "sqlite:////absolute/path.db or sqlite:///:memory:"
            )
        for name, values in parse_qs(parts.query).items():
            if name == "synchronous":
                options.setdefault("synchronous", values[-1])
            elif name == "busy_timeout":
                options.setdefault("busy_timeout", float(values[-1]))
            else:
                raise ConfigError(f"unknown SQLite URL option {name!r}")
        return cls(path, **options)

    # -- plumbing ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock().timestamp() if self._clock is not None else time.time()

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            parent = Path(self.path).parent
            if not parent.exists():
                raise ConfigError(f"cannot open {self.path!r}: folder {str(parent)!r} is missing")
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # only the store's own thread touches it
        )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        self._max_params = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._outcome(self._submit(fn))

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Start ``fn`` on the store's thread; :meth:`_outcome` awaits it."""
        conn, thread = self._conn, self._thread
        if conn is None or thread is None:
            raise StoreError("the SQLite store is not open: call await store.open() first")
        return thread.call(functools.partial(fn, conn))

    async def _outcome(self, future: asyncio.Future[T]) -> T:
        try:
            return await future
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreUnavailable(f"SQLite database {self.path!r} is busy: {exc}") from exc
            raise StoreError(f"SQLite error on {self.path!r}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite error on {self.path!r}: {exc}") from exc

    @contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _announce(self) -> None:
        """Wake every waiter on this database: runnable work may have been committed."""
        _WAKEUPS.notify(self._wake_key)
        if self._channel is not None:
            _wake_processes(self._channel)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (created if missing), then migrate it or refuse a newer schema."""
        if self._conn is not None:
            return
        thread = _Thread()
        try:
            self._conn = await thread.call(self._connect)
        except sqlite3.Error as exc:
            thread.stop()
            raise StoreUnavailable(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        except BaseException:
            thread.stop()
            raise
        self._thread = thread
        if self._migrate_on_open:
            await self.migrate()
        elif await self.schema_version() > len(load_migrations("sqlite")):
            await self.migrate(dry_run=True)  # raises SchemaTooNew

    async def close(self) -> None:
        """Close the connection, the wake-up socket and the thread. Idempotent."""
        conn, thread, listener = self._conn, self._thread, self._listener
        self._conn = self._thread = self._listener = None
        if thread is not None:
            try:
                if listener is not None:
                    _unlisten(listener)
                if conn is not None:
                    await thread.call(conn.close)
            finally:
                thread.stop()

    async def migrate(self, *, dry_run: bool = False) -> list[str]:
        """Apply pending migrations in one ``BEGIN IMMEDIATE`` transaction each."""
        migrations = load_migrations("sqlite")

        def work(conn: sqlite3.Connection) -> list[str]:
            conn.execute(_Q["create_migrations_table"])
            applied: list[str] = []
            current = conn.execute(_Q["schema_version"]).fetchone()[0]
            if current > len(migrations):
                raise SchemaTooNew(
                    f"the database {self.path!r} is at schema version {current}, but this "
                    f"durably knows only up to {len(migrations)}: upgrade durably"
                )
            for migration in migrations[current:]:
                applied.append(f"{migration.version:03d}_{migration.name}")
                if dry_run:
                    continue
                with self._write(conn):
                    # Re-check under the write lock: another process may have migrated.
                    if conn.execute(_Q["schema_version"]).fetchone()[0] >= migration.version:
                        continue
                    for statement in _split_statements(migration.sql):
                        conn.execute(statement)
                    conn.execute(
                        _Q["record_migration"],
                        (migration.version, migration.name, self._now()),
                    )
            return applied

        return await self._run(work)

    async def schema_version(self) -> int:
        """The highest migration applied."""

        def work(conn: sqlite3.Connection) -> int:
            conn.execute(_Q["create_migrations_table"])
            return int(conn.execute(_Q["schema_version"]).fetchone()[0])

        return await self._run(work)

    async def now(self) -> datetime:
        """The store's clock: the host's (SQLite is embedded), or the injected one."""
        return datetime.fromtimestamp(self._now(), UTC)

    # -- producers --------------------------------------------------------------------------

    def _insert_params(self, job: NewJob, now: float) -> dict[str, Any]:
        encode = self._encode
        return {
            "queue": job.queue,
            "handler": job.handler,
            "payload": job.payload_json or encode(job.payload),
            "max_attempts": job.max_attempts,
            "policy": encode(dict(job.policy)) if job.policy else "{}",
            "run_at": now + max(0.0, job.delay),
            "now": now,
            "key": job.key,
            # REAL affinity: an int timeout is stored, and read back, as a float
            "timeout": float(job.timeout) if type(job.timeout) is int else job.timeout,
            "batch_id": job.batch_id,
            "item_index": job.item_index,
            "event_scope": job.event_scope,
            "meta": encode(dict(job.meta)) if job.meta else "{}",
        }

    def _insert(self, conn: sqlite3.Connection, job: NewJob, now: float) -> EnqueueResult:
        """Insert one job (with a key or without), or find the live job holding its key."""
        params = self._insert_params(job, now)
        cursor = conn.execute(_Q["insert_job"], params)
        if cursor.rowcount == 1 and cursor.lastrowid is not None:
            if not _exact(job):
                return EnqueueResult(
                    _job(conn.execute(_Q["get_job"], (cursor.lastrowid,)).fetchone()), created=True
                )
            created = datetime.fromtimestamp(now, UTC)
            mappings = _Mappings()
            return EnqueueResult(
                Job(
                    cursor.lastrowid,
                    job.queue,
                    job.handler,
                    _loads(params["payload"]),
                    Status.PENDING,
                    0,
                    job.max_attempts,
                    mappings.decode(params["policy"]),
                    created if params["run_at"] == now else _time({}, params["run_at"]),
                    1,
                    created,
                    created,
                    job.key,
                    params["timeout"],
                    job.batch_id,
                    job.item_index,
                    job.event_scope,
                    mappings.decode(params["meta"]),
                ),
                created=True,
            )
        existing = conn.execute(_Q["live_job_by_key"], (job.key,)).fetchone()
        if existing is None:  # pragma: no cover - only a key conflict makes the insert a no-op
            raise StoreError(f"enqueue of {job.handler!r} inserted nothing")
        return EnqueueResult(_job(existing), created=False)

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[EnqueueResult]:
        """Insert all jobs in one transaction."""
        if not jobs:
            return []
        if len(jobs) > 1 and list(map(operator.attrgetter("key"), jobs)).count(None) == len(jobs):
            return await self._enqueue_keyless(jobs)

        def work(conn: sqlite3.Connection) -> list[EnqueueResult]:
            now = self._now()
            with self._write(conn):
                results = [self._insert(conn, job, now) for job in jobs]
            self._announce()
            return results

        return await self._run(work)

    async def _enqueue_keyless(self, jobs: Sequence[NewJob]) -> list[EnqueueResult]:
        insert = _KeylessInsert(jobs, self._now(), self._max_params)

        def work(conn: sqlite3.Connection) -> list[Job] | range:
            with self._write(conn):
                written = insert.write(conn)
            self._announce()
            return written

        written = self._submit(work)
        try:
            built = insert.build() if insert.exact else []
        finally:
            outcome = await self._outcome(written)
        found = _set_ids(built, outcome) if isinstance(outcome, range) else outcome
        return _build(EnqueueResult, len(found), (found, itertools.repeat(True)))

    async def upsert(self, job: NewJob) -> EnqueueResult:
        """Enqueue by key, or replace the live job's content while it is not running."""
        if job.key is None:
            raise ConfigError("upsert needs a key")

        def work(conn: sqlite3.Connection) -> EnqueueResult:
            now = self._now()
            with self._write(conn):
                live = conn.execute(_Q["live_job_by_key"], (job.key,)).fetchone()
                if live is None:
                    result = self._insert(conn, job, now)
                else:
                    row = conn.execute(
                        _Q["upsert_live"],
                        {
                            "id": live[0],
                            "payload": _dumps(job.payload),
                            "meta": _dumps(dict(job.meta)),
                            "policy": _dumps(dict(job.policy)),
                            "max_attempts": job.max_attempts,
                            "timeout": job.timeout,
                            "event_scope": job.event_scope,
                            "queue": job.queue,
                            "handler": job.handler,
                            "now": now,
                        },
                    ).fetchone()
                    result = EnqueueResult(_job(row if row is not None else live), created=False)
            self._announce()
            return result

        return await self._run(work)

    # -- workers ----------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> list[Job]:
        """Claim due jobs under fresh leases, with their attempt rows, in one transaction.

        Due retries first, then pending jobs for the room left, each one statement walking an
        index in (run_at, id) order (see jobs.sql); a first cheap query skips the retries'
        statement when none is due, and reads ``PRAGMA data_version`` for :meth:`wait`.
        """
        if request.limit <= 0 or not request.queues:
            return []
        params: dict[str, Any] = {
            "worker_id": request.worker_id,
            "lease_seconds": request.lease_seconds,
            "limit": request.limit,
        }
        check: str | None = None
        if request.batch_id is not None:
            retrying = pending = _Q["claim_batch"]
            params.update(
                queues=_dumps(list(request.queues)),
                batch_id=request.batch_id,
                due_only=int(request.due_only),
                status=Status.RETRYING.value,
            )
        elif len(request.queues) == 1:
            check = _Q["claim_check_one"]
            retrying, pending = _Q["claim_retrying_one"], _Q["claim_pending_one"]
            params["queue"] = request.queues[0]
        else:
            check = _Q["claim_check_any"]
            retrying, pending = _Q["claim_retrying_any"], _Q["claim_pending_any"]
            params["queues"] = _dumps(list(request.queues))
        worker_id = request.worker_id

        def work(conn: sqlite3.Connection) -> list[Job]:
            now = params["now"] = self._now()
            version: int | None = None
            with self._write(conn):
                retrying_due = True
                if check is not None:
                    version, retrying_due = conn.execute(check, params).fetchone()
                rows = conn.execute(retrying, params).fetchall() if retrying_due else []
                rows.sort(key=_RUN_AT_ID)  # RETURNING follows no order
                room = request.limit - len(rows)
                if room > 0:
                    params["limit"] = room
                    params["status"] = Status.PENDING.value
                    fresh = conn.execute(pending, params).fetchall()
                    fresh.sort(key=_RUN_AT_ID)
                    rows += fresh
                if rows:
                    ids = self._encode([row[0] for row in rows])
                    conn.execute(_Q["insert_attempt"], (ids, worker_id, now))
            self._seen_version = _data_version(conn) if version is None else version
            return _jobs(rows)

        return await self._run(work)

    async def heartbeat(self, leases: Sequence[Lease], lease_seconds: float) -> HeartbeatResult:
        """Extend every lease still held."""
        if not leases:
            return HeartbeatResult(frozenset(), frozenset())
        ids = _dumps([lease.job_id for lease in leases])

        def work(conn: sqlite3.Connection) -> HeartbeatResult:
            now = self._now()
            with self._write(conn):
                held = {row[0]: row for row in conn.execute(_Q["running_leases"], (ids,))}
                renew = [
                    (now, lease_seconds, lease.job_id, lease.lease_token)
                    for lease in leases
                    if lease.job_id in held and held[lease.job_id][1] == lease.lease_token
                ]
                if renew:
                    conn.executemany(_Q["heartbeat"], renew)
            renewed = frozenset(r[2] for r in renew)
            return HeartbeatResult(renewed, frozenset(i for i in renewed if held[i][3]))

        return await self._run(work)

    def _complete_distinct(
        self, conn: sqlite3.Connection, completions: Sequence[Completion], now: float
    ) -> list[bool]:
        """Apply completions of distinct jobs, as applying them one by one would.

        One read finds which still hold their lease (the fence, checked here and again by the
        update), then one ``executemany`` per table writes the applied ones. A job's row is
        changed by its own completion only, so each is applied exactly as alone; only a batch's
        completion event needs the order (see ``_emit``).
        """
        ids = _dumps([c.job_id for c in completions])
        held = {row[0]: row for row in conn.execute(_Q["running_leases"], (ids,))}
        encode = self._encode
        applied: list[bool] = []
        jobs: list[tuple[Any, ...]] = []
        attempts: list[tuple[Any, ...]] = []
        owed: list[int] = []  # applied completions that end a job with an event scope
        last_of_batch: dict[str, int] = {}
        for c in completions:
            lease = held.get(c.job_id)
            if (
                lease is None
                or lease[1] != c.lease_token
                or (c.require_expired and not (lease[2] is not None and lease[2] < now))
            ):
                applied.append(False)
                continue
            applied.append(True)
            status = c.next_status
            failed = c.outcome is not Outcome.SUCCEEDED
            jobs.append(
                (
                    now,
                    status.value,
                    None if c.result is None else encode(c.result),
                    c.classification if failed else None,
                    c.error_message if failed else None,
                    c.error_type if failed else None,
                    max(0.0, c.retry_in),
                    c.job_id,
                    c.lease_token,
                    int(c.require_expired),
                )
            )
            attempts.append(
                (
                    now,
                    c.row_outcome,
                    c.row_classification,
                    c.error_type,
                    c.error_message,
                    c.duration,
                    c.job_id,
                )
            )
            if lease[4] is not None and status in EVENT_STATUSES:
                owed.append(c.job_id)
            if lease[5] is not None:
                last_of_batch[lease[5]] = c.job_id
        if not jobs:
            return applied
        changed = conn.executemany(_Q["complete"], jobs).rowcount
        if changed != len(jobs):  # pragma: no cover - the write lock holds the leases read
            raise StoreError(f"complete changed {changed} jobs, expected {len(jobs)}")
        conn.executemany(_Q["finish_attempt"], attempts)
        for job_id in owed:
            after = _job(conn.execute(_Q["get_job"], (job_id,)).fetchone())
            last = after.batch_id is not None and last_of_batch[after.batch_id] == job_id
            _emit(conn, Status.RUNNING, after, now, last=last)
        return applied

    async def complete(self, completions: Sequence[Completion]) -> list[bool]:
        """Apply attempt endings, fenced by lease token, in one transaction."""
        if not completions:
            return []

        def work(conn: sqlite3.Connection) -> list[bool]:
            now = self._now()
            applied: list[bool] = []
            with self._write(conn):
                for distinct in _distinct_runs(completions):
                    applied += self._complete_distinct(conn, distinct, now)
            if any(
                ok and c.outcome is Outcome.RETRY
                for ok, c in zip(applied, completions, strict=True)
            ):
                self._announce()
            return applied

        return await self._run(work)

    async def release(self, leases: Sequence[Lease]) -> int:
        """Hand back claimed jobs that never started, as if never claimed."""
        if not leases:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            now = self._now()
            released = 0
            with self._write(conn):
                for lease in leases:
                    row = conn.execute(
                        _Q["release"], {"now": now, "id": lease.job_id, "token": lease.lease_token}
                    ).fetchone()
                    if row is not None:
                        conn.execute(_Q["delete_attempt"], (lease.job_id,))
                        released += 1
            if released:
                self._announce()
            return released

        return await self._run(work)

    async def expired(self, limit: int) -> list[Job]:
        """Running jobs whose lease has expired, oldest expiry first."""

        def work(conn: sqlite3.Connection) -> list[Job]:
            return _jobs(conn.execute(_Q["expired"], (self._now(), limit)).fetchall())

        return await self._run(work)

    async def next_due_in(self, queues: Sequence[str]) -> float | None:
        """Seconds until the earliest waiting job is due; None if none waits."""
        if len(queues) == 1:
            sql, arg = _Q["next_due_one"], queues[0]
        else:
            sql, arg = _Q["next_due_any"], _dumps(list(queues))

        def work(conn: sqlite3.Connection) -> float | None:
            run_at = conn.execute(sql, (arg,)).fetchone()[0]
            self._seen_version = _data_version(conn)
            return None if run_at is None else max(0.0, run_at - self._now())

        return await self._run(work)

    async def wait(self, queues: Sequence[str], timeout: float) -> bool:
        """Wait for work committed by this process or another, up to ``timeout``.

        This process's writes wake waiters directly; other processes' through the wake-up
        channel (:class:`_Listener`, opened at the first wait). ``PRAGMA data_version`` is the
        fallback: it is compared with its value at this store's last claim (or ``next_due_in``),
        so a commit made just before the wait began is not missed, then polled every
        ``wake_interval`` (or every ``_WAKE_POLL`` while the channel is open).
        """
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop)
        _WAKEUPS.add(self._wake_key, waiter)
        listener = None
        try:
            if self._listener is None and self._can_listen and self._conn is not None:
                self._listener = _listen(self._wake_key, self._wake_key)
                self._can_listen = self._listener is not None  # else poll, without retrying
            interval = self._wake_interval
            if self._listener is not None:
                try:
                    self._listener.attach(loop)
                    listener = self._listener
                    interval = max(interval, _WAKE_POLL)
                except NotImplementedError:  # a loop that cannot watch sockets: poll
                    pass
            version = await self._run(_data_version)
            if self.path != ":memory:" and self._seen_version not in (None, version):
                self._seen_version = version
                return True
            deadline = loop.time() + max(0.0, timeout)
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(waiter.event.wait(), timeout=min(remaining, interval))
                    return True
                except TimeoutError:
                    pass
                if self.path != ":memory:" and await self._run(_data_version) != version:
                    return True
        finally:
            _WAKEUPS.discard(self._wake_key, waiter)
            if listener is not None:
                listener.detach(loop)

    # -- operators --------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job:
        """The job, or ``JobNotFound``."""

        def work(conn: sqlite3.Connection) -> Job:
            row = conn.execute(_Q["get_job"], (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            return _job(row)

        return await self._run(work)

    async def get_by_key(self, key: str) -> Job | None:
        """The live job holding ``key``, else the newest that had it."""

        def work(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(_Q["live_job_by_key"], (key,)).fetchone()
            if row is None:
                row = conn.execute(_Q["latest_job_by_key"], (key,)).fetchone()
            return None if row is None else _job(row)

        return await self._run(work)

    async def list_jobs(
        self, where: JobFilter, *, limit: int = 100, after_id: int | None = None
    ) -> list[Job]:
        """Jobs matching ``where``, newest first."""
        clauses: list[str] = []
        params: list[Any] = []
        if where.statuses is not None:
            clauses.append("status IN (SELECT value FROM json_each(?))")
            params.append(_dumps(sorted(s.value for s in where.statuses)))
        for column, value in (
            ("queue", where.queue),
            ("handler", where.handler),
            ("batch_id", where.batch_id),
            ("classification", where.classification),
            ("key", where.key),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")  # column names are the fixed tuple above
                params.append(value)
        if after_id is not None:
            clauses.append("id < ?")
            params.append(after_id)
        sql = _Q["list_jobs"].format(where=" AND ".join(clauses) or "1")
        params.append(limit)

        def work(conn: sqlite3.Connection) -> list[Job]:
            return _jobs(conn.execute(sql, params).fetchall())

        return await self._run(work)

    async def attempts(self, job_id: int) -> list[Attempt]:
        """The job's attempts, oldest first."""

        def work(conn: sqlite3.Connection) -> list[Attempt]:
            return [
                Attempt(
                    job_id=r["job_id"],
                    number=r["number"],
                    worker_id=r["worker_id"],
                    started_at=datetime.fromtimestamp(r["started_at"], UTC),
                    finished_at=_ts(r["finished_at"]),
                    outcome=r["outcome"],
                    classification=r["classification"],
                    error_type=r["error_type"],
                    error_message=r["error_message"],
                    duration=r["duration"],
                )
                for r in _named(conn).execute(_Q["list_attempts"], (job_id,)).fetchall()
            ]

        return await self._run(work)

    async def audit(self, job_id: int) -> list[AuditEntry]:
        """The job's audit trail, oldest first."""

        def work(conn: sqlite3.Connection) -> list[AuditEntry]:
            return [
                AuditEntry(
                    job_id=r["job_id"],
                    at=datetime.fromtimestamp(r["at"], UTC),
                    actor=r["actor"],
                    action=r["action"],
                    from_status=r["from_status"],
                    to_status=r["to_status"],
                    version=r["version"],
                    notes=r["notes"],
                )
                for r in _named(conn).execute(_Q["list_audit"], (job_id,)).fetchall()
            ]

        return await self._run(work)

    async def act(self, request: ActionRequest) -> Job:
        """Apply one operator action, audited, in one transaction."""
        rule = ACTIONS[request.action]

        def work(conn: sqlite3.Connection) -> Job:
            now = self._now()
            with self._write(conn):
                row = conn.execute(_Q["get_job"], (request.job_id,)).fetchone()
                if row is None:
                    raise JobNotFound(request.job_id)
                before = _job(row)
                if (
                    request.expected_version is not None
                    and before.version != request.expected_version
                ):
                    raise Conflict(before.id, request.expected_version, before.version)
                cancel_running = request.action is Action.CANCEL and before.status is Status.RUNNING
                if before.status not in rule.sources and not cancel_running:
                    raise InvalidTransition(
                        before.id,
                        before.status.value,
                        request.action.value,
                        frozenset(s.value for s in rule.sources),
                    )
                params: dict[str, Any] = {"id": before.id, "now": now}
                if cancel_running:
                    after_row = conn.execute(_Q["act_request_cancel"], params).fetchone()
                elif request.action is Action.REQUEUE:
                    if before.key is not None:
                        holder = conn.execute(_Q["live_job_by_key"], (before.key,)).fetchone()
                        if holder is not None and holder[0] != before.id:
                            raise KeyTaken(before.id, holder[0])
                    params["reset"] = int(request.reset_attempts)
                    after_row = conn.execute(_Q["act_requeue"], params).fetchone()
                else:
                    params.update(
                        status=rule.target.value, actor=request.actor, notes=request.notes
                    )
                    after_row = conn.execute(_Q["act_end"], params).fetchone()
                after = _job(after_row)
                if after.status is not before.status:
                    _emit(conn, before.status, after, now)
                conn.execute(
                    _Q["insert_audit"],
                    (
                        after.id,
                        now,
                        request.actor,
                        request.action.value,
                        before.status.value,
                        after.status.value,
                        after.version,
                        request.notes,
                    ),
                )
            if after.status is Status.PENDING:
                self._announce()
            return after

        return await self._run(work)

    async def counts(self) -> dict[tuple[str, Status], int]:
        """How many jobs per (queue, status)."""

        def work(conn: sqlite3.Connection) -> dict[tuple[str, Status], int]:
            return {(r[0], Status(r[1])): r[2] for r in conn.execute(_Q["counts"]).fetchall()}

        return await self._run(work)

    async def prune(self, older_than: float, statuses: frozenset[Status]) -> int:
        """Delete finished jobs (attempts and audit cascade) in chunks."""
        chosen = _dumps(sorted(s.value for s in statuses))

        def work(conn: sqlite3.Connection) -> int:
            cutoff = self._now() - older_than
            total = 0
            while True:
                with self._write(conn):
                    cursor = conn.execute(
                        _Q["prune"], {"cutoff": cutoff, "statuses": chosen, "limit": 1000}
                    )
                    deleted = cursor.rowcount
                total += deleted
                if deleted < 1000:
                    return total

        return await self._run(work)

    # -- outbox -----------------------------------------------------------------------------

    async def claim_events(self, limit: int, lease_seconds: float) -> list[Event]:
        """Lease due events, oldest first, never overtaking an older event of the same job."""

        def work(conn: sqlite3.Connection) -> list[Event]:
            params = {"now": self._now(), "lease_seconds": lease_seconds, "limit": limit}
            with self._write(conn):
                rows = _named(conn).execute(_Q["claim_events"], params).fetchall()
            return sorted((_event(r) for r in rows), key=lambda e: e.id)

        return await self._run(work)

    async def ack_events(self, events: Sequence[Event]) -> int:
        """Delete delivered events (fenced by lease token)."""
        if not events:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            with self._write(conn):
                return sum(
                    conn.execute(_Q["ack_event"], (e.id, e.lease_token)).rowcount for e in events
                )

        return await self._run(work)

    async def retry_event(self, event: Event, retry_in: float, error: str) -> bool:
        """Make a failed delivery due again in ``retry_in`` seconds."""

        def work(conn: sqlite3.Connection) -> bool:
            params = {
                "now": self._now(),
                "retry_in": max(0.0, retry_in),
                "error": error[:4000],
                "id": event.id,
                "token": event.lease_token,
            }
            with self._write(conn):
                return conn.execute(_Q["retry_event"], params).rowcount == 1

        return await self._run(work)


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute(_Q["data_version"]).fetchone()[0])


@functools.cache
def _split_statements(sql: str) -> tuple[str, ...]:
    """A migration file's statements, run one by one so they share our transaction."""
    statements: list[str] = []
    buffer = ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return tuple(statements)
