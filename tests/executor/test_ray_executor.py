"""The engine on a Ray worker group equals the single-process engine: the greedy scenario
(greedy_scenario.py: chunked prefill, prefix hits, preemption) on a random-weight Llama with
tied embeddings (6 heads, 3 KV heads) at TP=3 x PP=2 on the `ray` control plane, and one
with 4 heads and 2 KV heads at TP=2. The built-in model's own weights run in worker groups
elsewhere: TP=3 and PP=2 across two hosts (tests/multihost), TP=3 replicas behind Ray Serve
(tests/cluster/test_parallel_serving.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from greedy_scenario import (
    ENGINE_ARGS,
    MAX_TOKENS,
    SECOND_BATCH,
    assert_same,
    check_exercised,
    run,
)

from fleetlm import LLM, SamplingParams
from fleetlm.executor.control import WorkerGroupError

WORKER_CPUS = 0.25  # six workers fit the session's two CPUs


# ---- small random Llamas saved in the Hugging Face format, the built-in model's tokenizer --

def _save_random_llama(folder: Path, builtin_dir: str, **shape) -> str:
    import torch
    import transformers

    from fleetlm.executor.weights import load_tokenizer

    config = transformers.LlamaConfig(max_position_embeddings=512, vocab_size=49152, **shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so logits are not flat
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    load_tokenizer(builtin_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def small_llama(builtin_dir, tmp_path_factory):
    return _save_random_llama(
        tmp_path_factory.mktemp("small-llama"), builtin_dir, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)


@pytest.mark.slow
def test_tp3_pp2_equals_single_process(ray_cluster, builtin_dir, tmp_path_factory):
    """Tied embeddings, as the built-in model's: the first stage's embedding and the last
    stage's LM head read the same tensor, each rank a third of it."""
    model = _save_random_llama(
        tmp_path_factory.mktemp("tp3-llama"), builtin_dir, hidden_size=96,
        intermediate_size=192, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=3, head_dim=16, tie_word_embeddings=True)
    with LLM(model, **ENGINE_ARGS) as llm:
        reference = run(llm)
    check_exercised(reference)
    tp, pp = 3, 2
    with LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, control_plane="ray",
             worker_num_cpus=WORKER_CPUS, **ENGINE_ARGS) as llm:
        executor = llm.engine.executor
        assert len(executor.workers) == tp * pp
        assert executor.num_blocks == 16
        got = run(llm)
        bytes_read = executor.collective_rpc(lambda w: w.runner.weights_read.num_bytes)
    assert_same(got, reference)
    # Each rank read about its own share of its stage's part of the checkpoint (the tied
    # embedding, the first and last stage's, split too), never all of it.
    checkpoint_bytes = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    share = 1.0 / tp + 0.02  # norms are read whole by every rank
    assert all(n < share * checkpoint_bytes for n in bytes_read), bytes_read


SMALL_ARGS = dict(dtype="float32", kv_cache_memory_bytes=4 << 20)
SMALL_PROMPTS = ["Hello there, how are you?", "1, 2, 3, 4, 5,", "Le chat est"]


def _drive(engine, params_list) -> list[list[int]]:
    for i, (prompt, params) in enumerate(zip(SMALL_PROMPTS, params_list)):
        engine.add_request(str(i), prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    return [finished[str(i)] for i in range(len(SMALL_PROMPTS))]


@pytest.mark.slow
def test_random_llama_at_tp2_equals_single_process_on_every_rank(ray_cluster, small_llama):
    """Greedy, seeded and unseeded sampled requests; every rank replies and the last stage's
    ranks must agree on every sampled token (the executor checks each step)."""
    from fleetlm.executor.engine import LLMEngine
    from fleetlm.executor.llm import make_engine_config
    from fleetlm.executor.ray_executor import RayExecutor

    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=MAX_TOKENS, ignore_eos=True)]
    reference = _drive(LLMEngine(make_engine_config(small_llama, **SMALL_ARGS)), params)
    config = make_engine_config(small_llama, tensor_parallel_size=2, worker_num_cpus=0.5,
                                **SMALL_ARGS)
    engine = LLMEngine(config, RayExecutor(config, collect_all_ranks=True))
    try:
        assert engine.executor.reply_ranks == [0, 1]
        got = _drive(engine, params)
    finally:
        engine.shutdown()
    # Unseeded requests draw from the sampler's generator, seeded from model.seed alike on
    # every rank and in the single process: the same batches draw the same tokens.
    assert got == reference


