"""Step messages round-trip through msgpack; nothing but the registered types can be built."""

from __future__ import annotations

import msgpack
import pytest

from fleetlm.executor import wire
from fleetlm.executor.outputs import (
    CachedRequestData,
    KVConnectorOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from fleetlm.executor.sampling_params import SamplingParams


def test_scheduler_output_round_trips():
    params = SamplingParams(temperature=0.7, top_k=5, seed=3, stop=["\n\n"],
                            stop_token_ids=[2], logprobs=2, max_tokens=None)
    message = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData("a", [1, 2, 3], 3, params, [7, 8], 0, 2)],
        scheduled_cached_reqs=CachedRequestData(["b"], [[9]], [17], [[42]]),
        num_scheduled_tokens={"a": 3, "b": 1},
        total_num_scheduled_tokens=4,
        finished_req_ids={"c", "d"},
        step_id=12,
    )
    assert wire.decode(wire.encode(message)) == message


def test_model_runner_output_round_trips():
    output = ModelRunnerOutput(
        req_ids=["a", "b"], sampled_token_ids=[[5], []],
        logprobs={"a": [[(5, -0.1), (6, -2.5)]]},
        prompt_logprobs={"b": [None, [(3, -1.0)]]},
        kv_connector_output=KVConnectorOutput({"x"}, set()),
    )
    decoded = wire.decode(wire.encode(output))
    assert decoded.req_ids == output.req_ids
    assert decoded.sampled_token_ids == output.sampled_token_ids
    assert decoded.logprobs == {"a": [[[5, -0.1], [6, -2.5]]]}  # pairs arrive as lists
    assert decoded.prompt_logprobs == {"b": [None, [[3, -1.0]]]}
    assert decoded.kv_connector_output == output.kv_connector_output


def test_only_registered_types_cross():
    class Secret:
        pass

    with pytest.raises(TypeError, match="Secret cannot cross"):
        wire.encode(SchedulerOutput([], CachedRequestData(), {}, 0, {Secret()}))
    forged = msgpack.packb(msgpack.ExtType(99, b"\x90"))
    with pytest.raises(ValueError, match="unknown message type 99"):
        wire.decode(forged)
