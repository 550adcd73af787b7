"""Idempotency keys across operator actions."""

from __future__ import annotations

import pytest

from durably.errors import Conflict, KeyTaken
from durably.job import Action, Status
from durably.store import Store

from .conftest import act, enqueue_one

pytestmark = pytest.mark.asyncio


async def test_requeue_refuses_a_key_now_held_by_another_live_job(store: Store) -> None:
    first = await enqueue_one(store, key="k")
    await act(store, first.id, Action.CANCEL)
    second = await enqueue_one(store, key="k")
    with pytest.raises(KeyTaken) as caught:
        await act(store, first.id, Action.REQUEUE)
    assert isinstance(caught.value, Conflict)
    assert caught.value.holder == second.id
    assert (await store.get(first.id)).status is Status.CANCELLED
    assert (await store.get_by_key("k")) == await store.get(second.id)


async def test_requeue_takes_the_key_back_when_it_is_free(store: Store) -> None:
    first = await enqueue_one(store, key="k")
    await act(store, first.id, Action.CANCEL)
    requeued = await act(store, first.id, Action.REQUEUE)
    assert requeued.status is Status.PENDING
    assert (await store.get_by_key("k")).id == first.id  # type: ignore[union-attr]