@pytest.mark.slow
def test_cache_size_is_the_minimum_over_uneven_stages(ray_cluster, small_llama):
    with LLM(small_llama, pipeline_parallel_size=2, pipeline_layer_partition=[2, 1],
             worker_num_cpus=0.5, **SMALL_ARGS) as llm:
        executor = llm.engine.executor
        per_rank = executor.collective_rpc(lambda w: w.runner.num_available_blocks())
        layers = executor.collective_rpc(lambda w: len(w.runner.model.layers))
        assert layers == [2, 1]
        assert per_rank[0] * 2 == per_rank[1]  # a stage with twice the layers fits half
        assert executor.num_blocks == per_rank[0]
        out = llm.generate(SMALL_PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4))
        assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.slow
def test_a_killed_worker_fails_the_group_at_once_and_never_hangs(ray_cluster, small_llama):
    import threading

    import ray

    from fleetlm.executor.engine import LLMEngine
    from fleetlm.executor.llm import make_engine_config

    config = make_engine_config(small_llama, tensor_parallel_size=2, worker_num_cpus=0.5,
                                **SMALL_ARGS)
    engine = LLMEngine(config)
    failed = threading.Event()
    errors: list[BaseException] = []
    engine.executor.add_failure_listener(lambda e: (errors.append(e), failed.set()))
    try:
        engine.add_request("r", "Once upon a time",
                           SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        engine.step()
        ray.kill(engine.executor.workers[1])  # idle between steps
        assert failed.wait(timeout=5.0), "the failure listener was not called"
        assert not engine.executor.is_healthy
        assert "worker 1" in str(errors[0])
        with pytest.raises(WorkerGroupError):
            engine.step()  # a clean error, not a hang
    finally:
        engine.shutdown()


# ---- GPUs: skipped without them (CI has none) -----------------------------------------------

@pytest.mark.gpu
def test_one_cuda_worker_through_ray_equals_the_local_cuda_engine(ray_cluster, builtin_dir):
    """The single-GPU path of the worker: TP=1 forced through RayExecutor, NCCL-free."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = SECOND_BATCH
    with LLM(builtin_dir, device="cuda", dtype="float32") as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    with LLM(builtin_dir, device="cuda", dtype="float32", executor_backend="ray",
             worker_num_cpus=0.1) as llm:
        assert llm.engine.executor.config.parallel.world_size == 1
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected


@pytest.mark.multi_gpu
def test_tp2_over_nccl_equals_one_gpu(ray_cluster, builtin_dir):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(builtin_dir, device="cuda", dtype="float32") as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(SECOND_BATCH, params)]
    with LLM(builtin_dir, device="cuda", dtype="float32", tensor_parallel_size=2,
             backend="nccl", worker_num_cpus=0.1) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(SECOND_BATCH, params)]
    assert got == expected


@pytest.mark.slow
def test_speculative_decoding_on_a_worker_group(ray_cluster, small_llama):
    """Drafts proposed by the output rank and verified by every rank: greedy output equals
    the single process without speculation."""
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)] * 3
    from fleetlm.executor.engine import LLMEngine
    from fleetlm.executor.llm import make_engine_config

    reference = _drive(LLMEngine(make_engine_config(small_llama, **SMALL_ARGS)), params)
    config = make_engine_config(
        small_llama, tensor_parallel_size=2, worker_num_cpus=0.5, **SMALL_ARGS,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                            "prompt_lookup_min": 1, "min_acceptance_rate": 0.0})
    engine = LLMEngine(config)
    try:
        assert _drive(engine, params) == reference
        assert engine.stats().spec_num_draft_tokens > 0
    finally:
        engine.shutdown()
