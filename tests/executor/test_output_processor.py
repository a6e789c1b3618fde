"""Delta outputs (the served path): a request's deltas, concatenated, are its cumulative
output (stop strings, logprobs, n > 1, resume), each delta holds only the step's new items,
and a reader that falls behind gets the missed deltas concatenated. Hand-built engine-core
outputs through the real output processor and the built-in model's tokenizer."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from fleetlm.executor.async_engine import AsyncEngine
from fleetlm.executor.output_processor import OutputProcessor
from fleetlm.executor.outputs import EngineCoreOutput, RequestOutput, coalesce
from fleetlm.executor.sampling_params import SamplingParams

TEXT = " The capital of France is Paris, a city of light and of many old bridges."


@pytest.fixture(scope="module")
def tokenizer():
    from fleetlm.executor.weights import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


def _steps(token_ids: list[int], child_ids: list[str], with_logprobs: bool):
    """One token per step for every child; the last step finishes them ("length")."""
    for i, token in enumerate(token_ids):
        is_last = i == len(token_ids) - 1
        yield [EngineCoreOutput(child, [token],
                                [[(token, -0.5), (7, -1.0)]] if with_logprobs else None,
                                finish_reason="length" if is_last else None)
               for child in child_ids]


def _run(tokenizer, params: SamplingParams, resume: list[int] | None = None,
         request_id: str = "r") -> list[RequestOutput]:
    """Every output of one request fed TEXT's tokens, in order."""
    processor = OutputProcessor(tokenizer)
    prompt = tokenizer.encode("Where is Paris?")
    processor.add_request(request_id, None, prompt, params, 0.0, resume)
    child_ids = processor.child_ids(request_id)
    outputs = []
    for step in _steps(tokenizer.encode(TEXT)[len(resume or ()):], child_ids,
                       params.logprobs is not None):
        step = [o for o in step if o.req_id in processor.parent_of]  # stopped ones left
        processed = processor.process_outputs(step)
        outputs.extend(processed.request_outputs)
        for child in processed.reqs_to_stop:  # what the engine core would do
            processor.process_outputs([EngineCoreOutput(child, [], finish_reason="stop")])
    return outputs


def _concatenated(deltas: list[RequestOutput]) -> RequestOutput:
    whole = None
    for delta in deltas:
        whole = coalesce(whole, dataclasses.replace(
            delta, outputs=[dataclasses.replace(c, token_ids=list(c.token_ids),
                                                logprobs=c.logprobs and list(c.logprobs))
                            for c in delta.outputs]))
    return whole


PARAMS = {
    "plain": SamplingParams(max_tokens=100),
    "stop string": SamplingParams(max_tokens=100, stop=["many old"]),
    "stop kept": SamplingParams(max_tokens=100, stop=["city"], include_stop_str_in_output=True),
    "logprobs": SamplingParams(max_tokens=100, logprobs=1),
    "n=2": SamplingParams(max_tokens=100, n=2, logprobs=1),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_deltas_add_up_to_the_cumulative_output(tokenizer, name):
    cumulative = _run(tokenizer, PARAMS[name])
    deltas = _run(tokenizer, dataclasses.replace(PARAMS[name], output_kind="delta"))
    assert all(d.is_delta for d in deltas) and not any(c.is_delta for c in cumulative)
    assert len(deltas) == len(cumulative) and deltas[-1].finished
    whole, final = _concatenated(deltas), cumulative[-1]
    assert [(c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason)
            for c in whole.outputs] == \
        [(c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason)
         for c in final.outputs]
    assert final.outputs[0].text  # something was generated


def test_each_delta_holds_only_the_steps_new_items(tokenizer):
    """No whole-output copy per step: the items copied into outputs grow linearly with the
    tokens, where cumulative outputs copy every token again at every step."""
    params = SamplingParams(max_tokens=100, logprobs=1)
    deltas = _run(tokenizer, dataclasses.replace(params, output_kind="delta"))
    cumulative = _run(tokenizer, params)
    num_tokens = len(tokenizer.encode(TEXT))
    assert [len(d.outputs[0].token_ids) for d in deltas] == [1] * num_tokens
    assert [len(d.outputs[0].logprobs) for d in deltas] == [1] * num_tokens
    copied = sum(len(c.outputs[0].token_ids) for c in cumulative)
    assert copied == num_tokens * (num_tokens + 1) // 2


def test_a_resumed_requests_first_delta_begins_with_the_resumed_tokens(tokenizer):
    params = SamplingParams(max_tokens=100, logprobs=1, output_kind="delta")
    resume = tokenizer.encode(TEXT)[:5]
    deltas = _run(tokenizer, params, resume=resume)
    assert deltas[0].outputs[0].token_ids[:5] == resume
    assert len(deltas[0].outputs[0].logprobs) == 1  # logprobs: only tokens generated here
    whole = _concatenated(deltas).outputs[0]
    full = _run(tokenizer, dataclasses.replace(params, output_kind="cumulative"))[-1].outputs[0]
    assert (whole.text, whole.token_ids) == (full.text, full.token_ids)


def test_a_slow_reader_gets_the_missed_deltas_concatenated(tokenizer):
    """The async engine's queue: outputs queued while the reader was away come out as one."""
    deltas = _run(tokenizer, SamplingParams(max_tokens=100, n=2, logprobs=1,
                                            output_kind="delta"))
    expected = _concatenated(deltas)

    async def read_all() -> list[RequestOutput]:
        queue: asyncio.Queue = asyncio.Queue()
        got = []
        for i, delta in enumerate(deltas):
            queue.put_nowait(delta)
            if i % 5 == 4 or delta.finished:  # the reader wakes every fifth step
                got.append(await AsyncEngine._next_output(queue))
        return got

    got = asyncio.run(read_all())
    assert len(got) == -(-len(deltas) // 5) and got[-1].finished
    assert [c.token_ids for c in _concatenated(got).outputs] == \
        [c.token_ids for c in expected.outputs]
    assert [c.text for c in _concatenated(got).outputs] == [c.text for c in expected.outputs]
