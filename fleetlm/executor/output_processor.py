"""Turn EngineCoreOutputs into RequestOutputs: detokenize, find stop strings, gather n > 1.

Stop strings are found here, after detokenization, so the engine core never sees text; a
request whose text hit one is reported back in `reqs_to_stop` and finished by the core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fleetlm.executor.detokenizer import IncrementalDetokenizer
from fleetlm.executor.input_processor import child_request_id
from fleetlm.executor.outputs import CompletionOutput, EngineCoreOutput, RequestOutput
from fleetlm.executor.sampling_params import SamplingParams


@dataclass
class _Completion:
    index: int
    detokenizer: IncrementalDetokenizer
    output: CompletionOutput  # cumulative; only appended to
    # How much of `output` earlier deltas held (delta outputs only).
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0

    def snapshot(self) -> CompletionOutput:
        """A copy the caller may keep while the engine goes on appending to the original."""
        o = self.output
        return CompletionOutput(o.index, o.text, list(o.token_ids),
                                None if o.logprobs is None else list(o.logprobs),
                                o.finish_reason, o.stop_reason)

    def take_delta(self) -> CompletionOutput:
        """What is new since the previous delta: a copy of the new items only."""
        o = self.output
        delta = CompletionOutput(
            o.index, o.text[self.num_sent_chars:], o.token_ids[self.num_sent_tokens:],
            None if o.logprobs is None else o.logprobs[self.num_sent_logprobs:],
            o.finish_reason, o.stop_reason)
        self.num_sent_chars, self.num_sent_tokens = len(o.text), len(o.token_ids)
        self.num_sent_logprobs = 0 if o.logprobs is None else len(o.logprobs)
        return delta


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: dict[str, _Completion]  # child request id -> completion
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    kv_transfer_params: dict | None = None

    @property
    def is_finished(self) -> bool:
        return all(c.output.finished for c in self.completions.values())

    def to_output(self) -> RequestOutput:
        """The request's output now: cumulative (copies of everything so far), or, for a
        delta request, what is new since the previous call (copies of the new items only)."""
        is_delta = self.params.is_delta
        completions = sorted(self.completions.values(), key=lambda c: c.index)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[c.take_delta() if is_delta else c.snapshot() for c in completions],
            finished=self.is_finished, prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=self.num_cached_tokens, metrics=dict(self.metrics),
            kv_transfer_params=self.kv_transfer_params, is_delta=is_delta)


def _replay(completion: _Completion, token_ids: list[int]) -> None:
    """Feed tokens generated elsewhere through the detokenizer: its held-back tail (a partial
    character, a possible stop-string start) is then what it was there."""
    completion.detokenizer.update(list(token_ids))
    completion.output.token_ids.extend(token_ids)
    completion.output.text = completion.detokenizer.output_text


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    reqs_to_stop: list[str]  # child request ids whose text hit a stop string


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}
        self.parent_of: dict[str, str] = {}  # child request id -> request id

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float,
                    resume_token_ids: list[int] | None = None) -> None:
        """`resume_token_ids` (n == 1 only): output already generated elsewhere. The completion
        starts with them and with their text, decoded exactly as it was where they were
        generated (so the next delta begins where that text ended); `logprobs` cover only
        the tokens generated here."""
        child_ids = [request_id] if params.n == 1 else [
            child_request_id(request_id, i) for i in range(params.n)]
        completions = {
            child_id: _Completion(i, self._detokenizer(prompt_token_ids, params),
                                  CompletionOutput(i, "", [],
                                                   [] if params.logprobs is not None else None))
            for i, child_id in enumerate(child_ids)
        }
        if resume_token_ids:
            [completion] = completions.values()
            _replay(completion, resume_token_ids)
        self.requests[request_id] = _RequestState(
            request_id, prompt, prompt_token_ids, params, completions,
            metrics={"arrival_time": arrival_time})
        self.parent_of.update((child_id, request_id) for child_id in child_ids)

    def _detokenizer(self, prompt_token_ids, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.skip_special_tokens, params.stop,
            params.include_stop_str_in_output)

    def child_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return [] if state is None else list(state.completions)

    def abort_request(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        for child_id in state.completions if state else ():
            self.parent_of.pop(child_id, None)

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        reqs_to_stop: list[str] = []
        for out in core_outputs:
            parent = self.parent_of.get(out.req_id)
            if parent is None:
                continue  # aborted by the caller while this step ran
            state = touched[parent] = self.requests[parent]
            if self._apply(state, state.completions[out.req_id], out):
                reqs_to_stop.append(out.req_id)
            if out.new_token_ids:
                state.metrics.setdefault("first_token_time", now)
                state.metrics["last_token_time"] = now
        results = []
        for state in touched.values():
            if state.is_finished:
                state.metrics["finished_time"] = now
                self.abort_request(state.request_id)
            results.append(state.to_output())
        return ProcessedOutputs(results, reqs_to_stop)

    def _apply(self, state: _RequestState, completion: _Completion,
               out: EngineCoreOutput) -> bool:
        """Fold one step into a completion; True if its text hit a stop string."""
        output = completion.output
        if out.new_prompt_logprobs is not None:
            state.prompt_logprobs = (state.prompt_logprobs or []) + out.new_prompt_logprobs
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        if out.kv_transfer_params is not None:
            state.kv_transfer_params = out.kv_transfer_params
        output.token_ids.extend(out.new_token_ids)
        if output.logprobs is not None and out.new_logprobs:
            output.logprobs.extend(out.new_logprobs)
        _, stop_string = completion.detokenizer.update(out.new_token_ids)
        if stop_string is not None:
            output.finish_reason, output.stop_reason = "stop", stop_string
        elif out.finished:
            completion.detokenizer.flush()
            output.finish_reason, output.stop_reason = out.finish_reason, out.stop_reason
        output.text = completion.detokenizer.output_text
        return stop_string is not None and not out.finished
