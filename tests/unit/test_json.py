"""The shared JSON codec: decoding fast for compact text, otherwise exactly ``json.loads``;
encoding exactly ``json.dumps`` with the payload options."""

from __future__ import annotations

import json
import threading

import pytest

from durably.job import BadPayload, decode_json, dumps_json, loads_json


@pytest.mark.parametrize(
    "text", ['{"a":[1,2.5,null,true]}', ' {"a": 1} ', "7", '"\\u00e9"', "[]", b'{"b":"\xc3\xa9"}']
)
def test_loads_json_equals_json_loads(text: str | bytes) -> None:
    assert loads_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ["{", '{"a":1} x', "", "nan-ish"])
def test_loads_json_refuses_what_json_loads_refuses(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        loads_json(text)


def test_decode_json_turns_bad_text_into_a_bad_payload() -> None:
    assert decode_json('{"a":1}') == {"a": 1}
    assert decode_json(None) is None
    bad = decode_json('{"a":')
    assert isinstance(bad, BadPayload)
    assert bad.raw == '{"a":'


@pytest.mark.parametrize(
    "value",
    [
        None,
        7,
        2.5,
        "plain",
        '\u00e9\u2603\U0001f600 "q" \\',
        [1, [2, {}]],
        {"b": 1, "a": [True, None]},
    ],
)
def test_dumps_json_equals_compact_json_dumps(value: object) -> None:
    assert dumps_json(value) == json.dumps(value, separators=(",", ":"), allow_nan=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"x": object()}, {1j: 1}])
def test_dumps_json_refuses_what_json_dumps_refuses(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        dumps_json(value)
    assert dumps_json({"still": "fine"}) == '{"still":"fine"}'


def test_dumps_json_raises_recursion_error_for_a_circular_value() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(RecursionError):
        dumps_json(loop)


def test_dumps_json_is_safe_across_threads() -> None:
    # No shared circular-reference markers: the same value encoded at once in many threads.
    shared = {"items": [{"n": i} for i in range(200)]}
    expected = json.dumps(shared, separators=(",", ":"))
    results: list[str] = []
    lock = threading.Lock()

    def encode() -> None:
        for _ in range(200):
            text = dumps_json(shared)
            with lock:
                results.append(text)

    threads = [threading.Thread(target=encode) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 800
