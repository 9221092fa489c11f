"""OpenAI tools in the Hermes `<tool_call>` convention: validation, prompt rendering, parsing, streaming."""

from __future__ import annotations

import json

import pytest

from redknot_rag.sampling import InvalidRequestError
from redknot_rag.server.tools import ToolStream, chat_ids, parse_tool_calls, plan_tools, render_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_parse_hermes_calls_and_content():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
           '<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>'  # fmt: skip
    content, calls = parse_tool_calls(text, {"get_weather", "get_time"})
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    # unterminated last block (the model stopped at EOS right after the JSON) still counts
    _, calls = parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {}}', {"get_time"})
    assert [c.name for c in calls] == ["get_time"]
    # unknown function or broken JSON: left as content, no call
    for bad in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "<tool_call>{nope</tool_call>"):
        content, calls = parse_tool_calls(bad, {"get_time"})
        assert calls == [] and content == bad
    assert parse_tool_calls("plain answer", {"get_time"}) == ("plain answer", [])


def test_plan_validation_and_constraints():
    assert plan_tools(None, None, None).mode == "none"
    assert plan_tools([WEATHER], None, None).mode == "auto"
    req = plan_tools([WEATHER, TIME], "required", False)
    schema = json.loads(req.json_schema() or "")
    assert schema["minItems"] == 1 and schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert json.loads(named.json_schema() or "") == WEATHER["function"]["parameters"]
    content, calls = named.read_output('{"city": "Bergen"}')
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Bergen"}
    content, calls = req.read_output('[{"name": "get_time", "parameters": {}}]')
    assert content is None and [c.name for c in calls] == ["get_time"]
    for tools, choice, needle in [
        ([{"type": "function"}], None, "tools[0]"),
        ([{"type": "function", "function": {"name": "bad name!"}}], None, "name must match"),
        ([WEATHER, WEATHER], None, "duplicate"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not in tools"),
        ([WEATHER], "sometimes", "tool_choice must be"),
        (None, "required", "non-empty tools"),
    ]:
        with pytest.raises(InvalidRequestError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            plan_tools(tools, choice, None)


def test_render_lists_tools_and_history():
    plan = plan_tools([WEATHER], "auto", None)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "4 C, rain"},
    ]  # fmt: skip
    out = render_messages(msgs, plan, native=False)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    }
    assert out[3] == {"role": "user", "content": "<tool_response>\n4 C, rain\n</tool_response>"}  # fmt: skip
    assert render_messages(msgs[:2], plan_tools([WEATHER], "none", None), native=False) == msgs[:2]


def test_prompt_of_default_model_carries_the_listing(engine):
    plan = plan_tools([WEATHER], "auto", None)
    ids = chat_ids(engine.tokenizer, [{"role": "user", "content": "Weather in Oslo?"}], plan)
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n# Tools") and "<tools>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_stream_holds_back_calls():
    ts = ToolStream(plan_tools([WEATHER], "auto", None))
    full = 'Checking <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    sent = "".join(ts.delta(full[:k]) for k in range(1, len(full) + 1))
    assert sent == "Checking "  # nothing of the call leaks into content, not even a partial "<tool_"
    rest, calls = ts.finish(full)
    assert rest == "" and [c.name for c in calls] == ["get_weather"]
    plain = ToolStream(plan_tools([WEATHER], "auto", None))
    text = "No tools needed <tool"  # a partial marker that never became a call is sent at the end
    sent = "".join(plain.delta(text[:k]) for k in range(1, len(text) + 1))
    rest, calls = plain.finish(text)
    assert sent + rest == text and calls == []
