"""The stores' shared JSON decoding: fast for compact text, otherwise exactly ``json.loads``."""

from __future__ import annotations

import json

import pytest

from durably.job import BadPayload, decode_json, loads_json


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
