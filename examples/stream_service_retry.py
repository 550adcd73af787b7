"""Seed 000 rebuilt: the StreamService POST, retried 3 times with 1 s then 2 s backoff.

The Go original hand-rolled the loop (context checks, backoff timer, distinct final errors). Here
the same policy drives two forms:

- in process: ``durably.retry(policy).call(...)``, cancellable at any point with a
  :class:`durably.CancelToken` and bounded by a deadline;
- durable: one job on the built-in HTTP operation, which survives a crash of the caller, keeps
  every attempt in its history and dead-letters with a classified reason instead of just
  returning an error.

Run it: ``python examples/stream_service_retry.py [--url sqlite:///jobs.db] [--seed-timing]``.
By default it waits 10 ms then 20 ms; ``--seed-timing`` uses the seed's 1 s and 2 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

import durably
from durably.http import HTTP_OPERATION, http_payload, register_http
from durably.job import LIVE

# The seed's shape: 3 attempts, waits of 1 s then 2 s, no jitter.
SEED_POLICY = durably.RetryPolicy(max_attempts=3, initial=1.0, multiplier=2.0, jitter="none")
FAST_POLICY = SEED_POLICY.replace(initial=0.01)
TRACK = {"track_id": 42, "source": "upload"}


class StreamServerError(Exception):
    """The stream server answered something other than 200 (retried, as in the seed)."""


class _StreamServer(ThreadingHTTPServer):
    """A local stream server that answers 503 to its first ``failures`` POSTs, then 200."""

    def __init__(self, failures: int) -> None:
        super().__init__(("127.0.0.1", 0), _StreamHandler)
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/streams"


class _StreamHandler(BaseHTTPRequestHandler):
    server: _StreamServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.calls += 1
            failing = self.server.calls <= self.server.failures
        status, body = (503, b'{"error":"busy"}') if failing else (200, b'{"stream_id":"s-42"}')
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the example's output to what durably reports


@contextmanager
def stream_server(failures: int) -> Iterator[_StreamServer]:
    """Serve on 127.0.0.1 (an ephemeral port) until the block ends."""
    server = _StreamServer(failures)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def start_processing(
    url: str, track: dict[str, Any], policy: durably.RetryPolicy, cancel: durably.CancelToken
) -> Any:
    """The seed's ``StartProcessing``, in process: POST until 200, at most ``policy`` allows.

    ``cancel.cancel()`` stops it before the next attempt or in the middle of a backoff wait
    (:class:`durably.Cancelled`); running out of attempts raises
    :class:`durably.AttemptsExhausted` carrying the last error. Each failed attempt is logged
    at WARNING by ``durably.retry``.
    """
    with httpx.Client(timeout=5.0) as client:

        def post() -> Any:
            response = client.post(url, json=track)
            if response.status_code != 200:
                raise StreamServerError(f"stream server answered {response.status_code}")
            return response.json()

        # httpx.TransportError (network) and StreamServerError (non-200) are both retried.
        retrying = durably.retry(policy.replace(retry_on=(httpx.TransportError, StreamServerError)))
        return retrying.call(post, cancel=cancel, deadline=time.monotonic() + 30.0)


def _settle(app: durably.Durably, job_id: int, rounds: int = 20) -> durably.Job:
    """Run burst workers until the job has finished (a burst may end before a retry is due)."""
    for _ in range(rounds):
        app.run_worker(burst=True, poll_interval=0.2)
        job = app.get(job_id)
        if job.status not in LIVE:
            return job
    raise RuntimeError(f"job {job_id} did not finish: {app.get(job_id).status}")


def main(url: str, policy: durably.RetryPolicy = FAST_POLICY) -> dict[str, Any]:
    """Run both forms against a server that fails twice; return what each saw."""
    with stream_server(failures=2) as server:
        result = start_processing(server.url, TRACK, policy, durably.CancelToken())
        in_process = {"result": result, "calls": server.calls}

    with stream_server(failures=2) as server, durably.Durably(url) as app:
        register_http(app, policy=policy)
        job = app.enqueue(
            HTTP_OPERATION, http_payload(server.url, TRACK, timeout=5.0), key="stream-track-42"
        )
        job = _settle(app, job.id)
        attempts = app.attempts(job.id)
        durable = {
            "job_id": job.id,
            "status": job.status.value,
            "result": job.result,
            "calls": server.calls,
            "attempts": [
                {"number": a.number, "outcome": a.outcome, "error": a.error_message}
                for a in attempts
            ],
        }
    return {"in_process": in_process, "durable": durable}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Seed 000: a retried POST, two ways.")
    parser.add_argument("--url", default=f"sqlite:///{tempfile.mkdtemp()}/durably.db")
    parser.add_argument("--seed-timing", action="store_true", help="wait 1 s then 2 s")
    args = parser.parse_args()
    print(json.dumps(main(args.url, SEED_POLICY if args.seed_timing else FAST_POLICY), indent=2))
