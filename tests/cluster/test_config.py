"""The deployment YAML schema: the shipped files load, mistakes are reported by key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetlm.cluster.config import (
    ClusterConfig,
    check_model_fits,
    load_config,
    pool_config,
    to_engine_config,
)
from fleetlm.executor.config import ParallelConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.http.host == "127.0.0.1"
    # The built-in model, or a random-weight config folder shipped beside the files.
    assert config.model.name == "smollm2-135m-instruct" or (
        config.model.random_weights
        and Path(config.model.name).parent == CONFIGS.resolve() / "models")
    check_model_fits(config)  # the model splits as each file says


@pytest.mark.parametrize(
    ("name", "tp", "pp"), [("tp3.yaml", 3, 1), ("pp2.yaml", 1, 2), ("tp3-pp2.yaml", 3, 2)]
)
def test_parallel_examples(name, tp, pp):
    parallel = to_engine_config(load_config(CONFIGS / name)).parallel
    assert (parallel.tensor_parallel_size, parallel.pipeline_parallel_size) == (tp, pp)
    assert parallel.is_distributed and parallel.worker_num_cpus < 1  # fits 2 cores


def test_two_replica_config_has_two_replicas():
    config = load_config(CONFIGS / "two-replicas.yaml")
    assert config.replicas.count == 2
    assert config.router.policy == "round_robin"


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = _write(tmp_path, "engine:\n  blok_size: 32\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "unknown key 'engine.blok_size'" in str(info.value)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'replica'"):
        load_config(_write(tmp_path, "replica:\n  count: 2\n"))


def test_bad_value_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="replicas.count"):
        load_config(_write(tmp_path, "replicas:\n  count: 0\n"))


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == ClusterConfig()


def test_non_mapping_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_old_prefix_aware_policy_names_its_replacements():
    with pytest.raises(ValueError, match="precise_prefix .* or approx_prefix"):
        ClusterConfig.model_validate({"router": {"policy": "prefix_aware"}})
    router = ClusterConfig.model_validate(
        {"router": {"policy": "approx_prefix", "saturation_threshold": 3}}).router
    assert (router.policy, router.saturation_threshold) == ("approx_prefix", 3)


def test_old_expert_parallel_size_key_names_its_replacement():
    with pytest.raises(ValueError, match="enable_expert_parallel"):
        ClusterConfig.model_validate({"parallel": {"expert_parallel_size": 4}})


def test_expert_parallel_keys_reach_the_engine():
    section = {"enable_expert_parallel": True, "expert_placement_strategy": "round_robin",
               "all2all_backend": "all_to_all"}
    parallel = ClusterConfig.model_validate({"parallel": section}).parallel.to_parallel_config()
    assert (parallel.enable_expert_parallel, parallel.expert_placement_strategy,
            parallel.all2all_backend) == (True, "round_robin", "all_to_all")
    with pytest.raises(ValueError, match="all2all_backend"):
        ClusterConfig.model_validate({"parallel": {"all2all_backend": "pplx"}})


def test_pd_pools_become_deployments_of_their_own():
    config = ClusterConfig.model_validate({
        "replicas": {"num_cpus": 0.5, "num_threads": 2},
        "engine": {"max_num_seqs": 8},
        "kv_transfer": {"transfer_timeout_s": 5},
        "pd": {"prefill": {"count": 2, "num_threads": 4,
                           "engine": {"max_num_batched_tokens": 4096}},
               "decode": {"count": 3, "parallel": {"tensor_parallel_size": 3}}}})
    prefill, decode = pool_config(config, "prefill"), pool_config(config, "decode")
    assert (prefill.replicas.count, prefill.replicas.num_threads, prefill.replicas.num_cpus,
            prefill.engine.max_num_batched_tokens, prefill.engine.max_num_seqs) == (
        2, 4, 0.5, 4096, 8)
    assert (decode.replicas.count, decode.parallel.tensor_parallel_size,
            decode.replicas.num_threads) == (3, 3, 2)
    assert (prefill.kv_transfer.role, decode.kv_transfer.role) == ("producer", "consumer")
    assert prefill.kv_transfer.transfer_timeout_s == decode.kv_transfer.transfer_timeout_s == 5
    assert prefill.pd is None and decode.pd is None
    assert ClusterConfig.model_validate(config.model_dump()) == config  # dumps reload


@pytest.mark.parametrize(("data", "message"), [
    ({"pd": {"enabled": True}}, "pd.enabled is gone"),
    ({"pd": {}, "replicas": {"count": 2}}, "replicas.count"),
    ({"pd": {}, "kv_transfer": {"role": "consumer"}}, "kv_transfer.role"),
    ({"pd": {}, "kv_transfer": {"transport": "inproc"}}, "tcp or shm"),
    ({"pd": {"decode": {"engine": {"max_num_seq": 4}}}}, "unknown keys \\['max_num_seq'\\]"),
    ({"pd": {"prefill": {"engine": {"block_size": 0}}}}, "pd.prefill: engine.block_size"),
    ({"pd": {"prefill": {"engine": {"block_size": 32}}}}, "block_size must be equal"),
])
def test_bad_pd_sections_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig.model_validate(data)


@pytest.mark.parametrize(("data", "message"), [
    ({"replicas": {"count": 2}}, "replicas.count: http.ingress 'in_replica'"),
    ({"replicas": {"autoscaling": {"max_replicas": 2}}}, "replicas.autoscaling: http.ingress"),
    ({"pd": {}}, "pd: http.ingress 'in_replica' serves from one engine replica"),
])
def test_an_ingress_in_the_replica_needs_one_replica(data, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig.model_validate({**data, "http": {"ingress": "in_replica"}})


def test_every_field_has_a_description():
    def walk(model_type):
        for name, field in model_type.model_fields.items():
            assert field.description, f"{model_type.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(ClusterConfig)


def test_to_engine_config_maps_every_section():
    config = ClusterConfig.model_validate({
        "model": {"name": "/models/x.gguf", "dtype": "float32", "max_model_len": 1024},
        "engine": {
            "block_size": 32,
            "kv_cache_memory_bytes": "64MiB",
            "max_num_seqs": 8,
            "max_num_batched_tokens": 512,
            "enable_prefix_caching": False,
            "max_num_waiting": 5,
        },
    })
    engine = to_engine_config(config)
    assert engine.model.model == "/models/x.gguf"
    assert engine.model.dtype == "float32"
    assert engine.model.max_model_len == 1024
    assert engine.cache.block_size == 32
    assert engine.cache.kv_cache_memory_bytes == 64 * 1024 * 1024
    assert engine.cache.enable_prefix_caching is False
    assert engine.scheduler.max_num_seqs == 8
    assert engine.scheduler.max_num_batched_tokens == 512
    assert engine.scheduler.max_num_waiting == 5
    assert engine.parallel.tensor_parallel_size == 1


def test_served_model_name_defaults_to_the_model():
    assert ClusterConfig().model.served_name == "smollm2-135m-instruct"
    named = ClusterConfig.model_validate({"model": {"served_model_name": "smol"}})
    assert named.model.served_name == "smol"


# ---- parallel ----------------------------------------------------------------------------


def test_parallel_keys_round_trip_into_the_engine_config(tmp_path):
    path = _write(tmp_path, """
