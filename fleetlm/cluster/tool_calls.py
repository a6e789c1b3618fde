"""Tool calls in model output: parsers for the formats models are trained on, the grammar
that forces a call (`tool_choice` "required" or a named function), and the prompt that lists
the tools when a chat template does not render them.

A parser reads the whole text generated so far and returns the content outside the calls and
each call as far as it has come (`PartialCall`: its name once complete, its arguments' JSON
text so far). Every call's arguments are the exact text the model wrote, so streamed deltas
(differences between two parses, see `openai_format`) add up to the non-streamed answer.
Streaming holds back content that may begin a call (`<tool_call` arriving token by token).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass
class PartialCall:
    name: str | None = None  # None until the name's string is complete
    arguments: str = ""  # the arguments' JSON text so far
    is_complete: bool = False


@dataclass
class ParsedOutput:
    content: str
    calls: list[PartialCall] = field(default_factory=list)


class ToolParser(ABC):
    """One model family's tool-call format."""

    name: str
    # Keys under which a call object carries its arguments, in order of preference.
    arguments_keys = ("arguments", "parameters")

    @abstractmethod
    def parse(self, text: str, is_final: bool) -> ParsedOutput:
        """`text`: all output so far; `is_final`: no more will come (nothing is held back)."""

    @abstractmethod
    def call_tag(self, name: str) -> tuple[str, str]:
        """(begin, end) around one call's arguments object, for the forcing grammar."""

    separator: str

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        """Assistant tool calls (OpenAI's shape) as the model writes them."""
        written = []
        for call in calls:
            begin, end = self.call_tag(call["function"]["name"])
            written.append(begin + _arguments_text(call) + end)
        return self.separator.join(written)

    @abstractmethod
    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        """Instructions listing `tools` (OpenAI's shape), for templates that do not render them."""

    def structural_tag(self, tools: list[dict[str, Any]], is_parallel: bool) -> dict[str, Any]:
        """xgrammar structural tag: one or more calls (only one if not `is_parallel`) of
        `tools`, each call's arguments valid for its function's parameter schema."""
        tags = []
        for tool in tools:
            function = tool["function"]
            begin, end = self.call_tag(function["name"])
            schema = function.get("parameters") or {"type": "object"}
            tags.append({"type": "tag", "begin": begin, "end": end,
                         "content": {"type": "json_schema", "json_schema": schema}})
        return {"type": "structural_tag", "format": {
            "type": "tags_with_separator", "tags": tags, "separator": self.separator,
            "at_least_one": True, "stop_after_first": not is_parallel}}


