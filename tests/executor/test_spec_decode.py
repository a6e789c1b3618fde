"""Speculative decoding end to end: greedy output with speculation is token-identical to
greedy without (the greedy scenario: chunked prefill, prefix hits, preemption), for the n-gram
proposer and for draft models (a good one: the target itself; a bad one: random weights, so
most drafts are rejected); steps emit several tokens; seeds reproduce; the counters move."""

from __future__ import annotations

import pytest
import transformers
from greedy_scenario import ENGINE_ARGS, assert_same, run

from fleetlm import LLM, SamplingParams
from fleetlm.executor.weights import load_tokenizer

COPYING_PROMPT = ("Copy this list exactly.\nalpha beta gamma delta epsilon zeta eta theta iota "
                  "kappa lambda mu\nCopy:\nalpha beta gamma delta epsilon zeta eta theta")


@pytest.fixture(scope="module")
def random_draft(builtin_dir, tmp_path_factory):
    """A two-layer random-weight model with the built-in model's tokenizer."""
    folder = tmp_path_factory.mktemp("random-draft")
    config = transformers.AutoConfig.from_pretrained(builtin_dir)
    config.num_hidden_layers = 2
    config.save_pretrained(folder)
    load_tokenizer(builtin_dir).save_pretrained(folder)
    return str(folder)


def _spec_run(builtin_dir: str, speculative_config: dict) -> dict:
    # Fewer blocks than the plain run: speculation finishes requests in fewer steps, which
    # would otherwise leave the cache room enough never to preempt.
    args = {**ENGINE_ARGS, "num_blocks": 12}
    with LLM(builtin_dir, speculative_config=speculative_config, **args) as llm:
        result = run(llm)
    assert result["stats"].num_preemptions > 0
    return result


def test_ngram_greedy_equals_plain_greedy(builtin_dir, reference):
    got = _spec_run(builtin_dir, {"method": "ngram", "num_speculative_tokens": 4,
                                  "prompt_lookup_max": 4, "min_acceptance_rate": 0.0})
    assert_same(got, reference)
    stats = got["stats"]
    assert stats.spec_num_accepted_tokens > 10  # the repeated sentence is copied
    assert stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # and some rejected


@pytest.mark.slow
def test_draft_model_greedy_equals_plain_greedy(builtin_dir, reference, random_draft):
    good = _spec_run(builtin_dir, {"model": builtin_dir, "num_speculative_tokens": 3})
    assert_same(good, reference)
    assert good["stats"].spec_num_accepted_tokens == good["stats"].spec_num_draft_tokens > 50
    bad = _spec_run(builtin_dir, {"model": random_draft, "random_weights": True,
                                  "num_speculative_tokens": 3, "min_acceptance_rate": 0.0})
    assert_same(bad, reference)
    assert bad["stats"].spec_num_draft_tokens > 50
    assert bad["stats"].spec_num_accepted_tokens < bad["stats"].spec_num_draft_tokens / 4


def test_steps_emit_several_tokens_and_seeds_repeat(builtin_dir):
    config = {"method": "ngram", "num_speculative_tokens": 4}
    with LLM(builtin_dir, dtype="float32", kv_cache_memory_bytes=32 << 20,
             speculative_config=config) as llm:
        engine = llm.engine
        engine.add_request("greedy", COPYING_PROMPT,
                           SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        num_new = []
        previous = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                num_new.append(len(out.outputs[0].token_ids) - previous)
                previous = len(out.outputs[0].token_ids)
        assert max(num_new) > 1, "a verified step should stream several tokens"
        seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=24,
                                ignore_eos=True)
        texts = [llm.generate(COPYING_PROMPT, seeded)[0].outputs[0].text for _ in range(2)]
        assert texts[0] == texts[1]
        stats = engine.stats()
        assert stats.spec_num_drafts > 0
        assert sum(stats.spec_accepted_per_position) == stats.spec_num_accepted_tokens


def test_bad_speculative_configs_are_refused(builtin_dir):
    with pytest.raises(ValueError, match="unknown key 'speculative_config.lookahead'"):
        LLM(builtin_dir, speculative_config={"method": "ngram", "lookahead": 3})
    with pytest.raises(ValueError, match="speculative_config: model names the draft model"):
        LLM(builtin_dir, speculative_config={"method": "draft_model"})
    with pytest.raises(ValueError, match="pipeline_parallel_size > 1"):
        LLM(builtin_dir, pipeline_parallel_size=2, speculative_config={"method": "ngram"})
