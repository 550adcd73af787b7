"""The job records: their quick constructors behave exactly like the dataclasses' own."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import UTC, datetime
from typing import Any

import pytest

from durably.job import Completion, Job, NewJob, Outcome, Status
from durably.store.base import EnqueueResult


def plain_twin(cls: type[Any]) -> type[Any]:
    """The same fields in an ordinary frozen slotted dataclass (its generated ``__init__``)."""
    fields = [
        (f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(cls)
    ]
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True, slots=True)


@pytest.mark.parametrize("cls", [NewJob, Job, Completion, EnqueueResult])
def test_the_quick_constructor_has_the_dataclass_signature(cls: type[Any]) -> None:
    assert str(inspect.signature(cls)) == str(inspect.signature(plain_twin(cls)))


def test_defaults_factories_and_keywords_are_kept() -> None:
    first, second = NewJob("h", {"a": 1}), NewJob(payload=None, handler="h", queue="q")
    assert (first.queue, first.delay, first.policy, first.meta) == ("default", 0.0, {}, {})
    assert first.meta is not second.meta  # a fresh dict per instance, as the factory gives
    assert second.queue == "q"
    with pytest.raises(TypeError):
        NewJob("h")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        NewJob("h", None, nope=1)  # type: ignore[call-arg]


def test_records_stay_frozen_comparable_and_replaceable() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = Job(1, "q", "h", None, Status.PENDING, 0, 3, {}, now, 1, now, now)
    assert job == dataclasses.replace(job)
    assert dataclasses.replace(job, attempts=2).attempts == 2
    assert job == Job(1, "q", "h", None, Status.PENDING, 0, 3, {}, now, 1, now, now)
    assert job != dataclasses.replace(job, version=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.attempts = 5  # type: ignore[misc]
    done = Completion(1, "token", 1, Outcome.SUCCEEDED, result=7)
    assert (done.retry_in, done.require_expired, done.result) == (0.0, False, 7)
    assert dataclasses.asdict(done)["outcome"] is Outcome.SUCCEEDED
