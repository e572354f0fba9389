"""OpenAI request bodies -> GenerateRequests, and bad fields named as the body names them."""

from __future__ import annotations

from typing import Any

import pytest

from sloserve.errors import FieldError
from sloserve.gateway import openai_format as oai
from sloserve.protoconv import seconds


def request(body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    prompt = oai.completion_prompt(body.get("prompt", "hi"))
    return oai.generate_request(body, prompt, headers or {}, "max_tokens")


def bad_field(body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    with pytest.raises(FieldError) as bad:
        request(body, headers)
    return bad.value.field


def test_a_completion_body_becomes_a_generate_request() -> None:
    r = request(
        {
            "prompt": "Hello", "max_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3,
            "stop": "\n", "user": "team-a", "ignore_eos": True,
        }
    )  # fmt: skip
    assert r.prompt.text == "Hello"
    assert r.sampling.max_tokens == 7 and r.sampling.temperature == 0
    assert r.sampling.top_p == 0.5 and r.sampling.seed == 3 and list(r.sampling.stop) == ["\n"]
    assert r.sampling.ignore_eos and r.tenant == "team-a"
    assert r.slo.WhichOneof("target") is None and not r.allow_best_effort


def test_token_id_prompts_pass_as_ids() -> None:
    assert list(request({"prompt": [5, 6, 7]}).prompt.token_ids.ids) == [5, 6, 7]
    assert list(request({"prompt": [[5, 6]]}).prompt.token_ids.ids) == [5, 6]


def test_the_slo_class_comes_from_the_body_or_the_header() -> None:
    assert request({"slo_class": "coding"}).slo.class_name == "coding"
    assert request({}, {oai.SLO_CLASS_HEADER: "chat"}).slo.class_name == "chat"
    best_effort = request({}, {oai.BEST_EFFORT_HEADER: "true"})
    assert best_effort.allow_best_effort


def test_explicit_budgets_in_milliseconds() -> None:
    budgets = request({"slo": {"ttft_ms": 1500, "tpot_ms": 80}}).slo.budgets
    assert seconds(budgets.ttft) == 1.5 and seconds(budgets.tpot) == 0.08


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 2}, "n"),
        ({"stop": [1]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"slo": {"tpot_ms": 50}}, "slo.ttft_ms"),
        ({"slo": {"ttft_ms": -5, "tpot_ms": 50}}, "slo.ttft_ms"),
        ({"slo": {"ttft_ms": 5}, "slo_class": "chat"}, "slo"),
        ({"slo_class": ""}, "slo_class"),
        ({"allow_best_effort": "yes"}, "allow_best_effort"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": 42}, "prompt"),
        # Past what the GenerateRequest field carries, or OpenAI's range.
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"prompt": [1, 2**40]}, "prompt"),
        ({"temperature": 10**400}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"slo": {"ttft_ms": 10**400, "tpot_ms": 50}}, "slo.ttft_ms"),
        ({"slo": {"ttft_ms": 500, "tpot_ms": float("inf")}}, "slo.tpot_ms"),
        ({"slo": {"ttft_ms": 500, "tpot_ms": 50, "thinking_tokens": 2**40}}, "slo.thinking_tokens"),
        ({"n": 10**30}, "n"),
        ({"user": {"id": 1}}, "user"),
    ],
)
def test_bad_fields_are_named(body: dict[str, Any], field: str) -> None:
    assert bad_field(body) == field


def test_chat_messages_render_to_one_prompt() -> None:
    text = oai.render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ]
    )
    assert text == "system: Be brief.\nuser: Hi\nassistant:"


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
    ],
)
def test_bad_chat_messages_are_named(messages: object, field: str) -> None:
    with pytest.raises(FieldError) as bad:
        oai.render_chat(messages)
    assert bad.value.field == field


def test_replica_field_names_map_back_to_body_names() -> None:
    assert oai.body_field("sampling.max_tokens", "prompt") == "max_tokens"
    assert oai.body_field("prompt.text", "messages") == "messages"
    assert oai.body_field("slo.class_name", "prompt") == "slo_class"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"slo": {"ttft_ms": Infinity}}', "slo.ttft_ms"),
        ('{"a": [1, {"b": NaN}]}', "a[1].b"),
        ('{"top_p": -1e999}', "top_p"),
        ('{"prompt": "\\udfff"}', "prompt"),
        ('{"\\ud800": 1}', "body"),
        ("[" * 5000 + "]" * 5000, "body"),
        ('{"max_tokens": ' + "1" * 5000 + "}", "body"),
        ("{", "body"),
    ],
)
def test_parse_json_refuses_what_no_request_can_carry(text: str, field: str) -> None:
    with pytest.raises(FieldError) as bad:
        oai.parse_json(text)
    assert bad.value.field == field


def test_parse_json_keeps_valid_escapes_and_numbers() -> None:
    body = oai.parse_json('{"prompt": "\\ud83d\\ude00 \\u00e9", "temperature": 1e-3}')
    assert body == {"prompt": "\U0001f600 \u00e9", "temperature": 0.001}
