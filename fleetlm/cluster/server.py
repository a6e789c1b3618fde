"""One engine replica behind Ray Serve: owns an engine, speaks OpenAI bodies.

`LLMServer` is a plain class (app.py wraps it with `serve.deployment`), so it also runs
in-process in tests. It takes an engine *factory*, as Ray Serve LLM does, so CPU tests can run
real Serve deployments around a fake engine.

Stream contract of `chat` / `completions` (what the ingress relays):
  first item: an `OpenAIError` (nothing was generated), or, without `stream`, the whole
              response as a dict, or, with `stream`, a `StreamChunk` (migration.py);
  later items (stream only): a `StreamChunk` of one or more SSE events and the progress of
              the choices in them; the last has `is_last` and its text ends with `[DONE]`.
              Or an `OpenAIError`, after which nothing follows: the request failed midway
              (code "engine_dead": the ingress moves it to another replica).
Given `resume`, a request goes on from where another replica left it. Given `routing` (the
ingress's `RoutingRequest`, which Serve's router read to pick this replica) with the prompts'
token ids, the replica does not tokenize them again; given its `kv_cursors`, a stream's first
chunk carries the engine's KV events after them (`StreamChunk.kv_events`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import jinja2

from fleetlm.cluster import errors
from fleetlm.cluster.config import PDSection
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.metrics import MetricsRecorder
from fleetlm.cluster.migration import DONE_EVENT, Resume, StreamChunk
from fleetlm.cluster.openai_format import ChatFormatter, ChoiceProgress, CompletionFormatter
from fleetlm.cluster.openai_protocol import ChatCompletionRequest, CompletionRequest, random_id
from fleetlm.cluster.pd import PrefillFailed, RemotePrefill
from fleetlm.cluster.request_timing import RequestTimer
from fleetlm.cluster.router import RoutingRequest
from fleetlm.cluster.streams import merge_streams
from fleetlm.cluster.tool_calls import DEFAULT_TOOL_CALL_PARSER, ToolParser, make_tool_parser
from fleetlm.executor.config import EngineConfig
from fleetlm.executor.input_processor import child_params, child_request_id
from fleetlm.executor.outputs import RequestOutput, coalesce
from fleetlm.executor.protocol import EngineClient, EngineStats
from fleetlm.executor.sampling_params import SamplingParams, StructuredOutputsParams
from fleetlm.executor.scheduler import SchedulerQueueFullError
from fleetlm.kvtransfer.params import DO_REMOTE_DECODE

logger = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig], EngineClient]
Formatter = ChatFormatter | CompletionFormatter


def default_engine_factory(config: EngineConfig) -> EngineClient:
    """fleetlm's own engine."""
    from fleetlm.executor.async_engine import AsyncEngine

    from_config = getattr(AsyncEngine, "from_config", None)
    return from_config(config) if from_config else AsyncEngine(config)


def sse(chunks: list) -> str:
    return "".join(f"data: {chunk.model_dump_json()}\n\n" for chunk in chunks)