parallel:
  tensor_parallel_size: 3
  pipeline_parallel_size: 2
  backend: gloo
  placement_strategy: SPREAD
  pipeline_layer_partition: [20, 10]
  max_batches_in_flight: 1
  control_plane: shm
  worker_num_cpus: 0.25
  worker_num_gpus: 0
""")
    assert to_engine_config(load_config(path)).parallel == ParallelConfig(
        tensor_parallel_size=3, pipeline_parallel_size=2, backend="gloo",
        placement_strategy="SPREAD", pipeline_layer_partition=(20, 10), max_batches_in_flight=1,
        control_plane="shm", worker_num_cpus=0.25, worker_num_gpus=0.0,
    )  # fmt: skip


def test_parallel_defaults_are_the_engines():
    assert to_engine_config(ClusterConfig()).parallel == ParallelConfig()


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ("tensor_parallel_size: 0", "parallel.tensor_parallel_size"),
        ("placement_strategy: DIAGONAL", "parallel.placement_strategy"),
        ("backend: mpi", "parallel.backend"),
        ("control_plane: carrier_pigeon", "parallel.control_plane"),
        ("worker_num_cpus: -1", "parallel.worker_num_cpus"),
        ("max_batches_in_flight: 0", "parallel.max_batches_in_flight"),
        ("tensor_parallel_siz: 2", "unknown key 'parallel.tensor_parallel_siz'"),
        ("pipeline_parallel_size: 2, pipeline_layer_partition: [30]",
         "parallel: pipeline_layer_partition [30] must have one entry per stage (2)"),
    ],
)
def test_bad_parallel_values_name_the_key_and_file(tmp_path, values, key):
    path = _write(tmp_path, f"parallel: {{{values}}}\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(path) in str(info.value) and key in str(info.value)


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ({"tensor_parallel_size": 2}, "tensor_parallel_size 2 does not divide 9 attention"),
        ({"tensor_parallel_size": 9}, "does not divide intermediate_size 1536"),
        ({"pipeline_parallel_size": 31}, "pipeline_parallel_size"),
        ({"pipeline_parallel_size": 2, "pipeline_layer_partition": [10, 10]}, "30"),
    ],
)
def test_impossible_splits_of_the_built_in_model(parallel, message):
    config = ClusterConfig.model_validate({"parallel": parallel})
    with pytest.raises(ValueError, match=message) as info:
        check_model_fits(config)
    assert str(info.value).startswith("parallel: ")


def test_a_model_not_found_here_is_left_to_the_replicas():
    config = ClusterConfig.model_validate({"model": {"name": "/nowhere/model.gguf"},
                                           "parallel": {"tensor_parallel_size": 2}})
    check_model_fits(config)  # no error: the cluster's nodes may have it


def test_a_worker_group_needs_a_replica_bundle():
    with pytest.raises(ValueError, match="replicas.num_cpus"):
        ClusterConfig.model_validate({"replicas": {"num_cpus": 0},
                                      "parallel": {"tensor_parallel_size": 3}})


def test_migration_section():
    assert ClusterConfig().migration.max_migrations == 3
    config = ClusterConfig.model_validate({"migration": {"max_migrations": 0, "timeout_s": 5}})
    assert (config.migration.is_enabled, config.migration.timeout_s) == (False, 5.0)
    with pytest.raises(ValueError, match="migration.timeout_s"):
        ClusterConfig.model_validate({"migration": {"timeout_s": 0}})


def test_speculative_section(tmp_path):
    path = _write(tmp_path, """
