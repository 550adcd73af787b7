"""The built-in HTTP operation: one durable, retried HTTP request per job.

Register it once, then enqueue requests built with :func:`http_payload`:

>>> app = Durably("sqlite:///jobs.db")  # doctest: +SKIP
>>> register_http(app, policy=RetryPolicy(max_attempts=3, initial=1, multiplier=2))
... # doctest: +SKIP
Operation(name='durably.http', ...)
>>> app.enqueue(HTTP_OPERATION, http_payload("https://stream.example/jobs", {"track_id": 42}),
...             key="stream-42")  # doctest: +SKIP

Each attempt sends the request once, with the payload's per-attempt ``timeout``. The response
decides what the worker does next:

- 2xx: the job succeeds with ``{"status", "headers", "body"}``;
- network errors: :class:`HttpTransportError` (``transient``), timeouts :class:`HttpTimeoutError`
  (``timeout``), both retried;
- 5xx, 429, 408 and 425: retried after ``Retry-After`` when the server sends one
  (:class:`HttpRetryAfter`, a :class:`~durably.errors.RetryAfter`), otherwise
  :class:`HttpStatusError` (``transient``; ``rate_limited`` for 429 Too Many Requests,
  ``timeout`` for 408 Request Timeout; 425 Too Early asks for the same request later) under the
  policy's backoff;
- any other status: :class:`HttpClientError` (a :class:`~durably.errors.Permanent`, ``http_4xx``
  for 4xx), dead-lettered at once.

Secret header values (``Authorization``, ``Cookie``, ``X-Api-Key``, anything naming a token,
secret, password or key) never reach error messages or logs: they read ``***``.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import json
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import httpx

from durably.app import Durably
from durably.errors import ConfigError, DurablyError, PayloadError, Permanent, RetryAfter
from durably.executor import Operation
from durably.job import JSON
from durably.policy import RetryPolicy

__all__ = [
    "BODY_LIMIT",
    "HTTP_METHODS",
    "HTTP_OPERATION",
    "HttpClientError",
    "HttpError",
    "HttpPayloadError",
    "HttpRetryAfter",
    "HttpStatusError",
    "HttpTimeoutError",
    "HttpTransportError",
    "http_handler",
    "http_payload",
    "redact_headers",
    "register_http",
]

log = logging.getLogger("durably.http")

HTTP_OPERATION = "durably.http"
"""The name :func:`register_http` registers the operation under by default."""

HTTP_METHODS: tuple[str, ...] = ("POST", "PUT", "PATCH", "DELETE", "GET")
"""The methods a payload may use."""

BODY_LIMIT = 64 * 1024
"""Bytes of a response body kept in the job's result (and read from the socket, plus one)."""

_EXCERPT = 200
_MAX_TIMEOUT = 3600.0
_PAYLOAD_KEYS = frozenset({"url", "method", "headers", "json", "timeout"})
# 4xx answers that say "not now" rather than "never" (RFC 9110 408, RFC 8470 425, RFC 6585
# 429), with the classification their retries are counted under.
_RETRIED_4XX: Mapping[int, str] = {408: "timeout", 425: "transient", 429: "rate_limited"}
_RESULT_HEADERS = ("content-type", "location")
_SECRET_NAMES = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
_SECRET_PARTS = ("token", "secret", "password", "passwd", "api-key", "api_key", "apikey", "auth")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
_REDACTED = "***"


# -- errors -----------------------------------------------------------------------------------


class HttpError(DurablyError):
    """Base class of the errors the HTTP operation raises."""


class HttpPayloadError(PayloadError, Permanent):
    """The job's payload is not a valid HTTP request: never retried (``bad_payload``)."""

    classification = "bad_payload"


class HttpTransportError(HttpError):
    """The request did not get an answer (refused, reset, DNS, TLS...): retried."""

    classification = "transient"


class HttpTimeoutError(HttpTransportError, TimeoutError):
    """No complete answer within the payload's per-attempt ``timeout``: retried (``timeout``)."""

    classification = "timeout"


