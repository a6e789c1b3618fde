"""P/D over int8 KV caches (`kv_cache_dtype: int8`): the blocks travel with their scales, so
a decode engine reading an int8 prefill engine's KV generates what one int8 engine does;
a float decode engine refuses an int8 layout and recomputes the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pd_helpers import ENGINE, generate, prefill, prompt_for, release

from fleetlm import LLM
from fleetlm.kvtransfer.kv_io import gather_blocks, layout_of, scatter_blocks

INT8 = {**ENGINE, "kv_cache_dtype": "int8"}


@pytest.fixture(scope="module")
def engines():
    llms = {
        "reference": LLM(**INT8),
        "decode": LLM(**INT8, kv_transfer_config={"role": "consumer"}),
        "prefill": LLM(**INT8, kv_transfer_config={"role": "producer", "transport": "tcp"}),
        "float_decode": LLM(**ENGINE, kv_transfer_config={"role": "consumer"}),
    }
    yield llms
    for llm in llms.values():
        llm.shutdown()


@pytest.mark.parametrize(("salt", "kind"), [(40, "short"), (41, "longer_than_a_chunk")])
def test_decode_from_int8_blocks_equals_an_int8_engine(engines, salt, kind):
    prompt = prompt_for(kind, salt)
    expected = generate(engines["reference"], prompt).outputs[0].token_ids
    out = generate(engines["decode"], prompt, kv_transfer_params=prefill(engines["prefill"],
                                                                         prompt))
    assert out.num_cached_tokens == len(prompt) - 1  # all but the last token came over
    assert out.outputs[0].token_ids == expected


def test_a_float_engine_recomputes_instead_of_reading_int8_blocks(engines):
    prompt = prompt_for("short", 42)
    params = prefill(engines["prefill"], prompt)
    assert params["layout"]["dtype"] == "int8" and params["layout"]["head_dim"] == 64
    out = generate(engines["float_decode"], prompt, kv_transfer_params=params)
    assert out.num_cached_tokens == 0  # refused (layout_mismatch), computed here
    local = generate(engines["float_decode"], prompt)  # the same engine, no transfer
    assert out.outputs[0].token_ids == local.outputs[0].token_ids
    release(params)


def test_blocks_round_trip_through_bytes_with_their_scales():
    gen = torch.Generator().manual_seed(0)
    caches = [tuple(torch.randint(-127, 128, (6, 4, 3, 68), generator=gen, dtype=torch.int8)
                    for _ in range(2)) for _ in range(2)]
    layout = layout_of(caches)
    assert (layout.dtype, layout.head_dim) == ("int8", 64)
    data = gather_blocks(caches, [4, 1], heads=(1, 3))
    assert len(data) == layout.bytes_per_block(2, 2) * 2
    target = [tuple(torch.zeros_like(c) for c in pair) for pair in caches]
    scatter_blocks(target, [0, 5], bytearray(np.asarray(data)), heads=(1, 3))
    for (k, v), (k2, v2) in zip(caches, target):
        assert torch.equal(k2[[0, 5], :, 1:], k[[4, 1], :, 1:])
        assert torch.equal(v2[[0, 5], :, 1:], v[[4, 1], :, 1:])
        assert not k2[:, :, 0].any()