class LLMServer:
    def __init__(
        self,
        engine_config: EngineConfig,
        served_model_name: str,
        engine_factory: EngineFactory | None = None,
        stream_interval_s: float = 0.0,
        max_stream_messages_per_s: float = 0.0,
        replica_id: str = "",
        tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER,
        prefill_server: Any = None,
        pd: PDSection | None = None,
    ) -> None:
        """`prefill_server` (a handle to a prefill pool's deployment) and `pd` make this a
        decode replica of a P/D deployment (pd.py); a prefill replica is a plain one whose
        engine is a KV producer, asked through `prefill`."""
        logger.info("Loading model %s", engine_config.model.model)
        self.engine = (engine_factory or default_engine_factory)(engine_config)
        self.model_name = served_model_name
        self.max_num_waiting = engine_config.scheduler.max_num_waiting
        self.stream_interval_s = stream_interval_s
        self.max_stream_messages_per_s = max_stream_messages_per_s
        self.num_streaming = 0  # streaming requests open on this replica
        self.metrics = MetricsRecorder(replica_id, self.engine.max_model_len)
        self.num_pending = 0  # engine requests sent that have not produced output yet
        self.tool_parser = make_tool_parser(tool_call_parser)
        self._is_template_tool_aware: bool | None = None  # found on the first tools request
        self.remote_prefill = RemotePrefill(prefill_server, pd) if prefill_server is not None else None
        transfer = engine_config.kv_transfer
        self.transfer_failure_policy = transfer.failure_policy if transfer else "recompute"

    # ---- OpenAI endpoints ----------------------------------------------------------------

    async def chat(
        self,
        request: ChatCompletionRequest,
        request_id: str | None = None,
        resume: Resume | None = None,
        routing: RoutingRequest | None = None,
    ) -> AsyncIterator[Any]:
        request_id = request_id or random_id("chatcmpl")
        tokenizer = self.engine.tokenizer
        try:
            token_ids = _token_ids_of(routing)
            prompt = token_ids[0] if token_ids else self._chat_prompt(request)
            params = _force_tool_calls(request.to_sampling_params(), request, self.tool_parser)
        except ValueError as e:
            yield errors.bad_request(str(e))
            return
        formatter = ChatFormatter(request, request_id, self.model_name, tokenizer,
                                  self.tool_parser if request.is_tool_use else None)
        async for item in self._generate(formatter, request_id, [prompt], params, request,
                                         resume, routing):  # fmt: skip
            yield item

    async def completions(
        self,
        request: CompletionRequest,
        request_id: str | None = None,
        resume: Resume | None = None,
        routing: RoutingRequest | None = None,
    ) -> AsyncIterator[Any]:
        request_id = request_id or random_id("cmpl")
        try:
            params = request.to_sampling_params()
        except ValueError as e:
            yield errors.bad_request(str(e))
            return
        formatter = CompletionFormatter(request, request_id, self.model_name, self.engine.tokenizer)
        prompts = _token_ids_of(routing) or request.prompts()
        async for item in self._generate(formatter, request_id, prompts, params, request, resume,
                                         routing):  # fmt: skip
            yield item

    async def prefill(self, prompt_token_ids: list[int], request_id: str,
                      routing: RoutingRequest | None = None) -> dict:
        """A prefill replica's part of a P/D request: compute the prompt's KV, keep it for a
        decode replica to read, and answer its transfer params (an exception if there are
        none: the decode side then applies its failure policy)."""
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        final = None
        async for output in self.engine.generate(prompt_token_ids, params, request_id,
                                                 kv_transfer_params={DO_REMOTE_DECODE: True}):
            final = output
        if final is None or not final.kv_transfer_params:
            raise RuntimeError(f"the prefill of {request_id} left no KV to transfer")
        return final.kv_transfer_params

    # ---- state for the ingress, the router and Ray Serve ---------------------------------

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # What the ingress may ask one replica in particular (`ask`).
    QUESTIONS = ("metrics_snapshot", "is_healthy", "kv_events_since", "max_model_len", "stats")

    def ask(self, question: str, *args, routing: RoutingRequest | None = None) -> Any:
        """Answer one of QUESTIONS; `routing.target` took the question to this replica."""
        if question not in self.QUESTIONS:
            raise ValueError(f"unknown question {question!r}")
        return getattr(self, question)(*args)

    def record_routing_stats(self) -> dict[str, float]:
        """Ray Serve's hook: the load the request router weighs and the KV cache's size
        (serve_router.py)."""
        stats = self.engine.stats()
        return {"num_running": stats.num_running, "num_waiting": stats.num_waiting,
                "kv_cache_usage": stats.kv_cache_usage, "num_kv_blocks": stats.num_kv_blocks}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook: what the autoscaling policy reads (autoscaling.py)."""
        return self.record_routing_stats()

    def metrics_snapshot(self) -> dict[str, Any]:
        """This replica's part of /metrics (see `fleetlm.cluster.metrics.render_metrics`)."""
        snapshot = self.metrics.snapshot(self.engine.stats(), self.model_name)
        if self.remote_prefill is not None:
            snapshot["pd"] = self.remote_prefill.snapshot()
        return snapshot

    def is_healthy(self) -> bool:
        return self.engine.is_healthy

    def kv_events_since(self, engine_id: str | None, seq: int) -> dict:
        """The engine's prefix-cache changes for the ingress's KV index (`engine.
        enable_kv_events`; see `fleetlm.executor.kv_events`)."""
        return self.engine.kv_events_since(engine_id, seq)

    def check_health(self) -> None:
        """Ray Serve's health hook: a dead engine makes Serve replace this replica."""
        if not self.engine.is_healthy:
            raise RuntimeError("the engine loop has died")

    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def shutdown(self) -> None:
        engine = getattr(self, "engine", None)  # None: the engine failed to start
        if engine is None:
            return
        result = engine.shutdown()
        if inspect.isawaitable(result):
            await result

    # ---- internals -----------------------------------------------------------------------

    def _chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        messages, tools = request.messages_as_dicts(), request.tools_as_dicts()
        if tools is not None or any("tool_calls" in m for m in messages):
            messages, tools = self._tool_conversation(messages, tools)
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                **({"tools": tools} if tools else {}),
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"messages do not fit the model's chat template: {e}") from None
        # The template already holds the special tokens (BOS and the like).
        return tokenizer.encode(text, add_special_tokens=False)

    def _tool_conversation(self, messages: list[dict], tools: list[dict] | None):
        """(messages, tools) for the chat template. A template that renders tools gets them
        (and earlier calls' arguments as objects, as HF templates expect); one that does not
        (the built-in SmolLM2's) gets a system prompt listing them in the parser's format,
        and earlier calls and tool answers written out as text."""
        if self._is_template_tool_aware is None:
            self._is_template_tool_aware = _renders_tools(self.engine.tokenizer)
        if self._is_template_tool_aware:
            return [_with_argument_objects(m) for m in messages], tools
        return _tools_in_text(messages, tools, self.tool_parser), None

    def _admission_error(self, num_new: int) -> OpenAIError | None:
        """429 if `num_new` more requests would take the waiting queue over its limit.

        The engine's own count lags (its thread adds requests later), so requests sent but
        without output yet count too: an upper bound that closes the race between requests
        arriving together.
        """
        if self.max_num_waiting is None:
            return None
        num_waiting = max(self.engine.stats().num_waiting, self.num_pending)
        if num_waiting + num_new > self.max_num_waiting:
            return errors.queue_full(num_waiting, self.max_num_waiting)
        return None

    async def _generate(
        self,
        formatter: Formatter,
        request_id: str,
        prompts: list[str | list[int]],
        params: SamplingParams,
        request: ChatCompletionRequest | CompletionRequest,
        resume: Resume | None,
        routing: RoutingRequest | None = None,
    ) -> AsyncIterator[Any]:
        if not self.engine.is_healthy:
            yield errors.engine_dead()
            return
        progress = resume.progress if resume is not None else {}
        formatter.resume(progress)
        choices = [i for i in range(len(prompts) * params.n)
                   if i not in progress or not progress[i].is_finished]  # fmt: skip
        rejection = self._admission_error(len(choices))
        if rejection is not None:
            yield rejection
            return
        engine_ids = _engine_request_ids(request_id, choices, resume)
        params = dataclasses.replace(params, output_kind="delta")  # no per-step whole copies
        self.num_pending += len(choices)
        pending = set(choices)
        latest: dict[int, RequestOutput] = {}  # each choice's deltas so far, concatenated
        timer = RequestTimer(self.metrics, {i: _num_resumed(progress, i) for i in choices})
        merged = merge_streams(
            [
                self._stream(prompts[i // params.n], child_params(params, i % params.n),
                             engine_ids[i], progress.get(i))
                for i in choices
            ],
            self.current_stream_interval_s,
        )
        self.num_streaming += request.stream
        kv_cursors = routing.kv_cursors if routing is not None else ()
        try:
            async for by_stream in merged:
                snapshot = {choices[k]: output for k, output in by_stream.items()}
                # A first delta becomes the start of `latest`; it grows only in a later
                # turn, after the formatter has read it.
                for index, output in snapshot.items():
                    latest[index] = coalesce(latest.get(index), output)
                timer.on_snapshot({index: latest[index] for index in snapshot})
                self._release(pending, snapshot)
                if request.stream:
                    text = sse(self._chunks(formatter, snapshot, latest, request))
                    chunk = StreamChunk(text, formatter.take_progress(snapshot))
                    if kv_cursors:  # the first chunk: the prompt's blocks are cached now
                        chunk.kv_events = self._unseen_kv_events(kv_cursors)
                        kv_cursors = ()
                    yield chunk
            yield self._final(formatter, latest, request)
        except Exception as e:  # noqa: BLE001 - this client hears of it, others go on
            yield _as_openai_error(e, request_id, self.engine.is_healthy)
        finally:
            self.num_streaming -= request.stream
            await merged.aclose()
            self._release(pending, pending.copy())
            await self._abort_unfinished(engine_ids, latest)
            timer.on_end(latest)

    def _unseen_kv_events(self, cursors: tuple[tuple[str, int], ...]) -> dict | None:
        """The engine's KV event batches the router (whose cursors these are) has not
        seen; None where it must ask for them or the engine keeps no events."""
        unseen = getattr(self.engine, "kv_events_unseen", None)  # another engine: none
        return unseen(dict(cursors)) if unseen is not None else None

    def current_stream_interval_s(self) -> float:
        """Least time between two messages of one stream now: stream_interval_s, or longer
        while the open streams together would send more than max_stream_messages_per_s (each
        message costs CPU in the replica, the ingress and the proxy: measured in
        docs/benchmarks.md)."""
        if self.max_stream_messages_per_s <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, self.num_streaming / self.max_stream_messages_per_s)

    def _release(self, pending: set[int], indices) -> None:
        """Choices that produced output (or ended) no longer count as pending."""
        for index in list(indices):
            if index in pending:
                pending.discard(index)
                self.num_pending -= 1

    async def _stream(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        progress: ChoiceProgress | None,
    ) -> AsyncIterator[RequestOutput]:
        """The engine's stream, started lazily so eager validation errors surface in it too;
        a resumed choice goes on after the tokens its client has."""
        extra: dict[str, Any] = {}
        if progress is not None and progress.token_ids:
            extra = {"resume_token_ids": list(progress.token_ids)}
            params = dataclasses.replace(params, prompt_logprobs=None)  # already sent
        elif self.remote_prefill is not None and params.prompt_logprobs is None:
            transfer_params = await self._prefill_elsewhere(prompt, request_id)
            if transfer_params is not None:
                extra = {"kv_transfer_params": transfer_params}
        async for output in self.engine.generate(prompt, params, request_id, **extra):
            completion = output.outputs[0]
            if completion.finish_reason == "error":  # its KV could not be read (policy "fail")
                raise KVTransferFailed(str(completion.stop_reason or "the load failed"))
            yield output

    async def _prefill_elsewhere(self, prompt: str | list[int], request_id: str) -> dict | None:
        """A decode replica: the transfer params of the prompt computed by a prefill replica,
        or None to compute it here (short or cached prompt, or a failed prefill under the
        recompute policy)."""
        token_ids = self.engine.tokenize(prompt)
        if len(token_ids) >= self.engine.max_model_len or not self.remote_prefill.is_worth_it(
                len(token_ids), self.engine.num_cached_prefix_tokens(token_ids)):
            return None  # a prompt too long is refused by the local engine, with a 400
        try:
            return await self.remote_prefill.prefill(token_ids, f"{request_id}-prefill")
        except PrefillFailed as e:
            if self.transfer_failure_policy == "fail":
                raise KVTransferFailed(str(e)) from None
            return None

    @staticmethod
    def _chunks(
        formatter: Formatter,
        snapshot: dict[int, RequestOutput],
        latest: dict[int, RequestOutput],
        request: ChatCompletionRequest | CompletionRequest,
    ) -> list:
        chunks = formatter.chunks(snapshot)
        if request.is_usage_continuous:
            usage = formatter.usage(latest)
            for chunk in chunks:
                chunk.usage = usage
        return chunks

    def _final(
        self,
        formatter: Formatter,
        outputs: dict[int, RequestOutput],
        request: ChatCompletionRequest | CompletionRequest,
    ) -> Any:
        if not request.stream:
            return formatter.response(outputs).model_dump()
        usage = sse([formatter.usage_chunk(outputs)]) if request.include_usage else ""
        return StreamChunk(usage + DONE_EVENT, is_last=True)

    async def _abort_unfinished(self, engine_ids: dict[int, str],
                                latest: dict[int, RequestOutput]) -> None:
        for index, rid in engine_ids.items():
            if index not in latest or not latest[index].finished:
                await self.engine.abort(rid)


