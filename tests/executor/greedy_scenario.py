"""One greedy run that exercises the hard paths, shared by the tests that compare an engine
variant (a worker group, speculative decoding) with the plain single-process engine.

Float32, 32 new tokens on varied prompts, in two batches: chunked prefill (a 64-token
budget), prefix-cache hits (the second batch shares a long prefix with the first) and
preemption (16 blocks of 16 tokens are too few for every request at once).
"""

from __future__ import annotations

import pytest

from fleetlm import LLM, SamplingParams

MAX_TOKENS = 32
LOGPROB_ATOL = 1e-3  # float32; only the summation order differs
PREFIX = ("You are a careful assistant. Answer briefly and precisely, and say so when you "
          "do not know. ") * 4
FIRST_BATCH = [PREFIX + "What is the capital of France?"]
SECOND_BATCH = [
    PREFIX + "Name three colours of the rainbow.",
    "def fibonacci(n):\n    ",
    "Écris une phrase sur la mer.",
    "The quick brown fox jumps over the lazy dog. " * 6 + "Then it",
]
ENGINE_ARGS = dict(dtype="float32", block_size=16, num_blocks=16, max_num_batched_tokens=64,
                   max_num_seqs=4)
MIN_PREFIX_HIT = 64


def run(llm: LLM) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    outputs = llm.generate(FIRST_BATCH, params) + llm.generate(SECOND_BATCH, params)
    return {
        "tokens": [o.outputs[0].token_ids for o in outputs],
        "logprobs": [[p[0][1] for p in o.outputs[0].logprobs] for o in outputs],
        "num_cached": [o.num_cached_tokens for o in outputs],
        "stats": llm.engine.stats(),
    }


def check_exercised(result: dict) -> None:
    """The run must exercise what it claims to."""
    assert result["num_cached"][1] >= MIN_PREFIX_HIT, "the second batch should hit the cache"
    assert result["stats"].num_preemptions > 0, "16 blocks should force preemption"


def assert_same(got: dict, expected: dict) -> None:
    assert got["tokens"] == expected["tokens"]
    for got_lps, expected_lps in zip(got["logprobs"], expected["logprobs"]):
        assert got_lps == pytest.approx(expected_lps, abs=LOGPROB_ATOL)
    assert got["num_cached"][1] >= MIN_PREFIX_HIT
