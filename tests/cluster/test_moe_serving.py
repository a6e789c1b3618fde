"""A mixture-of-experts deployment from configs/: the random-weight Qwen3-MoE of
configs/models/qwen3-moe-tiny with expert parallelism over two worker ranks (all-to-all),
served by Ray Serve and answering the OpenAI Python SDK."""

from __future__ import annotations

from pathlib import Path

import actors
import openai
import pytest
from conftest import small_config

from fleetlm.cluster.app import build_app
from fleetlm.cluster.config import load_config

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).parents[2] / "configs" / "qwen3-moe-ep2.yaml"
APP = "moe"


def test_expert_parallel_moe_config_answers_the_openai_sdk(http_port):
    from ray import serve

    config = load_config(CONFIG)
    assert config.parallel.enable_expert_parallel and config.parallel.tensor_parallel_size == 2
    # The YAML's relative folder is made absolute where it is read (replicas run elsewhere).
    assert Path(config.model.name) == CONFIG.parent / "models" / "qwen3-moe-tiny"
    config = small_config(config, parallel={"worker_num_cpus": 0.25})
    try:
        serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
        workers = actors.worker_actors(actors.replica_actor(APP))
        assert len(workers) == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/{APP}/v1",
                               api_key="unused", timeout=300)
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8,
            temperature=0, extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 8 and chat.choices[0].message.content
        stream = client.completions.create(model=model, prompt="Once upon a time",
                                           max_tokens=6, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        whole = client.completions.create(model=model, prompt="Once upon a time",
                                          max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert streamed == whole.choices[0].text  # greedy, streamed or not
    finally:
        serve.delete(APP)
