"""The ingress's tokenizer: loaded as the ingress starts, prompts tokenized and hashed as the
engines do."""

from __future__ import annotations

import asyncio

from fleetlm.cluster.openai_protocol import CompletionRequest
from fleetlm.cluster.prompt_hashing import PromptHasher
from fleetlm.executor.block_pool import hash_prompt_blocks
from fleetlm.executor.weights import load_tokenizer, resolve_model, resolve_tokenizer

MODEL = "smollm2-135m-instruct"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


def test_preload_loads_the_tokenizer_before_the_first_prompt():
    hasher = PromptHasher(MODEL, None, block_size=16)
    hasher.preload().join(timeout=300)
    assert hasher._tokenizer is not None  # no request has asked for it yet

    token_ids, hashes = asyncio.run(hasher.tokenize(CompletionRequest(model=MODEL, prompt=PROMPT)))
    expected = load_tokenizer(resolve_tokenizer(None, resolve_model(MODEL))).encode(PROMPT)
    assert token_ids == (tuple(expected),)
    assert hashes == tuple(hash_prompt_blocks(expected, 16)) and len(hashes) == len(expected) // 16


def test_a_tokenizer_that_cannot_load_leaves_tokenizing_to_the_replicas():
    hasher = PromptHasher("no-such-model", None, block_size=16)
    hasher.preload().join(timeout=60)
    assert asyncio.run(hasher.tokenize(CompletionRequest(model="x", prompt="hello"))) == (None, ())
