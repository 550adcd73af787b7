"""durably: operations that must not be lost.

>>> import durably
>>> app = durably.Durably("sqlite:///jobs.db")
>>> @app.operation("notify", policy=durably.RetryPolicy(max_attempts=5, jitter="full"))
... def notify(payload: dict) -> dict: ...
"""

from __future__ import annotations

from durably.app import Durably, JobSpec
from durably.errors import (
    AttemptsExhausted,
    Cancelled,
    ConfigError,
    Conflict,
    DurablyError,
    InvalidTransition,
    JobNotFound,
    KeyTaken,
    PayloadError,
    Permanent,
    RetryAfter,
    SchemaTooNew,
    StaleLease,
    StoreError,
    StoreUnavailable,
    UnknownHandler,
)
from durably.executor import JobContext
from durably.http import HTTP_OPERATION, http_payload, register_http
from durably.job import Action, Attempt, AuditEntry, Classification, Job, JobFilter, Status
from durably.policy import RetryPolicy, backoff
from durably.retry import CancelToken, retry
from durably.telemetry import PrometheusTelemetry, Telemetry
from durably.worker import Pruner, Rescuer, Worker

__version__ = "0.1.0"

__all__ = [
    "HTTP_OPERATION",
    "Action",
    "Attempt",
    "AttemptsExhausted",
    "AuditEntry",
    "CancelToken",
    "Cancelled",
    "Classification",
    "ConfigError",
    "Conflict",
    "Durably",
    "DurablyError",
    "InvalidTransition",
    "Job",
    "JobContext",
    "JobFilter",
    "JobNotFound",
    "JobSpec",
    "KeyTaken",
    "PayloadError",
    "Permanent",
    "PrometheusTelemetry",
    "Pruner",
    "Rescuer",
    "RetryAfter",
    "RetryPolicy",
    "SchemaTooNew",
    "StaleLease",
    "Status",
    "StoreError",
    "StoreUnavailable",
    "Telemetry",
    "UnknownHandler",
    "Worker",
    "__version__",
    "backoff",
    "http_payload",
    "register_http",
    "retry",
]
