"""Mixture-of-experts models: Qwen3-MoE, Qwen2-MoE and Mixtral against transformers' own
implementations (random weights saved in the Hugging Face format, float32: greedy tokens
equal, logprobs close), and on Ray worker groups (expert parallelism over 2 and 3 ranks with
both dispatch backends, and tensor-parallel experts) against one process."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_model_vs_hf import PROMPTS, assert_matches_hf

from fleetlm import LLM, SamplingParams
from fleetlm.executor.weights import load_tokenizer
from fleetlm.parallel.experts import ExpertPlacement

ATTENTION = {"num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 6,
                 "head_dim": 16, "hidden_size": 96, "max_position_embeddings": 1024, "vocab_size": 49152,
                 "tie_word_embeddings": False}
MOE_MODELS = {
    # 8 experts, top-2, renormalised; layer 1 is dense (mlp_only_layers)
    "qwen3-moe": transformers.Qwen3MoeConfig(
        **ATTENTION, intermediate_size=96, moe_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    # 6 experts (not divisible by 4), top-2, always renormalised
    "mixtral": transformers.MixtralConfig(
        **ATTENTION, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
        sliding_window=None),
    # top-k weights not renormalised, a shared expert behind a sigmoid gate
    "qwen2-moe": transformers.Qwen2MoeConfig(
        **ATTENTION, intermediate_size=96, moe_intermediate_size=48,
        shared_expert_intermediate_size=72, num_experts=8, num_experts_per_tok=2),
}
ENGINE = {"dtype": "float32", "kv_cache_memory_bytes": 16 << 20}


def save_random_model(config, folder, builtin_dir):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so logits and routing are not flat
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    load_tokenizer(builtin_dir).save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MOE_MODELS))
def test_moe_models_match_transformers(name, builtin_dir, tmp_path):
    hf_model = save_random_model(MOE_MODELS[name], tmp_path, builtin_dir)
    with LLM(str(tmp_path), **ENGINE) as llm:
        tokenizer = llm.get_tokenizer()
        prompts_ids = [tokenizer.encode(p) for p in PROMPTS[:4]] + [
            tokenizer.encode(PROMPTS[7])[:300]]
        assert_matches_hf(llm, hf_model, prompts_ids, 12)


def test_random_weight_config_folder_with_a_named_tokenizer():
    """configs/models/qwen3-moe-tiny holds only config.json; the tokenizer is the built-in's."""
    from pathlib import Path

    folder = Path(__file__).parents[2] / "configs" / "models" / "qwen3-moe-tiny"
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    with LLM(str(folder), random_weights=True, tokenizer="smollm2-135m-instruct",
             **ENGINE) as llm:
        out = llm.chat([{"role": "user", "content": "Hi"}],
                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 5
        assert llm.get_tokenizer().chat_template  # the built-in model's


@pytest.fixture(scope="module")
def qwen3_moe(builtin_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-moe")
    save_random_model(MOE_MODELS["qwen3-moe"], folder, builtin_dir)
    return str(folder)


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
GROUP_PROMPTS = ["Hello there, how are you?", "1, 2, 3,", PROMPTS[7][:400]]


def _expert_numel(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)


@pytest.mark.slow
@pytest.mark.parametrize("tp, parallel", [
    (2, {"enable_expert_parallel": True}),
    (3, {"enable_expert_parallel": True, "all2all_backend": "all_to_all",
             "expert_placement_strategy": "round_robin"}),
    (2, {}),  # tensor-parallel experts
], ids=["ep2-allgather", "ep3-all-to-all-round-robin", "tp2-experts"])
def test_worker_group_equals_one_process(ray_cluster, qwen3_moe, tp, parallel):
    with LLM(qwen3_moe, **ENGINE) as llm:
        reference = [o.outputs[0].token_ids for o in llm.generate(GROUP_PROMPTS, GREEDY)]
        whole = _expert_numel(llm.engine.executor.runner.model)
    with LLM(qwen3_moe, tensor_parallel_size=tp, worker_num_cpus=0.5, **parallel,
             **ENGINE) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(GROUP_PROMPTS, GREEDY)]
        # (a lambda: the workers cannot import this test module)
        per_rank = llm.engine.executor.collective_rpc(lambda w: sum(
            p.numel() for n, p in w.runner.model.named_parameters() if ".mlp.experts." in n))
    assert got == reference
    assert sum(per_rank) == whole  # every expert weight is held exactly once
    if parallel:  # each rank holds its experts whole: 3 or 4 of 8 experts' worth
        placement = ExpertPlacement(8, tp, parallel.get("expert_placement_strategy", "linear"))
        per_expert = whole // 8
        assert per_rank == [len(placement.local_experts(r)) * per_expert for r in range(tp)]
    else:  # each rank holds half of every expert
        assert per_rank == [whole // 2] * 2


def test_impossible_parallel_layouts_are_named():
    from fleetlm.executor.config import ParallelConfig

    qwen3_moe, mixtral = MOE_MODELS["qwen3-moe"], MOE_MODELS["mixtral"]
    dense = transformers.LlamaConfig(**{**ATTENTION, "intermediate_size": 96},
                                     architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True).check_fits(dense)
    two_experts = mixtral.__class__(**{**mixtral.to_dict(), "num_local_experts": 2})
    with pytest.raises(ValueError, match="at least 3 experts; the model has 2"):
        ParallelConfig(tensor_parallel_size=3, enable_expert_parallel=True).check_fits(two_experts)
    with pytest.raises(ValueError, match="moe_intermediate_size 50 .*enable_expert_parallel"):
        ParallelConfig(tensor_parallel_size=6).check_fits(qwen3_moe.__class__(
            **{**qwen3_moe.to_dict(), "moe_intermediate_size": 50}))
    # Expert parallelism does not split the experts: any expert width fits.
    ParallelConfig(tensor_parallel_size=3, enable_expert_parallel=True).check_fits(mixtral)
