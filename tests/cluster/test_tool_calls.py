"""Tool-call parsers and the chat formatter's tool-call deltas, on hand-written model output."""

from __future__ import annotations

import copy
import json

import pytest

from fleetlm.cluster.openai_format import ChatFormatter
from fleetlm.cluster.openai_protocol import ChatCompletionRequest
from fleetlm.cluster.tool_calls import (
    HermesToolParser,
    Llama3JsonToolParser,
    PartialCall,
    make_tool_parser,
)
from fleetlm.executor.outputs import CompletionOutput, RequestOutput

HERMES_TEXT = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
    "</tool_call>"
)
LLAMA_TEXT = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
              '"days": [1, 2]}}; {"name": "get_time", "parameters": {}}')
CALLS = [PartialCall("get_weather", '{"city": "Paris", "days": [1, 2]}', True),
         PartialCall("get_time", "{}", True)]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize(("parser", "text", "content"), [
    (HermesToolParser(), HERMES_TEXT, "Let me look.\n"),
    (Llama3JsonToolParser(), LLAMA_TEXT, ""),
])
def test_parsers_find_every_call_with_its_arguments_as_written(parser, text, content):
    parsed = parser.parse(text, is_final=True)
    assert parsed.content == content
    assert parsed.calls == CALLS
    # Their own rendering of the calls parses back to the same calls.
    openai_calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in CALLS]
    assert parser.parse(parser.render_calls(openai_calls), is_final=True).calls == CALLS


@pytest.mark.parametrize("parser", [HermesToolParser(), Llama3JsonToolParser()])
def test_plain_text_and_broken_calls_are_content(parser):
    assert parser.parse("Hello there.", is_final=True).calls == []
    assert parser.parse("Hello there.", is_final=True).content == "Hello there."
    broken = parser.parse('<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>'
                          if parser.name == "hermes" else '{"name": "f", "parameters": {',
                          is_final=True)
    assert broken.calls == []


def test_streaming_holds_back_what_may_begin_a_call():
    parser = HermesToolParser()
    assert parser.parse("Sure <tool_ca", is_final=False).content == "Sure "
    assert parser.parse("Sure <tool_ca", is_final=True).content == "Sure <tool_ca"
    assert Llama3JsonToolParser().parse("<|python", is_final=False).content == ""


def test_unknown_parser_is_named():
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        make_tool_parser("mistral")


def test_forcing_grammar_lists_each_tools_call_in_the_parsers_format():
    tag = HermesToolParser().structural_tag(TOOLS, is_parallel=False)["format"]
    assert tag["at_least_one"] and tag["stop_after_first"]
    [call] = tag["tags"]
    assert call["begin"] == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert call["content"]["json_schema"] == TOOLS[0]["function"]["parameters"]


def _output(text: str, is_finished: bool) -> RequestOutput:
    completion = CompletionOutput(0, text, list(range(len(text))),
                                  finish_reason="stop" if is_finished else None)
    return RequestOutput("r", None, [1, 2], [completion], finished=is_finished)


def _request() -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS)


@pytest.mark.parametrize(("parser", "text"), [(HermesToolParser(), HERMES_TEXT),
                                              (Llama3JsonToolParser(), LLAMA_TEXT)])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_deltas_add_up_to_the_whole_answer(parser, text, step):
    whole = ChatFormatter(_request(), "req", "m", None, parser).response({0: _output(text, True)})
    [choice] = whole.choices
    assert choice.finish_reason == "tool_calls"
    streamer = ChatFormatter(_request(), "req", "m", None, parser)
    content, calls, finish = "", {}, None
    for end in [*range(step, len(text), step), len(text)]:
        [chunk] = streamer.chunks({0: _output(text[:end], end == len(text))})
        delta = chunk.choices[0].delta
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"arguments": ""})
            entry.update({k: call[k] for k in ("id", "type") if k in call})
            entry["name"] = call["function"].get("name", entry.get("name"))
            entry["arguments"] += call["function"]["arguments"]
        finish = chunk.choices[0].finish_reason or finish
    assert content == (choice.message["content"] or "")
    assert [{"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(calls.items())] == choice.message["tool_calls"]
    assert finish == "tool_calls"
    assert json.loads(choice.message["tool_calls"][0]["function"]["arguments"])["city"] == "Paris"


# ---- the conversation the chat template sees -----------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
]
TOOL_TEMPLATE = (
    "{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %} CALL {{ c.function.arguments.city }}{% endfor %}\n"
    "{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    from fleetlm.executor.weights import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


def test_a_template_that_ignores_tools_gets_them_in_a_system_prompt(tokenizer):
    from fleetlm.cluster.server import _renders_tools, _tools_in_text

    assert not _renders_tools(tokenizer)  # SmolLM2's template has no tools
    messages = _tools_in_text(CONVERSATION, TOOLS, HermesToolParser())
    assert messages[0]["role"] == "system"
    assert '"name": "get_weather"' in messages[0]["content"]
    assert "<tool_call>" in messages[0]["content"]  # the format to answer in
    assert HermesToolParser().parse(messages[2]["content"], is_final=True).calls == [
        PartialCall("get_weather", '{"city": "Paris"}', True)]
    assert messages[3] == {"role": "tool", "content": "<tool_response>\nsunny\n</tool_response>"}


def test_a_template_that_renders_tools_gets_them_with_arguments_as_objects(tokenizer):
    from fleetlm.cluster.server import _renders_tools, _with_argument_objects

    aware = copy.copy(tokenizer)
    aware.chat_template = TOOL_TEMPLATE
    assert _renders_tools(aware)
    text = aware.apply_chat_template([_with_argument_objects(m) for m in CONVERSATION],
                                     tools=TOOLS, tokenize=False)
    assert text.startswith("TOOL get_weather\n") and "CALL Paris" in text
