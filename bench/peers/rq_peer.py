"""RQ (Redis Queue) 3.0 on Redis, run through the side-by-side harness.

Settings, and why:

* Worker: ``rq worker -c bench.peers.rq_peer -w rq.worker.SimpleWorker --with-scheduler
  --quiet``. An RQ worker runs one job at a time, so concurrency means worker processes; the
  harness's "2 proc" is two such workers. Tried on this 2-core machine (W1 no-ops, one harness
  worker, processed/s, noisy: other jobs shared the cores): ``SimpleWorker`` (runs jobs in the
  worker process) ~200-295; ``rq worker-pool -n 2`` of SimpleWorkers ~155-285, ``-n 3`` ~200;
  the default forking ``Worker`` (a fork per job) ~52 with the task module preloaded through
  ``-c`` as RQ's docs advise, ~3 without. So concurrency 1 with SimpleWorker.
  ``rq worker-pool -n N`` is what ``worker_argv`` gives for concurrency > 1 (its workers always
  run the scheduler). ``--quiet`` (WARNING) spares the two INFO lines RQ logs per job.
  SimpleWorker's per-job cost is RQ's own bookkeeping: about 20 Redis round trips per job
  (heartbeats, execution and registry records, status, result stream).
* Retries: ``Retry(max=2, interval=[0.01])``. ``interval`` is documented and typed as whole
  seconds; ``interval=0.01`` raises (``UnboundLocalError``: a float is neither an int nor an
  iterable), but a one-element list of a float is accepted and is used as seconds. A retried
  job goes to the queue's ScheduledJobRegistry, scored in WHOLE seconds (its due time is
  truncated), and only the scheduler moves it back to the queue: ``RQScheduler`` runs in a
  process forked by the worker holding the queue's scheduler lock and checks every 1 s (its
  ``interval``, which ``rq worker`` has no option for), moving at most 1,000 due jobs per queue
  per pass. So a retry starts 0-~1 s after the failure whatever the interval below 1 s, and the
  10 ms is not observable. ``interval=0`` would requeue at once (no delay at all) instead. The
  attempt number is RQ's own: ``retries_left`` of the current job is 2, 1, 0 on attempts 1-3.
* Polling: none to tune; an idle worker blocks in ``BLMOVE``/``BLPOP`` on its queue.
* Bulk enqueue: ``Queue.enqueue_many`` of ``Queue.prepare_data`` items, on a pipeline of
  ours executed per chunk of 5,000 (1,000, 5,000 and 20,000 measured the same, ~6,100-8,300
  jobs/s). W4's backlog: ``Queue.enqueue_at`` on the same kind of pipeline (``enqueue_many``
  cannot schedule). RQ's default (pickle) serializer and result TTL (500 s) are kept.
* Namespace: the queue name, every job id and the worker names hold the adapter's tag, so
  teardown deletes every key of the run found by ``SCAN MATCH rq:*<tag>*``, plus worker and
  scheduler hashes (``rq worker-pool`` names them by uuid) whose ``queues`` field is this
  queue, plus RQ's server-wide ``rq:clean_groups`` lock if it appeared during the run; from
  the sets every RQ user shares (``rq:queues``, ``rq:workers``) it removes only this run's
  members.
* Stop: SIGTERM is RQ's warm shutdown (the job in hand finishes).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

from redis import Redis
from redis.exceptions import ResponseError
from rq import Queue, Retry, get_current_job

from bench.peers import harness

__all__ = ["QUEUE_ENV", "URL_ENV", "RedisAdapter", "flaky", "later", "noop", "stamp"]

URL_ENV = "DURABLY_RQ_URL"
"""The Redis URL a worker process connects to."""
QUEUE_ENV = "DURABLY_RQ_QUEUE"
"""The queue a worker process serves (its name holds the run's tag)."""
DEFAULT_URL = "redis://127.0.0.1:6379/0"
RETRY = Retry(max=harness.SUCCEED_ON - 1, interval=[harness.RETRY_FIXED])  # type: ignore[list-item]
"""W2's retry policy: two retries, each scheduled :data:`harness.RETRY_FIXED` after the failure."""
CHUNK = 5_000
"""Jobs per pipeline in the bulk enqueues: one round trip each, without one huge reply."""
SCAN_COUNT = 1_000

# ``rq worker -c bench.peers.rq_peer`` reads these settings; importing this module in the worker
# process before it starts also preloads the tasks, as RQ's docs advise for forking workers.
REDIS_URL = os.environ.get(URL_ENV, DEFAULT_URL)
"""RQ setting: the worker's Redis."""
QUEUES = [os.environ.get(QUEUE_ENV, "durably_bench_unset")]
"""RQ setting: the queues the worker serves."""
GROUPS_LOCK = "rq:clean_groups"
"""A server-wide lock (TTL about 10 minutes) that a worker's maintenance pass sets on start."""


def noop(key: int) -> None:
    """W1's job: only records that it ran."""
    harness.record("noop", key, 1)


def flaky(key: int) -> None:
    """W2's job: fails until RQ's own retry counter says this is attempt :data:`SUCCEED_ON`."""
    job = get_current_job()
    # RQ decrements ``retries_left`` when it reschedules a failed job: it is 2, 1, 0 on the
    # attempts 1, 2, 3 of a job enqueued with Retry(max=2).
    left = job.retries_left if job is not None and job.retries_left is not None else 0
    attempt = RETRY.max - left + 1
    harness.record("flaky", key, attempt)
    if attempt < harness.SUCCEED_ON:
        raise RuntimeError(f"flaky job {key}: failing attempt {attempt} on purpose")


def stamp(key: int, enqueued_at: float) -> None:
    """W3/W4's job: records with the time it was enqueued."""
    harness.record("stamp", key, 1, enqueued_at)


def later(key: int) -> None:
    """W4's backlog job, due an hour ahead: must never run during the benchmark."""
    harness.record("later", key, 1)


TASKS: dict[str, Callable[..., None]] = {
    "noop": noop,
    "flaky": flaky,
    "stamp": stamp,
    "later": later,
}


class RedisAdapter(harness.Adapter):
    """RQ on Redis: one queue named after the run's tag."""

    peer: ClassVar[str] = "rq"
    store: ClassVar[str] = "redis"
    distribution: ClassVar[str] = "rq"
    concurrency: ClassVar[int] = 1
    stop_signal: ClassVar[int] = signal.SIGTERM

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.url = os.environ.get(URL_ENV, DEFAULT_URL)
        self.queue_name = f"durably_bench_{self.tag}"
        self.redis = Redis.from_url(self.url)
        self.queue = Queue(self.queue_name, connection=self.redis)
        self._groups_lock_existed = True

    def setup(self) -> None:
        """Note whether RQ's global group-cleaning lock exists before this run's workers start."""
        self._groups_lock_existed = bool(self.redis.exists(GROUPS_LOCK))

    def env(self) -> dict[str, str]:
        """The Redis URL and the queue name."""
        return {URL_ENV: self.url, QUEUE_ENV: self.queue_name}

    def worker_argv(self, concurrency: int) -> list[str]:
        """``rq worker`` (one job at a time) or ``rq worker-pool -n N``, scheduler on."""
        common = ["--config", __name__, "--worker-class", "rq.worker.SimpleWorker", "--quiet"]
        if concurrency <= 1:
            name = f"{self.queue_name}_{secrets.token_hex(3)}"
            return [
                sys.executable,
                "-m",
                "rq.cli",
                "worker",
                *common,
                "--with-scheduler",
                "--name",
                name,
            ]
        # The pool's workers always run with the scheduler (one of them takes its lock).
        return [
            sys.executable,
            "-m",
            "rq.cli",
            "worker-pool",
            *common,
            "--num-workers",
            str(concurrency),
        ]

    def _job_id(self, task: str, key: int) -> str:
        return f"{self.tag}_{task}_{key}"

    def enqueue_bulk(self, task: str, keys: Sequence[int]) -> None:
        """``Queue.enqueue_many`` of ``Queue.prepare_data`` items, a pipeline per chunk."""
        func = TASKS[task]
        retry = RETRY if task == "flaky" else None
        for start in range(0, len(keys), CHUNK):
            datas = [
                Queue.prepare_data(func, args=(key,), job_id=self._job_id(task, key), retry=retry)
                for key in keys[start : start + CHUNK]
            ]
            with self.redis.pipeline() as pipe:
                self.queue.enqueue_many(datas, pipeline=pipe)
                pipe.execute()

    def enqueue_stamp(self, key: int, enqueued_at: float) -> None:
        """``Queue.enqueue``, one job."""
        self.queue.enqueue(stamp, key, enqueued_at, job_id=self._job_id("stamp", key))

    def schedule_later(self, keys: Sequence[int], delay: float) -> None:
        """``Queue.enqueue_at`` on a shared pipeline, a pipeline per chunk."""
        due = datetime.now(UTC) + timedelta(seconds=delay)
        for start in range(0, len(keys), CHUNK):
            with self.redis.pipeline() as pipe:
                for key in keys[start : start + CHUNK]:
                    self.queue.enqueue_at(
                        due, later, key, job_id=self._job_id("later", key), pipeline=pipe
                    )
                pipe.execute()

    def _scan(self, pattern: str) -> Iterator[bytes]:
        yield from self.redis.scan_iter(match=pattern, count=SCAN_COUNT)

    def _serving_mine(self, pattern: str) -> list[bytes]:
        """The worker or scheduler hashes (uuid names under ``worker-pool``) of this queue."""
        found: list[bytes] = []
        for key in self._scan(pattern):
            if key.count(b":") != 2:  # ``rq:worker:<name>:executions`` and the like
                continue
            with contextlib.suppress(ResponseError):  # not a hash: not a registration
                queues = self.redis.hget(key, "queues")
                if isinstance(queues, bytes) and self.queue_name in queues.decode().split(","):
                    found.append(key)
        return found

    def teardown(self) -> None:
        """Delete the keys holding the tag or serving the queue; drop this run's set members.

        RQ's global sets ``rq:queues`` and ``rq:workers`` are shared with every other RQ user
        of the server: only this run's members leave them.
        """
        mine = set(self._scan(f"rq:*{self.tag}*"))
        workers = self._serving_mine("rq:worker:*")
        mine.update(workers)
        mine.update(w + b":executions" for w in workers)
        mine.update(self._serving_mine("rq:scheduler:*"))
        workers += [k for k in mine if k.startswith(b"rq:worker:") and k.count(b":") == 2]
        if workers:
            self.redis.srem("rq:workers", *set(workers))
        self.redis.srem("rq:queues", f"rq:queue:{self.queue_name}")
        if not self._groups_lock_existed:
            # Set during this run, so by this run's worker (only another RQ user racing us could
            # have set it instead, and losing it merely lets their next maintenance clean groups).
            mine.add(GROUPS_LOCK.encode())
        keys = sorted(mine)
        for start in range(0, len(keys), SCAN_COUNT):
            self.redis.delete(*keys[start : start + SCAN_COUNT])

    def close(self) -> None:
        """Close the harness-side Redis client."""
        with contextlib.suppress(Exception):
            self.redis.close()
