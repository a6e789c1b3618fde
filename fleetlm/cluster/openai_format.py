"""Engine outputs -> OpenAI chat and completion bodies, whole or as stream chunks.

A formatter serves one HTTP request whose choices are separate engine requests (one per
prompt and `n`), indexed `prompt_index * n + j`. It remembers how much of each choice it
has sent (`ChoiceProgress`), so `chunks()` emits only the rest of what it is given: a later
cumulative output, or a delta continuing the outputs it was given before (the served path;
a resumed choice's first delta begins with the tokens the client already has, which are
skipped). That record also lets another replica take a stream over: the ingress collects
it (`take_progress`) and hands it to the next formatter (`resume`).

With tools, a chat choice's text goes through the tool parser: the message carries the content
outside the calls and `tool_calls`; a stream sends each call's id and name once, then its
arguments as they grow. What was sent is a function of the text sent (`num_chars`): the
parse of that prefix, so a resumed stream goes on without a second record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from fleetlm.cluster.openai_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from fleetlm.cluster.tool_calls import ParsedOutput, PartialCall, ToolParser
from fleetlm.executor.outputs import PositionLogprobs, RequestOutput


@dataclass
class ChoiceProgress:
    """How much of one choice the client has received: what another replica needs to go on
    with it exactly (the tokens, for the engine; the rest, for its formatter)."""

    token_ids: list[int] = field(default_factory=list)  # completion tokens sent
    num_chars: int = 0  # of the completion's text sent
    text_offset: int = 0  # completions' logprobs: where the next token's text starts
    num_prompt_tokens: int = 0
    is_started: bool = False  # the first chunk (chat: the role) went out
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, update: ChoiceProgress) -> None:
        """Fold in a later update whose `token_ids` are only the tokens sent since."""
        self.token_ids.extend(update.token_ids)
        self.num_chars, self.text_offset = update.num_chars, update.text_offset
        self.num_prompt_tokens, self.is_started = update.num_prompt_tokens, update.is_started
        self.finish_reason, self.stop_reason = update.finish_reason, update.stop_reason


class _Formatter:
    def __init__(self, request_id: str, model: str, tokenizer, num_choices: int, n: int) -> None:
        self.request_id = request_id
        self.model = model
        self.tokenizer = tokenizer
        self.n = n
        self._sent = [ChoiceProgress() for _ in range(num_choices)]
        self._num_reported = [0] * num_choices  # tokens of each choice `take_progress` gave
        # (tokens, chars) of each choice's cumulative output that deltas brought so far.
        self._num_received = [(0, 0)] * num_choices
        self._text: dict[int, str] = {}  # each tool-parsed choice's whole text so far
        self._token_text: dict[int, str] = {}

    def resume(self, progress: dict[int, ChoiceProgress]) -> None:
        """Go on from what another replica sent; its finished choices still count in usage."""
        for index, choice in progress.items():
            self._sent[index] = replace(choice, token_ids=list(choice.token_ids))
            self._num_reported[index] = choice.num_tokens

    def take_progress(self, indices) -> dict[int, ChoiceProgress]:
        """The progress of choices `indices` since the last call: their tokens sent since,
        and where they now stand (for `ChoiceProgress.merge`)."""
        updates = {}
        for index in indices:
            sent = self._sent[index]
            updates[index] = replace(sent, token_ids=sent.token_ids[self._num_reported[index]:])
            self._num_reported[index] = sent.num_tokens
        return updates

    def usage(self, outputs: dict[int, RequestOutput]) -> UsageInfo:
        """Prompt tokens count once per prompt, not once per choice; a choice without output
        here counts what another replica sent of it (none, unless this one resumed it)."""
        num_prompt: dict[int, int] = {}
        num_completion = 0
        for index, sent in enumerate(self._sent):
            if index not in outputs and sent.num_prompt_tokens:
                num_prompt[index // self.n] = sent.num_prompt_tokens
                num_completion += sent.num_tokens
        for index, output in outputs.items():
            num_prompt[index // self.n] = len(output.prompt_token_ids)
            num_completion += len(output.outputs[0].token_ids)
        prompt = sum(num_prompt.values())
        return UsageInfo(prompt_tokens=prompt, completion_tokens=num_completion,
                         total_tokens=prompt + num_completion)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _new_text(self, index: int, output: RequestOutput) -> tuple[str, list[PositionLogprobs]]:
        """The text and logprob positions of choice `index` not yet sent; marks them sent.

        `output` covers the cumulative output from its start, or, a delta, from where the
        previous ones ended. A resumed engine request's logprobs cover only the tokens it
        generated itself, so the new positions are the last ones."""
        sent = self._sent[index]
        completion = output.outputs[0]
        num_tokens, num_chars = self._num_received[index] if output.is_delta else (0, 0)
        self._num_received[index] = (num_tokens + len(completion.token_ids),
                                     num_chars + len(completion.text))
        text = completion.text[max(0, sent.num_chars - num_chars):]
        new_token_ids = completion.token_ids[max(0, sent.num_tokens - num_tokens):]
        logprobs = completion.logprobs or []
        new_logprobs = logprobs[max(0, len(logprobs) - len(new_token_ids)):] if new_token_ids \
            else []
        sent.num_chars = max(sent.num_chars, num_chars + len(completion.text))
        sent.token_ids.extend(new_token_ids)
        sent.num_prompt_tokens = len(output.prompt_token_ids)
        sent.finish_reason, sent.stop_reason = completion.finish_reason, completion.stop_reason
        return text, new_logprobs

    def _whole_text(self, index: int, output: RequestOutput) -> str:
        """Choice `index`'s text up to the end of `output` (the tool parser reads it all);
        call once per output, before `_new_text`."""
        text = output.outputs[0].text
        if output.is_delta:
            text = self._text[index] = self._text.get(index, "") + text
        return text


class ChatFormatter(_Formatter):
    def __init__(self, request: ChatCompletionRequest, request_id: str, model: str, tokenizer,
                 tool_parser: ToolParser | None = None):
        super().__init__(request_id, model, tokenizer, request.n, request.n)
        self.request = request
        self.tool_parser = tool_parser  # None: the text is all content
        self._parsed: dict[int, ParsedOutput] = {}  # each choice's parse of the text sent

    def response(self, outputs: dict[int, RequestOutput]) -> ChatCompletionResponse:
        choices = []
        for index in sorted(outputs):
            whole_text = self._whole_text(index, outputs[index]) if self.tool_parser else ""
            text, logprobs = self._new_text(index, outputs[index])
            completion = outputs[index].outputs[0]
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish_reason = completion.finish_reason
            if self.tool_parser is not None:
                parsed = self.tool_parser.parse(whole_text, is_final=True)
                calls = [self._call(index, i, c) for i, c in enumerate(parsed.calls)]
                if calls:
                    message = {"role": "assistant", "content": parsed.content or None,
                               "tool_calls": calls}
                    finish_reason = "tool_calls"
            choices.append(ChatChoice(
                index=index,
                message=message,
                logprobs=self._logprobs(logprobs),
                finish_reason=finish_reason,
                stop_reason=completion.stop_reason,
            ))
        usage = self.usage(outputs)
        return ChatCompletionResponse(
            id=self.request_id, model=self.model, choices=choices, usage=usage
        )

    def chunks(self, snapshot: dict[int, RequestOutput]) -> list[ChatCompletionChunk]:
        return [self._chunk(index, snapshot[index]) for index in sorted(snapshot)]

    def usage_chunk(self, outputs: dict[int, RequestOutput]) -> ChatCompletionChunk:
        usage = self.usage(outputs)
        return ChatCompletionChunk(id=self.request_id, model=self.model, choices=[], usage=usage)

    def _chunk(self, index: int, output: RequestOutput) -> ChatCompletionChunk:
        sent = self._sent[index]
        delta = {"content": ""} if sent.is_started else {"role": "assistant", "content": ""}
        sent.is_started = True
        completion = output.outputs[0]
        finish_reason = completion.finish_reason
        if self.tool_parser is None:
            text, logprobs = self._new_text(index, output)
            delta["content"] = text
        else:
            whole_text = self._whole_text(index, output)
            before = self._parsed.get(index) or self.tool_parser.parse(
                whole_text[:sent.num_chars], is_final=False)
            _, logprobs = self._new_text(index, output)
            after = self._parsed[index] = self.tool_parser.parse(
                whole_text, is_final=completion.finish_reason is not None)
            delta.update(self._tool_delta(index, before, after))
            if finish_reason is not None and after.calls:
                finish_reason = "tool_calls"
        choice = ChatStreamChoice(
            index=index,
            delta=delta,
            logprobs=self._logprobs(logprobs),
            finish_reason=finish_reason,
            stop_reason=completion.stop_reason,
        )
        return ChatCompletionChunk(id=self.request_id, model=self.model, choices=[choice])

    def _tool_delta(self, index: int, before: ParsedOutput, after: ParsedOutput) -> dict:
        """What `after` adds to `before`: content, new calls (id and name), arguments."""
        delta: dict[str, Any] = {"content": after.content[len(before.content):]}
        calls = []
        for i, call in enumerate(after.calls):
            sent = before.calls[i] if i < len(before.calls) else PartialCall()
            if call.name is None:
                continue  # announced once its name is whole
            if sent.name is None:
                calls.append({"index": i, **self._call(index, i, call)})
            elif len(call.arguments) > len(sent.arguments):
                calls.append({"index": i,
                              "function": {"arguments": call.arguments[len(sent.arguments):]}})
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _call(self, index: int, number: int, call: PartialCall) -> dict[str, Any]:
        """A call in OpenAI's shape; its id depends only on the request, choice and number,
        so a stream resumed elsewhere names it alike."""
        digest = hashlib.sha256(f"{self.request_id}/{index}/{number}".encode()).hexdigest()
        return {"id": f"call_{digest[:24]}", "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    def _logprobs(self, positions: list[PositionLogprobs]) -> ChatLogprobs | None:
        if not self.request.logprobs:
            return None
        num_top = self.request.top_logprobs or 0
        return ChatLogprobs(content=[self._token_logprob(p, num_top) for p in positions])

    def _token_logprob(self, position: PositionLogprobs, num_top: int) -> TokenLogprob:
        (token_id, logprob), alternatives = position[0], position[1:1 + num_top]
        return TokenLogprob(
            **self._top(token_id, logprob).model_dump(),
            top_logprobs=[self._top(t, lp) for t, lp in alternatives],
        )

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))


class CompletionFormatter(_Formatter):
    def __init__(self, request: CompletionRequest, request_id: str, model: str, tokenizer):
        num_choices = len(request.prompts()) * request.n
        super().__init__(request_id, model, tokenizer, num_choices, request.n)
        self.request = request

    def response(self, outputs: dict[int, RequestOutput]) -> CompletionResponse:
        choices = [self._choice(index, outputs[index]) for index in sorted(outputs)]
        usage = self.usage(outputs)
        return CompletionResponse(
            id=self.request_id, model=self.model, choices=choices, usage=usage
        )

    def chunks(self, snapshot: dict[int, RequestOutput]) -> list[CompletionResponse]:
        return [
            CompletionResponse(
                id=self.request_id, model=self.model, choices=[self._choice(i, snapshot[i])]
            )
            for i in sorted(snapshot)
        ]

    def usage_chunk(self, outputs: dict[int, RequestOutput]) -> CompletionResponse:
        usage = self.usage(outputs)
        return CompletionResponse(id=self.request_id, model=self.model, choices=[], usage=usage)

    def _choice(self, index: int, output: RequestOutput) -> CompletionChoice:
        sent = self._sent[index]
        prefix, logprobs = "", CompletionLogprobs()
        if not sent.is_started and self.request.echo:
            prefix = self._prompt_text(output)
            logprobs = self._prompt_logprobs(output)
            sent.text_offset = len(prefix)
        sent.is_started = True
        text, positions = self._new_text(index, output)
        for position in positions:
            self._append(logprobs, position, sent)
        completion = output.outputs[0]
        return CompletionChoice(
            index=index,
            text=prefix + text,
            logprobs=logprobs if self.request.logprobs is not None else None,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids)

    def _prompt_logprobs(self, output: RequestOutput) -> CompletionLogprobs:
        """The prompt's own tokens with their logprobs (None for the first one)."""
        logprobs = CompletionLogprobs()
        positions = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
        offset = 0
        for token_id, position in zip(output.prompt_token_ids, positions):
            text = self.token_text(token_id)
            logprobs.tokens.append(text)
            logprobs.text_offset.append(offset)
            logprobs.token_logprobs.append(None if position is None else position[0][1])
            logprobs.top_logprobs.append(None if position is None else self._top_dict(position))
            offset += len(text)
        return logprobs

    def _append(self, logprobs: CompletionLogprobs, position: PositionLogprobs,
                sent: ChoiceProgress) -> None:
        token_id, logprob = position[0]
        text = self.token_text(token_id)
        logprobs.tokens.append(text)
        logprobs.token_logprobs.append(logprob)
        logprobs.top_logprobs.append(self._top_dict(position))
        logprobs.text_offset.append(sent.text_offset)
        sent.text_offset += len(text)

    def _top_dict(self, position: PositionLogprobs) -> dict[str, float]:
        """The sampled token and the top-N alternatives (OpenAI's legacy shape)."""
        num_top = self.request.logprobs or 0
        return {self.token_text(t): lp for t, lp in position[: 1 + num_top]}
