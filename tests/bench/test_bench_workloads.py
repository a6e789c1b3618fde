"""Workloads are deterministic per seed, have the requested shape and the requested lengths."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fleetlm.bench.prompts import (
    LENGTH_TOLERANCE,
    TokenPromptSource,
    WordPromptSource,
    make_prompt_source,
)
from fleetlm.bench.workloads import WorkloadConfig, build_workload


def _build(tokenizer, **kwargs):
    return build_workload(WorkloadConfig(**kwargs), make_prompt_source(tokenizer))


@pytest.mark.parametrize("name", ["random", "shared-prefix", "multi-turn"])
def test_same_seed_same_workload_other_seed_other_workload(bpe_tokenizer, name):
    kwargs = {"name": name, "num_prompts": 6, "input_len": 12, "prefix_len": 20,
              "num_groups": 2, "num_turns": 3}
    first = _build(bpe_tokenizer, seed=1, **kwargs)
    assert first == _build(bpe_tokenizer, seed=1, **kwargs)
    assert first != _build(bpe_tokenizer, seed=2, **kwargs)


def test_random_prompts_re_encode_to_the_requested_length(bpe_tokenizer):
    workload = _build(bpe_tokenizer, num_prompts=20, input_len=32, output_len=7)
    assert workload.num_requests == 20
    for conv in workload.conversations:
        (turn,) = conv.turns
        assert len(bpe_tokenizer.encode(turn.text)) == turn.num_tokens
        assert abs(turn.num_tokens - 32) <= LENGTH_TOLERANCE
        assert (turn.max_tokens, turn.is_ignore_eos) == (7, True)
    assert len({conv.turns[0].text for conv in workload.conversations}) == 20
    assert "tiny-bpe" in workload.prompt_source


def test_prompts_use_no_special_tokens(bpe_tokenizer):
    source = TokenPromptSource(bpe_tokenizer)
    text, _ = source.make_text(np.random.default_rng(0), 200)
    assert "<eos>" not in text


def test_shared_prefix_groups_share_one_system_prompt(bpe_tokenizer):
    workload = _build(bpe_tokenizer, name="shared-prefix", num_prompts=7, num_groups=3,
                      prefix_len=40, input_len=8)
    conversations = workload.conversations
    by_group = Counter(c.conv_id.split("-")[0] for c in conversations)
    assert sorted(by_group.values()) == [2, 2, 3]  # 7 users round-robin over 3 groups
    assert len({c.system_prompt for c in conversations}) == 3
    prompts_by_group = {(c.conv_id.split("-")[0], c.system_prompt) for c in conversations}
    assert len(prompts_by_group) == 3  # one system prompt per group, shared by its users
    for conv in conversations:
        assert len(bpe_tokenizer.encode(conv.system_prompt)) == conv.num_system_tokens
        assert abs(conv.num_system_tokens - 40) <= LENGTH_TOLERANCE
        assert abs(conv.turns[0].num_tokens - 8) <= LENGTH_TOLERANCE
    assert len({c.turns[0].text for c in conversations}) == 7  # every user asks their own
    group_of = [c.conv_id.split("-")[0] for c in conversations]
    assert group_of != sorted(group_of)  # tenants interleave


def test_multi_turn_conversations_have_the_requested_turns(bpe_tokenizer):
    workload = _build(bpe_tokenizer, name="multi-turn", num_prompts=8, num_turns=4, input_len=10)
    assert len(workload.conversations) == 2 and workload.num_requests == 8
    for conv in workload.conversations:
        assert len(conv.turns) == 4 and conv.system_prompt is None
        assert all(abs(t.num_tokens - 10) <= LENGTH_TOLERANCE for t in conv.turns)


def test_without_a_tokenizer_prompts_are_words_and_say_so():
    workload = _build(None, num_prompts=3, input_len=9)
    assert isinstance(make_prompt_source(None), WordPromptSource)
    assert all(len(c.turns[0].text.split()) == 9 for c in workload.conversations)
    assert "word list" in workload.prompt_source and "approximate" in workload.prompt_source


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "sharegpt"}, "workload must be one of"),
    ({"input_len": 0}, "input_len"),
    ({"name": "multi-turn", "num_prompts": 7, "num_turns": 3}, "multiple of num_turns"),
])
def test_bad_workload_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**kwargs)
