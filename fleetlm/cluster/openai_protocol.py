"""OpenAI request and response bodies (the subset fleetlm serves), as pydantic models.

Requests validate every field and turn into one `SamplingParams` per generated sequence; a bad
value raises `ValueError`, which the ingress answers with a 400. Fields are never silently
dropped: an unknown field is a 400 ("Unrecognized request argument supplied", as OpenAI
answers), a known one fleetlm does not implement is a 400 saying so (`_UNSUPPORTED`), and only
fields that cannot change the output are accepted and ignored (`user`, `metadata`, `store`,
`service_tier`). Messages keep ignoring unknown keys: clients send back the assistant
messages they received, with fields such as `refusal`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetlm.executor.sampling_params import SamplingParams, StructuredOutputsParams

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions API
MAX_N = 128  # OpenAI's limit for n; beyond it one request could hold a replica for minutes


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Known fields fleetlm does not implement: a 400 naming them (and why), not a silent drop.
_UNSUPPORTED = {
    "logit_bias": "logit_bias is not supported",
    "functions": "functions (deprecated by OpenAI) is not supported; use tools",
    "function_call": "function_call (deprecated by OpenAI) is not supported; use tool_choice",
    "audio": "audio output is not supported",
    "prediction": "prediction (predicted outputs) is not supported",
    "web_search_options": "web search is not supported",
    "best_of": "best_of is not supported; use n",
    "guided_decoding_backend": "guided_decoding_backend is not supported: fleetlm's grammar "
                               "engine is xgrammar",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported",
}
# Harmless values of unsupported fields (what clients send by default).
_NEUTRAL = {"best_of": (1,), "modalities": (["text"],)}


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage in every chunk


class SamplingFields(_Request):
    """Fields shared by chat and completions, named as in OpenAI's and vLLM's APIs."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_*.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Accepted and ignored: they cannot change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in _UNSUPPORTED.items():
                value = data.get(name)
                if value not in (None, {}, []) and value not in _NEUTRAL.get(name, ()):
                    raise ValueError(why)
            if data.get("modalities") not in (None, ["text"]):
                raise ValueError("modalities other than ['text'] are not supported")
            data = {k: v for k, v in data.items() if k not in _UNSUPPORTED and k != "modalities"}
        return data

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def is_usage_continuous(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def _sampling_params(self, **extra: Any) -> SamplingParams:
        given = {
            name: getattr(self, name)
            for name in (
                "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
                "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
            )
        }
        given.update(extra)
        given["structured_outputs"] = self.constraint()
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})

    def constraint(self) -> StructuredOutputsParams | None:
        """The one output constraint the request asks for, however it is spelled."""
        given = {
            "response_format": self.response_format and self.response_format.constraint(),
            "structured_outputs": self.structured_outputs and self.structured_outputs.params(),
            "guided_json": self.guided_json is not None
            and StructuredOutputsParams(json=_schema_text(self.guided_json, "guided_json")),
            "guided_regex": self.guided_regex is not None
            and StructuredOutputsParams(regex=self.guided_regex),
            "guided_choice": self.guided_choice is not None
            and StructuredOutputsParams(choice=self.guided_choice),
            "guided_grammar": self.guided_grammar is not None
            and StructuredOutputsParams(grammar=self.guided_grammar),
        }
        asked = {name: c for name, c in given.items() if c}
        if len(asked) > 1:
            raise ValueError(f"only one output constraint may be given; got {sorted(asked)}")
        return next(iter(asked.values()), None)


def _schema_text(schema: str | dict[str, Any], name: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{name} must be a JSON schema object")  # noqa: TRY004 - a 400
    return json.dumps(schema)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the grammar always holds the output to the schema


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self

    def constraint(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            schema = self.json_schema.json_schema or {"type": "object"}
            return StructuredOutputsParams(json=_schema_text(schema, "response_format.schema"))
        return None


class StructuredOutputsField(BaseModel):
    """vLLM's `structured_outputs` request field: exactly one of these."""

    model_config = ConfigDict(extra="forbid")

    json_schema: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None

    def params(self) -> StructuredOutputsParams:
        schema = self.json_schema
        return StructuredOutputsParams(
            json=None if schema is None else _schema_text(schema, "structured_outputs.json"),
            regex=self.regex, choice=self.choice, grammar=self.grammar,
            json_object=bool(self.json_object), structural_tag=self.structural_tag)


class CalledFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"  # JSON text (OpenAI's); an object is accepted too


class MessageToolCall(BaseModel):
    """A call an assistant message made earlier in the conversation."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    def text(self) -> str:
        """The message's text; list content keeps only its text parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None  # calls forced by tool_choice always follow the schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        if self.forced_tools() and self.constraint() is not None:
            raise ValueError(f"tool_choice {self.tool_choice_name!r} forces a tool call, which "
                             "leaves no room for response_format or guided decoding")
        return self

    @property
    def tool_choice_name(self) -> str:
        choice = self.tool_choice or ("auto" if self.tools else "none")
        return choice if isinstance(choice, str) else choice.function.name

    @property
    def is_tool_use(self) -> bool:
        """The tools are shown to the model and its output is parsed for calls."""
        return bool(self.tools) and self.tool_choice_name != "none"

    def forced_tools(self) -> list[dict[str, Any]]:
        """The tools a call must be made to (tool_choice required or named); [] otherwise."""
        if not self.tools or self.tool_choice_name in ("none", "auto"):
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools
                if self.tool_choice_name == "required"
                or t.function.name == self.tool_choice_name]

    def tools_as_dicts(self) -> list[dict[str, Any]] | None:
        if not self.is_tool_use:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def to_sampling_params(self) -> SamplingParams:
        """`max_tokens` None means up to the model's context length."""
        return self._sampling_params(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )

    def messages_as_dicts(self) -> list[dict[str, Any]]:
        messages = []
        for m in self.messages:
            message: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
            messages.append(message)
        return messages


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(
            max_tokens=self.max_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo else None,
        )


# ---- responses -------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]  # role, content, and tool_calls when the model called tools
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """Both the whole answer and, with `stream`, each chunk (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fleetlm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