class HttpStatusError(HttpError):
    """The server answered with a status worth retrying (5xx, 429, 408, 425) and no
    ``Retry-After``.

    ``status_code`` holds the status; ``classification`` is ``transient`` (5xx, 425),
    ``rate_limited`` (429) or ``timeout`` (408).
    """

    def __init__(self, message: str, status_code: int, classification: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.classification = classification


class HttpClientError(HttpStatusError, Permanent):
    """The server refused the request (4xx but 408, 425 and 429, or an unfollowed 3xx): never
    retried.

    ``classification`` is ``http_4xx`` for a 4xx, ``permanent`` otherwise.
    """


class HttpRetryAfter(RetryAfter):
    """A retried status (5xx, 429, 408, 425) with ``Retry-After``: the next attempt waits
    ``seconds`` (policy-capped)."""

    def __init__(self, seconds: float, message: str, status_code: int) -> None:
        super().__init__(seconds, message)
        self.status_code = status_code


# -- redaction --------------------------------------------------------------------------------


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(part in lowered for part in _SECRET_PARTS)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with every secret-looking value replaced by ``***``.

    >>> redact_headers({"Authorization": "Bearer abc", "X-Trace": "1"})
    {'Authorization': '***', 'X-Trace': '1'}
    """
    return {name: _REDACTED if _is_secret(name) else value for name, value in headers.items()}


def _safe_url(url: str) -> str:
    """``url`` without user info and with secret-looking query values masked."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:  # IPv6 literal
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        if parts.username is not None or parts.password is not None:
            netloc = f"{_REDACTED}@{netloc}"
        query = urlencode(
            [
                (k, _REDACTED if _is_secret(k) else v)
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
            ],
            safe="*",
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<unparseable url>"


class _Scrubber:
    """Removes the request's secret values from any text before it becomes a message."""

    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        secrets = [value for name, value in headers.items() if _is_secret(name)]
        parts = urlsplit(url)
        secrets += [p for p in (parts.username, parts.password) if p]
        if parts.username is not None:  # what httpx sends for URL user info
            basic = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            secrets.append(base64.b64encode(basic.encode()).decode())
        secrets += [v for k, v in parse_qsl(parts.query) if _is_secret(k)]
        # Bearer tokens also show up without their scheme; longest first so parts never leak.
        secrets += [v.split(None, 1)[1] for v in list(secrets) if " " in v.strip()]
        self._secrets = sorted({s for s in secrets if s.strip()}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text


# -- payloads ---------------------------------------------------------------------------------


class _Request:
    """A validated payload."""

    __slots__ = ("body", "headers", "method", "timeout", "url")

    def __init__(
        self, url: str, method: str, headers: dict[str, str], body: JSON, timeout: float
    ) -> None:
        self.url = url
        self.method = method
        self.headers = headers
        self.body = body
        self.timeout = timeout


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise ValueError(f"url must be a non-empty string, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"url {_safe_url(url)!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"url must be an absolute http:// or https:// URL, got {_safe_url(url)!r}")
    if any(c in url for c in "\r\n\t "):
        raise ValueError("url must not contain whitespace or line breaks")
    return url


def _check_method(method: object) -> str:
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise ValueError(f"method must be one of {', '.join(HTTP_METHODS)}, got {method!r}")
    return method.upper()


def _check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ValueError(f"headers must be a mapping of str to str, got {type(headers).__name__}")
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP header name")
        if not isinstance(value, str):
            raise ValueError(f"header {name!r} must have a str value, got {type(value).__name__}")
        if "\r" in value or "\n" in value:
            shown = _REDACTED if _is_secret(name) else repr(value)
            raise ValueError(f"header {name!r} must not contain line breaks (value {shown})")
        checked[name] = value
    return checked


def _check_timeout(timeout: object) -> float:
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or not 0 < timeout <= _MAX_TIMEOUT
    ):
        raise ValueError(
            f"timeout must be a number of seconds in (0, {_MAX_TIMEOUT:g}], got {timeout!r}"
        )
    return float(timeout)


def _check_body(body: object) -> JSON:
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"json must be JSON (dict, list, str, number, bool, None): {exc}"
        ) from None
    return body


def _parse(payload: object) -> _Request:
    """Validate a stored payload; ValueError says what is wrong (never with a secret value)."""
    if not isinstance(payload, Mapping):
        raise ValueError(
            f"payload must be an object built by http_payload(), got {type(payload).__name__}"
        )
    unknown = sorted(str(k) for k in payload if k not in _PAYLOAD_KEYS)
    if unknown:
        raise ValueError(
            f"unknown payload key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_PAYLOAD_KEYS))}"
        )
    if "url" not in payload:
        raise ValueError("payload has no url")
    return _Request(
        url=_check_url(payload["url"]),
        method=_check_method(payload.get("method", "POST")),
        headers=_check_headers(payload.get("headers")),
        body=_check_body(payload.get("json")),
        timeout=_check_timeout(payload.get("timeout", 10.0)),
    )


def http_payload(
    url: str,
    json: JSON = None,
    *,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> dict[str, JSON]:
    """The payload of one HTTP job: ``json`` is sent as the JSON body (``None``: no body).

    ``timeout`` (seconds) bounds each phase of an attempt: connecting, sending the request,
    waiting for the answer's headers, and reading its whole body. Raises
    :class:`~durably.errors.ConfigError` for a method outside :data:`HTTP_METHODS`, a URL that
    is not absolute http(s), a header that is not ``str: str``, or a bad timeout.

    >>> http_payload("https://stream.example/jobs", {"track_id": 42}, timeout=5)["json"]
    {'track_id': 42}

    Headers are stored with the job, so a secret in them is stored too; it is redacted from
    errors and logs only.
    """
    try:
        request = _parse(
            {"url": url, "method": method, "headers": headers, "json": json, "timeout": timeout}
        )
    except ValueError as exc:
        raise ConfigError(f"invalid HTTP request: {exc}") from None
    return {
        "url": request.url,
        "method": request.method,
        "headers": dict(request.headers),
        "json": request.body,
        "timeout": request.timeout,
    }


# -- responses --------------------------------------------------------------------------------


def _retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` value asks for (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _decode(raw: bytes, response: httpx.Response) -> str:
    return raw.decode(response.encoding or "utf-8", errors="replace")


def _body(raw: bytes, truncated: bool, response: httpx.Response) -> JSON:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not truncated and (content_type == "application/json" or content_type.endswith("+json")):
        try:
            parsed: JSON = json.loads(raw)
            return parsed
        except ValueError:
            pass  # a server that lies about its content type: keep the text
    return _decode(raw, response)


def _excerpt(raw: bytes, response: httpx.Response) -> str:
    text = " ".join(_decode(raw[: _EXCERPT * 4], response).split())
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 1] + "…"


async def _read(response: httpx.Response) -> tuple[bytes, bool]:
    """At most :data:`BODY_LIMIT` bytes of the body, and whether more was left unread."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > BODY_LIMIT:
            return b"".join(chunks)[:BODY_LIMIT], True
    return b"".join(chunks), False


# -- the handler ------------------------------------------------------------------------------


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes tens of milliseconds: do it once, not once per attempt.
    return httpx.create_ssl_context()


def _default_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(follow_redirects=False, verify=_ssl_context())


def http_handler(
    *,
    client_factory: Callable[[], httpx.AsyncClient] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Callable[[JSON], Awaitable[JSON]]:
    """The async handler :func:`register_http` registers, for wrapping or direct calls.

    ``client_factory`` makes the client of each attempt (closed afterwards; default: an
    ``httpx.AsyncClient`` that does not follow redirects). ``clock`` is "now" for
    ``Retry-After`` dates (tests).

    >>> handle = http_handler()
    >>> await handle(http_payload("https://stream.example/jobs", {"track_id": 42}))
    ... # doctest: +SKIP
    {'status': 200, 'headers': {'content-type': 'application/json'}, 'body': {'ok': True}}
    """
    factory = client_factory or _default_client
    now = clock or (lambda: datetime.now(UTC))

    async def http_request(payload: JSON) -> JSON:
        try:
            request = _parse(payload)
        except ValueError as exc:
            raise HttpPayloadError(f"invalid HTTP payload: {exc}") from None
        scrub = _Scrubber(request.url, request.headers)
        target = f"{request.method} {_safe_url(request.url)}"
        log.debug("%s (headers %s)", target, redact_headers(request.headers))
        try:
            # httpx bounds connecting, sending and each read by the timeout; the whole body
            # gets the same deadline, so a server dripping bytes cannot hold the attempt. No
            # deadline spans the first request's lazy imports (anyio, h11): they are not the
            # network's fault, and would otherwise eat a short timeout before anything is sent.
            async with (
                factory() as client,
                client.stream(
                    request.method,
                    request.url,
                    headers=request.headers,
                    json=request.body,
                    timeout=request.timeout,
                ) as response,
                asyncio.timeout(request.timeout),
            ):
                raw, truncated = await _read(response)
        except (TimeoutError, httpx.TimeoutException) as exc:
            # ``from None``: a chained httpx error would carry the request, secrets included.
            raise HttpTimeoutError(
                f"{target} timed out after {request.timeout:g}s ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise HttpTransportError(
                scrub(f"{target} failed: {type(exc).__name__}: {exc}")
            ) from None
        status = response.status_code
        log.debug("%s -> %d", target, status)
        if 200 <= status < 300:
            headers: dict[str, JSON] = {
                name: response.headers[name] for name in _RESULT_HEADERS if name in response.headers
            }
            return {"status": status, "headers": headers, "body": _body(raw, truncated, response)}
        excerpt = scrub(_excerpt(raw, response))
        message = f"{target} answered {status}" + (f": {excerpt}" if excerpt else "")
        if status >= 500 or status in _RETRIED_4XX:
            delay = _retry_after(response.headers.get("retry-after"), now())
            if delay is not None:
                raise HttpRetryAfter(delay, f"{message} (retry after {delay:g}s)", status)
            raise HttpStatusError(message, status, _RETRIED_4XX.get(status, "transient"))
        kind = "http_4xx" if 400 <= status < 500 else "permanent"
        raise HttpClientError(message, status, kind)

    return http_request


def register_http(
    app: Durably,
    *,
    name: str = HTTP_OPERATION,
    policy: RetryPolicy | None = None,
    client_factory: Callable[[], httpx.AsyncClient] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Operation:
    """Register the HTTP operation on ``app`` under ``name``, retried by ``policy``.

    >>> op = register_http(app, policy=RetryPolicy(max_attempts=3, initial=1, jitter="none"))
    ... # doctest: +SKIP
    >>> app.enqueue(op.name, http_payload("https://stream.example/jobs", {"track_id": 42}))
    ... # doctest: +SKIP

    See :func:`http_handler` for ``client_factory`` and ``clock``.
    """
    return app.register(
        name, http_handler(client_factory=client_factory, clock=clock), policy=policy
    )
