"""The HTTP operation's handler, called directly against a real local flaky server.

Each response class must become the exception (and classification) the worker turns into the
right decision; secrets in the request must never reach a message or a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from durably import Durably
from durably.errors import ConfigError, Permanent, RetryAfter
from durably.http import (
    BODY_LIMIT,
    HTTP_OPERATION,
    HttpClientError,
    HttpPayloadError,
    HttpRetryAfter,
    HttpStatusError,
    HttpTimeoutError,
    HttpTransportError,
    http_handler,
    http_payload,
    redact_headers,
    register_http,
)
from durably.policy import RetryPolicy
from flaky_server import FlakyServer, Reply

NOW = datetime(2026, 10, 21, 7, 27, 30, tzinfo=UTC)
POLICY = RetryPolicy()
SECRETS = {
    "Authorization": "Bearer s3cr3t-bearer-value",
    "Cookie": "session=c00kie-value",
    "X-Api-Key": "api-key-value-123",
    "X-Upload-Token": "upl0ad-token-value",
    "X-Client-Secret": "client-secret-value",
}


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with FlakyServer() as flaky:
        yield flaky


async def call(
    server: FlakyServer, *replies: Reply, timeout: float = 5.0, method: str = "POST"
) -> Any:
    """Script ``replies`` and send one POST (or ``method``) of ``{"track_id": 42}`` to /jobs."""
    server.script(*replies)
    handler = http_handler(clock=lambda: NOW)
    payload = http_payload(server.url("/jobs"), {"track_id": 42}, method=method, timeout=timeout)
    return await handler(payload)


def assert_no_secret(text: str) -> None:
    for value in SECRETS.values():
        assert value not in text
        assert value.split()[-1] not in text


# -- payloads ---------------------------------------------------------------------------------


def test_http_payload_builds_the_stored_shape() -> None:
    payload = http_payload(
        "https://stream.example/jobs", {"track_id": 42}, method="put", headers={"X-Trace": "1"}
    )
    assert payload == {
        "url": "https://stream.example/jobs",
        "method": "PUT",
        "headers": {"X-Trace": "1"},
        "json": {"track_id": 42},
        "timeout": 10.0,
    }


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"url": "ftp://stream.example/jobs"}, "http:// or https://"),
        ({"url": "stream.example/jobs"}, "http:// or https://"),
        ({"url": ""}, "non-empty"),
        ({"url": "http://host:99999/"}, "not a valid URL"),
        ({"method": "TRACE"}, "method must be one of POST, PUT, PATCH, DELETE, GET"),
        ({"method": "HEAD"}, "method must be one of"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"headers": {"X-A": 1}}, "str value"),
        ({"headers": {"Bad Name": "x"}}, "header name"),
        ({"headers": {"X-A": "a\r\nInjected: 1"}}, "line breaks"),
        ({"json": {"x": object()}}, "json must be JSON"),
    ],
)
def test_http_payload_rejects_bad_requests_with_a_clear_config_error(
    kwargs: dict[str, object], fragment: str
) -> None:
    args: dict[str, object] = {"url": "https://stream.example/jobs", **kwargs}
    with pytest.raises(ConfigError, match="invalid HTTP request") as info:
        http_payload(**args)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_http_payload_error_does_not_echo_a_secret_header_value() -> None:
    with pytest.raises(ConfigError) as info:
        http_payload("https://x.example/", headers={"Authorization": "Bearer abc\r\nX: 1"})
    assert "abc" not in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "https://stream.example/jobs",
        [1, 2],
        {"method": "POST"},
        {"url": "https://stream.example/jobs", "extra": 1},
        {"url": "https://stream.example/jobs", "method": "CONNECT"},
        {"url": "file:///etc/passwd"},
        {"url": "https://stream.example/jobs", "timeout": "10"},
        {"url": "https://stream.example/jobs", "headers": ["Authorization"]},
    ],
)
async def test_malformed_payload_is_permanent_bad_payload(payload: object) -> None:
    handler = http_handler()
    with pytest.raises(HttpPayloadError) as info:
        await handler(payload)
    assert isinstance(info.value, Permanent)
    assert POLICY.classify(info.value) == "bad_payload"
    assert not POLICY.is_retryable(info.value)


async def test_malformed_payload_sends_nothing(server: FlakyServer) -> None:
    with pytest.raises(HttpPayloadError):
        await http_handler()({"url": server.url("/jobs"), "method": "TRACE"})
    assert server.count == 0


# -- successes --------------------------------------------------------------------------------


async def test_200_returns_status_selected_headers_and_json_body(server: FlakyServer) -> None:
    result = await call(
        server, Reply(200, body={"ok": True}, headers={"X-Internal": "no", "Set-Cookie": "a=b"})
    )
    assert result == {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": {"ok": True},
    }
    [request] = server.requests
    assert (request.method, request.path, request.json) == ("POST", "/jobs", {"track_id": 42})
    assert request.headers["content-type"] == "application/json"


async def test_201_keeps_location_and_json_body(server: FlakyServer) -> None:
    result = await call(
        server, Reply(201, body={"id": 7}, headers={"Location": "/jobs/7"}), method="PUT"
    )
    assert result["status"] == 201
    assert result["headers"] == {"content-type": "application/json", "location": "/jobs/7"}
    assert result["body"] == {"id": 7}
    assert server.requests[0].method == "PUT"


async def test_text_body_is_kept_as_text_and_truncated(server: FlakyServer) -> None:
    big = "x" * (BODY_LIMIT + 10)
    result = await call(server, Reply(200, body=big))
    assert result["body"] == "x" * BODY_LIMIT
    result = await call(server, Reply(200, body="plain"))
    assert result["body"] == "plain"


async def test_headers_reach_the_server_and_no_body_without_json(server: FlakyServer) -> None:
    server.script(Reply(204))
    payload = http_payload(server.url("/x?a=1"), method="DELETE", headers={"X-Trace": "t1"})
    result = await http_handler()(payload)
    assert result == {"status": 204, "headers": {}, "body": ""}
    [request] = server.requests
    assert (request.method, request.path, request.body) == ("DELETE", "/x?a=1", b"")
    assert request.headers["x-trace"] == "t1"


# -- retryable answers ------------------------------------------------------------------------


async def test_503_with_retry_after_seconds_asks_for_that_delay(server: FlakyServer) -> None:
    with pytest.raises(RetryAfter) as info:
        await call(server, Reply(503, body="busy", headers={"Retry-After": "2"}))
    assert isinstance(info.value, HttpRetryAfter)
    assert info.value.seconds == 2.0
    assert info.value.status_code == 503
    assert "503" in str(info.value)
    assert POLICY.is_retryable(info.value)


async def test_retry_after_http_date_is_relative_to_now(server: FlakyServer) -> None:
    with pytest.raises(RetryAfter) as info:
        await call(server, Reply(503, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}))
    assert info.value.seconds == 30.0
    with pytest.raises(RetryAfter) as past:
        await call(server, Reply(429, headers={"Retry-After": "Wed, 21 Oct 2026 07:00:00 GMT"}))
    assert past.value.seconds == 0.0


async def test_unparseable_retry_after_falls_back_to_the_policy(server: FlakyServer) -> None:
    with pytest.raises(HttpStatusError) as info:
        await call(server, Reply(502, headers={"Retry-After": "soon"}))
    assert not isinstance(info.value, RetryAfter)
    assert POLICY.classify(info.value) == "transient"


async def test_429_without_retry_after_is_rate_limited(server: FlakyServer) -> None:
    with pytest.raises(HttpStatusError) as info:
        await call(server, Reply(429, body={"error": "slow down"}))
    assert info.value.status_code == 429
    assert POLICY.classify(info.value) == "rate_limited"
    assert POLICY.is_retryable(info.value)


@pytest.mark.parametrize(("status", "kind"), [(408, "timeout"), (425, "transient")])
async def test_4xx_that_mean_not_now_are_retried(
    server: FlakyServer, status: int, kind: str
) -> None:
    # 408 Request Timeout and 425 Too Early ask for the same request again later.
    with pytest.raises(HttpStatusError) as info:
        await call(server, Reply(status, body="later"))
    assert not isinstance(info.value, Permanent)
    assert info.value.status_code == status
    assert POLICY.classify(info.value) == kind
    assert POLICY.is_retryable(info.value)
    with pytest.raises(RetryAfter) as after:
        await call(server, Reply(status, headers={"Retry-After": "3"}))
    assert after.value.seconds == 3.0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_transient(server: FlakyServer, status: int) -> None:
    with pytest.raises(HttpStatusError) as info:
        await call(server, Reply(status, body="oops"))
    assert not isinstance(info.value, Permanent)
    assert info.value.status_code == status
    assert POLICY.classify(info.value) == "transient"
    assert POLICY.is_retryable(info.value)
    assert f"answered {status}: oops" in str(info.value)


# -- permanent answers ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_4xx_is_permanent_http_4xx_naming_status_and_body(
    server: FlakyServer, status: int
) -> None:
    with pytest.raises(HttpClientError) as info:
        await call(server, Reply(status, body={"error": "track 42   unknown"}))
    exc = info.value
    assert isinstance(exc, Permanent)
    assert isinstance(exc, HttpStatusError)
    assert exc.status_code == status
    assert POLICY.classify(exc) == "http_4xx"
    assert not POLICY.is_retryable(exc)
    message = str(exc)
    assert f"POST {server.url('/jobs')} answered {status}" in message
    assert '{"error": "track 42 unknown"}' in message  # whitespace collapsed


async def test_4xx_body_excerpt_is_short(server: FlakyServer) -> None:
    with pytest.raises(HttpClientError) as info:
        await call(server, Reply(400, body="e" * 5000))
    assert len(str(info.value)) < 400


async def test_unfollowed_redirect_is_permanent(server: FlakyServer) -> None:
    with pytest.raises(HttpClientError) as info:
        await call(server, Reply(302, headers={"Location": "/elsewhere"}))
    assert POLICY.classify(info.value) == "permanent"
    assert info.value.status_code == 302


# -- transport failures -----------------------------------------------------------------------


async def test_connection_reset_is_transient(server: FlakyServer) -> None:
    with pytest.raises(HttpTransportError) as info:
        await call(server, Reply.reset_connection())
    assert not isinstance(info.value, HttpTimeoutError)
    assert POLICY.classify(info.value) == "transient"
    assert POLICY.is_retryable(info.value)
    assert server.count == 1


async def test_connection_refused_is_transient() -> None:
    with FlakyServer() as gone:
        url = gone.url("/jobs")
    with pytest.raises(HttpTransportError) as info:
        await http_handler()(http_payload(url, timeout=2))
    assert POLICY.classify(info.value) == "transient"


async def test_slow_answer_beyond_the_timeout_is_a_timeout(server: FlakyServer) -> None:
    with pytest.raises(HttpTimeoutError) as info:
        await call(server, Reply(200, delay=5.0), timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert POLICY.classify(info.value) == "timeout"
    assert POLICY.is_retryable(info.value)
    assert "timed out after 0.05s" in str(info.value)


# -- secrets ----------------------------------------------------------------------------------


def test_redact_headers_masks_secret_names_only() -> None:
    redacted = redact_headers({**SECRETS, "X-Trace": "t1", "Content-Type": "a/b"})
    assert redacted["X-Trace"] == "t1"
    assert redacted["Content-Type"] == "a/b"
    assert {redacted[name] for name in SECRETS} == {"***"}


@pytest.mark.parametrize(
    "reply",
    [
        Reply(401, body="bad credentials Bearer s3cr3t-bearer-value api-key-value-123"),
        Reply(500, body="session=c00kie-value upl0ad-token-value client-secret-value"),
        Reply.reset_connection(),
    ],
)
async def test_secrets_never_reach_messages_or_logs(
    server: FlakyServer, reply: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="durably.http")
    server.script(reply)
    url = server.url("/jobs?api_token=query-secret-value&page=2").replace(
        "http://", "http://user:url-password@"
    )
    with pytest.raises(Exception) as info:  # noqa: PT011  # each reply raises its own type
        await http_handler()(http_payload(url, {"a": 1}, headers=SECRETS))
    assert isinstance(info.value, HttpTransportError | HttpStatusError)
    text = str(info.value) + repr(info.value.__cause__) + caplog.text
    assert_no_secret(text)
    for leaked in ("query-secret-value", "url-password"):
        assert leaked not in text
    assert "***" in str(info.value)
    assert caplog.records, "the request is logged (redacted) at debug level"
    # The secrets were really sent: redaction is for messages, not for the request.
    sent = server.requests[0].headers
    assert sent["x-api-key"] == SECRETS["X-Api-Key"]
    assert sent["authorization"].startswith("Basic ")  # httpx lets URL user info win
    assert sent["authorization"].split()[1] not in text


# -- registration -----------------------------------------------------------------------------


def test_register_http_registers_an_async_operation(tmp_path: object) -> None:
    app = Durably(f"sqlite:///{tmp_path}/j.db")
    policy = RetryPolicy(max_attempts=3)
    op = register_http(app, policy=policy)
    assert (op.name, op.is_async, op.policy) == (HTTP_OPERATION, True, policy)
    assert app.operations[HTTP_OPERATION] is op
    other = register_http(app, name="stream.post")
    assert app.operations["stream.post"] is other


async def test_client_factory_is_used_for_each_attempt(server: FlakyServer) -> None:
    made: list[httpx.AsyncClient] = []

    def factory() -> httpx.AsyncClient:
        client = httpx.AsyncClient(headers={"X-From-Factory": "yes"})
        made.append(client)
        return client

    server.script(Reply(200))
    handler = http_handler(client_factory=factory)
    await handler(http_payload(server.url("/a")))
    await handler(http_payload(server.url("/b")))
    assert len(made) == 2
    assert all(client.is_closed for client in made)
    assert [r.headers["x-from-factory"] for r in server.requests] == ["yes", "yes"]
