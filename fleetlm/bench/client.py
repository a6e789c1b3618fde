"""Streaming client for an OpenAI-compatible server (`/v1/completions`, `/v1/chat/completions`).

One call sends one request with `stream: true` and `stream_options.include_usage`, and fills a
`RequestRecord` with raw observations only: the send time, the arrival time and token count of
every chunk that carries output, the text, the server's `usage`, or the error. Metrics are
computed later from these records (`fleetlm.bench.metrics`), so nothing slow runs while the
stream is being timed.

Tokens per chunk: with `is_continuous_usage` the client asks for `continuous_usage_stats` (a vLLM
extension) and a chunk's token count is the growth of `usage.completion_tokens`; without it every
chunk with non-empty text counts as one token (vLLM bench's assumption). Chunks without output
(the chat role header, the final usage-only chunk) are not token arrivals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from fleetlm.bench.workloads import Turn

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_BANNED_LOGIT_BIAS = -100  # OpenAI's minimum bias: the token is never sampled
_MAX_ERROR_CHARS = 300
# fleetlm's server names the engine replica that served a request in this header
# (`fleetlm.cluster.ingress.REPLICA_HEADER`); other servers send none. The client stays
# independent of the server's package: it benchmarks any OpenAI-compatible server.
REPLICA_HEADER = "x-fleetlm-replica"
_COMPLETION_SEPARATOR = "\n"  # between messages when a conversation is flattened to a prompt

Message = dict[str, str]


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to send requests; the same for every request of a run."""

    base_url: str
    model: str
    endpoint: str = "completions"  # completions | chat
    api_key: str | None = None
    temperature: float = 0.0
    banned_token_ids: tuple[int, ...] = ()  # logit_bias -100 on these (EOS ids) with ignore_eos
    is_continuous_usage: bool = False  # ask for usage in every chunk (vLLM extension)
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 600.0
    # Close each connection after its request: for servers that drop reused keep-alive
    # connections (llama-server under concurrent streams).
    is_new_connection_per_request: bool = False

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(
                f"endpoint must be one of {tuple(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINT_PATHS[self.endpoint]


@dataclass
class RequestRecord:
    """Raw observations of one request; times are `time.perf_counter()` seconds."""

    conv_id: str
    turn_index: int
    max_tokens: int
    num_expected_prompt_tokens: int  # as the workload counted it (tokenizer or words)
    send_time: float = 0.0
    end_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks with output
    chunk_num_tokens: list[int] = field(default_factory=list)  # tokens carried by each of them
    text: str = ""
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    num_tokenizer_tokens: int | None = None  # the tokenizer's count of `text`, set after the run
    replica: str | None = None  # the engine replica that served it, if the server says
    error: str | None = None

    @property
    def is_success(self) -> bool:
        return self.error is None


def build_payload(config: EndpointConfig, messages: Sequence[Message], turn: Turn) -> dict:
    """The JSON body for one request: chat messages, or their contents joined as a prompt."""
    stream_options: dict[str, bool] = {"include_usage": True}
    if config.is_continuous_usage:
        stream_options["continuous_usage_stats"] = True
    payload: dict[str, Any] = {
        "model": config.model,
        "max_tokens": turn.max_tokens,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": stream_options,
    }
    if config.endpoint == "chat":
        payload["messages"] = list(messages)
    else:
        payload["prompt"] = _COMPLETION_SEPARATOR.join(m["content"] for m in messages)
    if turn.is_ignore_eos:
        payload["ignore_eos"] = True
        if config.banned_token_ids:
            payload["logit_bias"] = {str(i): _BANNED_LOGIT_BIAS for i in config.banned_token_ids}
    payload.update(config.extra_body)
    return payload


def make_session(config: EndpointConfig) -> aiohttp.ClientSession:
    """A session without a connection cap: the runner's semaphore is the only limit."""
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=config.is_new_connection_per_request)
    return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)


async def fetch_model_name(config: EndpointConfig) -> str:
    """The first model the server lists at `/v1/models` (used when `--model` is not given)."""
    url = config.base_url.rstrip("/") + "/v1/models"
    async with make_session(config) as session, session.get(url) as response:
        if response.status != 200:
            raise ValueError(f"GET /v1/models answered HTTP {response.status}: pass --model")
        models = (await response.json()).get("data") or []
    if not models:
        raise ValueError("the server lists no models at /v1/models: pass --model")
    return models[0]["id"]


async def send_request(
    session: aiohttp.ClientSession, config: EndpointConfig, payload: dict, record: RequestRecord
) -> RequestRecord:
    """Stream one request into `record`; failures are recorded in `record.error`, never raised."""
    text_parts: list[str] = []
    record.send_time = time.perf_counter()
    try:
        async with session.post(config.url, json=payload) as response:
            record.replica = response.headers.get(REPLICA_HEADER)
            if response.status != 200:
                body = await response.text()
                record.error = f"HTTP {response.status}: {body[:_MAX_ERROR_CHARS]}"
            else:
                await _read_stream(response, record, text_parts, config.endpoint)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
    record.end_time = time.perf_counter()
    record.text = "".join(text_parts)
    if record.error is None and not record.chunk_times:
        record.error = "the stream carried no output tokens"
    return record


async def _read_stream(response, record: RequestRecord, text_parts: list[str], endpoint: str):
    # Read to the end of the body, past `[DONE]`, so the connection can be reused (as vLLM bench).
    async for raw_line in response.content:
        arrival = time.perf_counter()
        line = raw_line.strip()
        if not line.startswith(b"data:") or record.error is not None:
            continue
        data = line[len(b"data:"):].strip()
        if data != b"[DONE]":
            _on_chunk(json.loads(data), arrival, record, text_parts, endpoint)


def _on_chunk(chunk: dict, arrival: float, record: RequestRecord, text_parts, endpoint) -> None:
    if "error" in chunk:
        record.error = f"server error: {chunk['error']}"[:_MAX_ERROR_CHARS]
        return
    choices = chunk.get("choices") or []
    text = _choice_text(choices[0], endpoint) if choices else ""
    usage = chunk.get("usage")
    num_tokens = 0
    if choices and text and usage is not None:
        # Usage in a text chunk: its growth over the tokens counted so far is this chunk's
        # share (several tokens per message with continuous usage; also right when usage
        # first appears on the last text chunk after chunks without it).
        num_tokens = usage.get("completion_tokens", 0) - sum(record.chunk_num_tokens)
    elif choices and text:
        num_tokens = 1
    # A text-less chunk carrying the final usage (llama-server's last chunk) adds no tokens.
    if usage is not None:
        record.usage_prompt_tokens = usage.get("prompt_tokens")
        record.usage_completion_tokens = usage.get("completion_tokens")
    if text:
        text_parts.append(text)
    if num_tokens > 0:
        record.chunk_times.append(arrival)
        record.chunk_num_tokens.append(num_tokens)


def _choice_text(choice: dict, endpoint: str) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""
