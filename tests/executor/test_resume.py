"""Resuming a request from output generated elsewhere (stream migration): the continuation
equals the undisturbed run's, token for token and character for character, greedy or seeded.
"""

from __future__ import annotations

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.executor.outputs import RequestOutput

PROMPT = "Write a short poem about the sea."
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", kv_cache_memory_bytes=64 << 20)


@pytest.fixture(scope="module")
def undisturbed(llm):
    """Every output of each set of sampling params, run once without a resume."""
    cache: dict[str, list[RequestOutput]] = {}

    def get(name: str) -> list[RequestOutput]:
        if name not in cache:
            cache[name] = _run(llm, f"undisturbed-{name}", PARAMS[name])
        return cache[name]

    return get


def _run(llm: LLM, request_id: str, params: SamplingParams,
         resume_token_ids: list[int] | None = None) -> list[RequestOutput]:
    """Every output of one request, in order."""
    prompt = llm.apply_chat_template([{"role": "user", "content": PROMPT}])
    llm.engine.add_request(request_id, prompt, params, resume_token_ids=resume_token_ids)
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs.extend(llm.engine.step())
    return outputs


def _assert_same_snapshots(resumed: list[RequestOutput], full: list[RequestOutput],
                           num_resumed: int) -> None:
    """After the resume, each cumulative output equals the undisturbed run's at the same
    number of tokens (one token per step): same tokens and same text, so a client that saw
    the undisturbed run's text up to `num_resumed` tokens gets exactly the rest."""
    assert len(resumed) == len(full) - num_resumed
    for got, expected in zip(resumed, full[num_resumed:]):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids
        assert got.outputs[0].text == expected.outputs[0].text


PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=NUM_TOKENS,
                             ignore_eos=True, repetition_penalty=1.3, logprobs=2),
}


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("num_resumed", [1, 9])
def test_resumed_request_continues_exactly(llm, undisturbed, name, num_resumed):
    params = PARAMS[name]
    full = undisturbed(name)
    full_out = full[-1].outputs[0]
    resume = full_out.token_ids[:num_resumed]

    outputs = _run(llm, f"resumed-{name}-{num_resumed}", params, resume)
    last = outputs[-1].outputs[0]
    assert last.token_ids == full_out.token_ids  # max_tokens counts the resumed tokens too
    assert (last.finish_reason, outputs[-1].finished) == ("length", True)
    _assert_same_snapshots(outputs, full, num_resumed)
    if params.logprobs is not None:  # only the positions generated here
        assert len(last.logprobs) == NUM_TOKENS - num_resumed
        assert [p[0][0] for p in last.logprobs] == full_out.token_ids[num_resumed:]


def test_resumed_text_picks_up_held_back_text(llm, undisturbed):
    """A stop string's possible start is held back; after a resume it is released exactly
    as in the undisturbed run."""
    text = undisturbed("greedy")[-1].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3] + "\u2603"  # starts in the text, never ends
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, stop=[stop])
    full = _run(llm, "stop-full", params)
    assert full[-1].outputs[0].text == text
    held_back = [len(o.outputs[0].text) < len(t.outputs[0].text)
                 for o, t in zip(full, undisturbed("greedy"))]
    assert any(held_back)  # the stop string's start was held back at some step
    for num_resumed in range(3, NUM_TOKENS - 1, 4):
        resume = full[-1].outputs[0].token_ids[:num_resumed]
        outputs = _run(llm, f"stop-resumed-{num_resumed}", params, resume)
        _assert_same_snapshots(outputs, full, num_resumed)


def test_resume_leaves_no_blocks(llm, undisturbed):
    resume = undisturbed("greedy")[-1].outputs[0].token_ids[:5]
    _run(llm, "blocks-resumed", PARAMS["greedy"], resume)
    manager = llm.engine.core.scheduler.kv_cache_manager
    manager.check_invariants()
    assert manager.num_free_blocks == manager.block_pool.num_blocks


@pytest.mark.parametrize(
    ("params", "resume", "message"),
    [
        (SamplingParams(n=2, max_tokens=4), [1], "n == 1"),
        (SamplingParams(max_tokens=2), [1, 2], "max_tokens"),
        (SamplingParams(max_tokens=4), [-1], "resume_token_ids must be in"),
    ],
    ids=["n", "max_tokens", "vocab"],
)
def test_bad_resume_is_a_value_error(llm, params, resume, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.make_requests("bad", "hello", params, resume_token_ids=resume)