speculative:
  model: /models/draft
  num_speculative_tokens: 3
""")
    speculative = to_engine_config(load_config(path)).speculative
    assert (speculative.method, speculative.model, speculative.num_speculative_tokens) == (
        "draft_model", "/models/draft", 3)
    assert to_engine_config(ClusterConfig()).speculative is None


@pytest.mark.parametrize(("text", "message"), [
    ("speculative: {method: ngram, prompt_lookup_min: 9}", "prompt_lookup_min must be"),
    ("speculative: {method: ngram, lookahead: 2}", "unknown key 'speculative.lookahead'"),
    ("speculative: {method: ngram}\nparallel: {pipeline_parallel_size: 2}",
     "pipeline_parallel_size > 1 is not supported"),
])
def test_bad_speculative_sections(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, text))


def test_pd_examples_have_their_pools():
    config = load_config(CONFIGS / "pd.yaml")
    assert (config.pd.prefill.count, config.pd.decode.count) == (1, 1)
    assert pool_config(config, "prefill").engine.max_num_batched_tokens == 2048
    hetero = load_config(CONFIGS / "pd-tp3.yaml")
    decode = to_engine_config(pool_config(hetero, "decode"))
    prefill = to_engine_config(pool_config(hetero, "prefill"))
    assert (prefill.parallel.tensor_parallel_size, decode.parallel.tensor_parallel_size) == (1, 3)
    assert (prefill.kv_transfer.role, decode.kv_transfer.role) == ("producer", "consumer")


def test_a_pool_that_cannot_split_the_model_is_named():
    config = ClusterConfig.model_validate(
        {"pd": {"decode": {"parallel": {"tensor_parallel_size": 2}}}})
    with pytest.raises(ValueError, match="pd.decode.parallel: tensor_parallel_size 2"):
        check_model_fits(config)
