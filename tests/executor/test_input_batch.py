"""A step of one token per request and no drafts takes a shorter path to the model's tensors
(`_prepare_decodes`): it must give exactly the general path's tensors, dtypes and shapes."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from fleetlm.executor import input_batch
from fleetlm.executor.input_batch import CachedRequestState, prepare_batch
from fleetlm.executor.sampling_params import SamplingParams

BLOCK_SIZE = 16
CPU = torch.device("cpu")


def _state(rng: random.Random, req_id: str, kind: str) -> CachedRequestState:
    """A request whose next scheduled token is: a decode (`decode`), its prompt's last token
    (`last_prompt_token`, sampled after) or a one-token chunk inside its prompt
    (`prompt_chunk`, not sampled), with prompt logprobs asked for or not."""
    num_prompt = rng.randint(2, 70)
    tokens = [rng.randrange(49152) for _ in range(num_prompt)]
    if kind == "decode":
        tokens += [rng.randrange(49152) for _ in range(rng.randint(1, 40))]
        num_computed = len(tokens) - 1
    else:
        num_computed = num_prompt - 1 if kind == "last_prompt_token" else rng.randint(
            0, num_prompt - 2)
    blocks = rng.sample(range(1000), len(tokens) // BLOCK_SIZE + 1)
    params = SamplingParams(prompt_logprobs=rng.choice([None, 0, 2]))
    return CachedRequestState(req_id, tokens, num_prompt, params, 2, blocks, num_computed)


def _assert_same(got, expected) -> None:
    for field in dataclasses.fields(expected):
        a, b = getattr(got, field.name), getattr(expected, field.name)
        if isinstance(b, torch.Tensor):
            assert (a.dtype, a.shape) == (b.dtype, b.shape), field.name
            assert torch.equal(a, b), field.name
        elif dataclasses.is_dataclass(b):
            _assert_same(a, b)
        else:
            assert a == b, field.name


@pytest.mark.parametrize("seed", range(6))
def test_a_step_of_single_tokens_gives_the_general_paths_tensors(seed):
    rng = random.Random(seed)
    kinds = ["decode", "last_prompt_token", "prompt_chunk"]  # each at least once
    kinds += [rng.choice(kinds) for _ in range(rng.randint(0, 9))]
    states = {f"r{i}": _state(rng, f"r{i}", kind) for i, kind in enumerate(kinds)}
    scheduled = dict.fromkeys(states, 1)
    got = prepare_batch(states, scheduled, BLOCK_SIZE, CPU)
    _assert_same(got, input_batch._prepare_any(states, scheduled, BLOCK_SIZE, CPU, {}))
    assert got.sampling_req_ids == [r for r, k in zip(states, kinds, strict=True)
                                    if k != "prompt_chunk"]
    rows = got.logits_indices.tolist()
    assert rows == sorted(set(rows))  # increasing: as many as the rows means all of them


def test_steps_written_into_buffers_give_the_general_paths_tensors():
    """A runner's steps write their tensors into the same buffers step after step: each step
    still gets exactly the general path's tensors (block tables zero-padded to the widest
    row, however wide the step before was), and a step that does not fit makes its own."""
    buffers = input_batch.DecodeBuffers(max_rows=6, max_blocks=5)
    rng = random.Random(7)
    for step in range(12):
        kinds = [rng.choice(["decode", "last_prompt_token", "prompt_chunk"])
                 for _ in range(rng.randint(1, 6))]
        states = {f"r{step}.{i}": _state(rng, f"r{step}.{i}", kind)
                  for i, kind in enumerate(kinds)}
        scheduled = dict.fromkeys(states, 1)
        got = prepare_batch(states, scheduled, BLOCK_SIZE, CPU, buffers=buffers)
        _assert_same(got, input_batch._prepare_any(states, scheduled, BLOCK_SIZE, CPU, {}))
        wide = max(len(s.block_ids) for s in states.values()) > 5
        shares = got.input_ids.untyped_storage().data_ptr() == \
            buffers._ints.untyped_storage().data_ptr()
        assert shares != wide  # the buffers where the step fits, its own tensors otherwise


def test_a_step_with_drafts_or_a_longer_chunk_takes_the_general_path(monkeypatch):
    rng = random.Random(0)
    states = {"a": _state(rng, "a", "decode"), "b": _state(rng, "b", "decode")}
    monkeypatch.setattr(input_batch, "_prepare_decodes", None)  # calling it would fail
    # b verifies one draft: its last token and the draft are scheduled
    batch = prepare_batch(states, {"a": 1, "b": 2}, BLOCK_SIZE, CPU, spec_tokens={"b": [7]})
    assert batch.sampling_drafts == [[], [7]] and batch.input_ids[-1] == 7
    # every row samples, in order (the runner skips the gather when there are as many)
    assert batch.logits_indices.tolist() == [0, 1, 2]
    states["b"].num_computed_tokens -= 1  # b's last two tokens as one chunk
    batch = prepare_batch(states, {"a": 1, "b": 2}, BLOCK_SIZE, CPU)
    assert batch.attn_metadata.num_prefill_tokens == 2