_PROBE_TOOL = {"type": "function", "function": {"name": "fleetlm_probe_tool_7f3a",
                                                "parameters": {"type": "object"}}}


def _renders_tools(tokenizer) -> bool:
    """Whether the chat template shows the model the tools it is given."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                             tools=[_PROBE_TOOL], tokenize=False)
    except jinja2.TemplateError:
        return False
    return _PROBE_TOOL["function"]["name"] in text


def _with_argument_objects(message: dict) -> dict:
    if "tool_calls" not in message:
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function", {}))
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                raise ValueError("tool_calls arguments must be JSON text") from None
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def _tools_in_text(messages: list[dict], tools: list[dict] | None,
                   parser: ToolParser) -> list[dict]:
    """The conversation for a template that renders neither tools nor calls."""
    result = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            written = parser.render_calls(calls)
            message["content"] = f"{message['content']}\n{written}" if message["content"] \
                else written
        if message["role"] == "tool":
            message.pop("tool_call_id", None)
            message["content"] = f"<tool_response>\n{message['content']}\n</tool_response>"
        result.append(message)
    if tools:
        prompt = parser.system_prompt(tools)
        if result and result[0]["role"] == "system":
            result[0] = {**result[0], "content": f"{result[0]['content']}\n\n{prompt}"}
        else:
            result.insert(0, {"role": "system", "content": prompt})
    return result


def _force_tool_calls(params: SamplingParams, request: ChatCompletionRequest,
                      parser: ToolParser) -> SamplingParams:
    """tool_choice "required" or a named function: the grammar makes the model write calls
    in the parser's format, each call's arguments valid for its function's schema ("required"
    with parallel_tool_calls: one or more calls; otherwise exactly one)."""
    forced = request.forced_tools()
    if not forced:
        return params
    is_parallel = request.parallel_tool_calls and request.tool_choice_name == "required"
    tag = parser.structural_tag(forced, is_parallel)  # a named function: called once
    return dataclasses.replace(
        params, structured_outputs=StructuredOutputsParams(structural_tag=json.dumps(tag)))


def _engine_request_ids(request_id: str, choices: list[int],
                        resume: Resume | None) -> dict[int, str]:
    """One engine request per choice, named as the engine names the children of an n > 1
    request (`child_request_id`); a resumed one gets new ids, in case the replica that ran it
    before is this one and has not forgotten them yet."""
    suffix = "" if resume is None else f"-m{resume.num_migrations}"
    return {i: child_request_id(request_id, i) + suffix for i in choices}


def _token_ids_of(routing: RoutingRequest | None) -> list[list[int]] | None:
    """The prompts' token ids the ingress sent, if it did."""
    if routing is None or routing.prompt_token_ids is None:
        return None
    return [list(ids) for ids in routing.prompt_token_ids]


def _num_resumed(progress: dict[int, ChoiceProgress], index: int) -> int:
    return progress[index].num_tokens if index in progress else 0


class KVTransferFailed(Exception):
    """A decode replica could not get a prompt's KV and its failure policy is "fail"."""


def _as_openai_error(error: Exception, request_id: str, is_healthy: bool) -> OpenAIError:
    if isinstance(error, KVTransferFailed):
        logger.warning("request %s failed: %s", request_id, error)
        return errors.kv_transfer_failed(str(error))
    if isinstance(error, ValueError):
        return errors.bad_request(str(error))
    if isinstance(error, SchedulerQueueFullError):
        return errors.queue_full_message(str(error))
    if not is_healthy:
        logger.warning("request %s failed: the engine died (%s)", request_id, error)
        return errors.engine_dead()
    logger.error("request %s failed", request_id, exc_info=error)
    return errors.internal_error(error)
