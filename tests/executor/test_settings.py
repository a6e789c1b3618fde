"""One definition of every setting: the offline keywords, the YAML schema and the engine's
dataclasses agree on names, defaults and checks."""

from __future__ import annotations

import dataclasses

import pytest

from fleetlm.cluster.config import ClusterConfig, to_engine_config
from fleetlm.executor.config import EngineConfig, ParallelConfig, SpeculativeConfig
from fleetlm.executor.llm import make_engine_config
from fleetlm.executor.settings import EngineArgs


def test_the_defaults_of_the_keywords_the_yaml_and_the_dataclasses_agree():
    assert make_engine_config() == to_engine_config(ClusterConfig()) == EngineConfig()
    assert SpeculativeConfig.from_section(ClusterConfig.model_validate(
        {"speculative": {}}).speculative) == SpeculativeConfig()


def test_keywords_reach_their_sections():
    config = make_engine_config("m.gguf", tensor_parallel_size=2, enable_expert_parallel=True,
                                dtype="float32", block_size=32, max_num_seqs=3,
                                kv_cache_memory_bytes="16MiB", random_weights=True,
                                speculative_config={"method": "ngram"})
    assert (config.model.model, config.model.dtype, config.model.random_weights) == (
        "m.gguf", "float32", True)
    assert (config.cache.block_size, config.cache.kv_cache_memory_bytes) == (32, 16 << 20)
    assert config.scheduler.max_num_seqs == 3
    assert config.parallel == ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True)
    assert config.speculative == SpeculativeConfig()


def test_every_parallel_setting_is_an_engine_field():
    names = {f.name for f in dataclasses.fields(ParallelConfig)}
    assert set(EngineArgs.model_fields["parallel"].annotation.model_fields) == names


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size: Input should be greater than or equal"),
    ({"dtype": "int3"}, "dtype: Input should be"),
    ({"all2all_backend": "pplx"}, "all2all_backend"),
    ({"pipeline_parallel_size": 2, "pipeline_layer_partition": [30]},
     "pipeline_layer_partition [30] must have one entry per stage (2)"),
    ({"speculative_config": {"method": "ngram", "lookahead": 3}},
     "unknown key 'speculative_config.lookahead'"),
    ({"quantization": "fp8"}, "quantization: 'fp8' is not supported"),
])
def test_bad_values_name_the_keyword(kwargs, message):
    with pytest.raises(ValueError) as info:
        make_engine_config(**kwargs)
    assert message in str(info.value)


def test_an_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unknown engine argument 'tensor_paralel_size'"):
        make_engine_config(tensor_paralel_size=2)