class HermesToolParser(ToolParser):
    """Hermes / Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any
    number of them; the content is the text before the first call."""

    name = "hermes"
    begin, end = "<tool_call>", "</tool_call>"
    separator = "\n"

    def parse(self, text: str, is_final: bool) -> ParsedOutput:
        first = text.find(self.begin)
        if first < 0:
            content = text if is_final else _hold_back(text, self.begin)
            return ParsedOutput(content)
        calls = []
        position = first
        while position >= 0:
            body_start = position + len(self.begin)
            closing = text.find(self.end, body_start)
            body = text[body_start:] if closing < 0 else text[body_start:closing]
            call = parse_call_object(body, is_closed=closing >= 0 or is_final)
            if call is not None:
                calls.append(call)
            if closing < 0:
                break
            position = text.find(self.begin, closing + len(self.end))
        return ParsedOutput(text[:first], calls)

    def call_tag(self, name: str) -> tuple[str, str]:
        return f'{self.begin}\n{{"name": {json.dumps(name)}, "arguments": ', f"}}\n{self.end}"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listed = "\n".join(json.dumps(tool) for tool in tools)
        return (
            "You are a function calling AI model. You are provided with function signatures "
            "within <tools></tools> XML tags. You may call one or more functions to assist "
            "with the user query. Don't make assumptions about what values to plug into "
            f"functions. Here are the available tools: <tools>\n{listed}\n</tools>\n"
            "For each function call return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-dict>}\n</tool_call>')


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}`,
    optionally after `<|python_tag|>`, several separated by `; `. Output that does not start
    with `{` is content."""

    name = "llama3_json"
    python_tag = "<|python_tag|>"
    separator = "; "

    def parse(self, text: str, is_final: bool) -> ParsedOutput:
        body = text.lstrip()
        if body.startswith(self.python_tag):
            body = body[len(self.python_tag):].lstrip()
        if not body.startswith("{"):
            is_undecided = not body or self.python_tag.startswith(body)
            return ParsedOutput("" if is_undecided and not is_final else text)
        calls = []
        while body.startswith("{"):
            end = _object_end(body)
            call = parse_call_object(body if end is None else body[:end],
                                     is_closed=end is not None or is_final)
            if call is None:
                return ParsedOutput(text) if is_final else ParsedOutput("", calls)
            calls.append(call)
            if end is None:
                break
            body = body[end:].lstrip().removeprefix(";").lstrip()
        return ParsedOutput("", calls)

    def call_tag(self, name: str) -> tuple[str, str]:
        return f'{{"name": {json.dumps(name)}, "parameters": ', "}"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listed = "\n\n".join(json.dumps(tool) for tool in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call "
            "with its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of '
            "argument name and its value}. Do not use variables.\n\n" + listed)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser)
}
# The built-in SmolLM2's template renders no tools, so fleetlm lists them in Hermes style;
# Qwen2.5 / Qwen3 and Hermes models write this format too.
DEFAULT_TOOL_CALL_PARSER = "hermes"


def make_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}; got {name!r}")
    return TOOL_PARSERS[name]()


def parse_call_object(text: str, is_closed: bool) -> PartialCall | None:
    """A call object `{"name": ..., "arguments": {...}}` as far as `text` goes. With
    `is_closed`, nothing more will come: None unless it is a whole, valid call."""
    text = text.strip()
    if is_closed:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
    call = _scan_call(text)
    if is_closed and not any(key in value for key in ToolParser.arguments_keys):
        call.arguments, call.is_complete = "{}", True  # a call without arguments
    if is_closed and not call.is_complete:
        return None
    return call


def _scan_call(text: str) -> PartialCall:
    """Walk a (possibly cut) JSON object's keys, keeping the name and the arguments' raw text."""
    call = PartialCall()
    position = _skip_space(text, 1)
    while position < len(text):
        try:
            key, position = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError:
            return call
        position = _skip_space(text, position)
        if text[position:position + 1] != ":":
            return call
        value_start = _skip_space(text, position + 1)
        try:
            value, position = _DECODER.raw_decode(text, value_start)
            is_value_complete = True
        except json.JSONDecodeError:
            value, position, is_value_complete = None, len(text), False
        if key == "name" and is_value_complete and isinstance(value, str):
            call.name = value
        elif key in ToolParser.arguments_keys and not call.is_complete:
            raw = text[value_start:position]
            if is_value_complete and isinstance(value, str):  # arguments sent as a string
                raw = value
            elif not is_value_complete and raw.startswith('"'):
                raw = ""  # a string's JSON content is only known when it is complete
            call.arguments, call.is_complete = raw, is_value_complete
        if not is_value_complete:
            return call
        position = _skip_space(text, position)
        if text[position:position + 1] != ",":
            break
        position = _skip_space(text, position + 1)
    return call


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _object_end(text: str) -> int | None:
    """End of the JSON object starting text, or None if it is not complete yet."""
    try:
        _, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return None
    return end


def _hold_back(text: str, marker: str) -> str:
    """`text` less any end of it that could be the beginning of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return text[:-size]
    return text


def _arguments_text(call: dict[str, Any]) -> str:
    arguments = call["function"].get("arguments") or "{}"
    return arguments if isinstance(arguments, str) else json.dumps(arguments)
