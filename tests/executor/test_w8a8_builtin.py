"""The built-in model quantized W8A8 (`fleetlm quantize`, round to nearest, no calibration)
against its float32 self on the 8 prompts of test_model_vs_hf.

SmolLM2-135M is a hard case for per-token int8 activations: a few hidden channels dwarf the
rest, so one scale per token leaves the others few levels and greedy paths part early (a
perturbation of the embeddings by 1e-6, relative, moves a W8A8 reference's prompt logprobs by
0.29 nats on average: the rounding, not fleetlm's kernel, decides; where greedy paths part
moves with any rounding change, such as fused CPU kernels). So the greedy text is judged by
the float model: how likely it finds the W8A8 model's text. `fleetlm quantize --smoothquant`
narrows the gap (test_quantize). The thresholds below are the measured figures with a
margin."""

from __future__ import annotations

import pytest
import torch
from test_model_vs_hf import PROMPTS, chat_ids

from fleetlm import LLM, SamplingParams
from fleetlm.executor.weights.quantize import quantize_checkpoint
from fleetlm.parallel.layers import weight_bytes

pytestmark = pytest.mark.slow  # two model loads and 8 x 32 tokens each: 140 s on 2 busy cores
MAX_TOKENS = 32
KV_BYTES = 64 << 20


@pytest.fixture(scope="module")
def llms(tmp_path_factory, builtin_dir):
    out = quantize_checkpoint("smollm2-135m-instruct", tmp_path_factory.mktemp("w8a8"),
                              progress=False)
    return (LLM(builtin_dir, dtype="float32", kv_cache_memory_bytes=KV_BYTES),
            LLM(str(out), dtype="float32", kv_cache_memory_bytes=KV_BYTES))


def _record_logits(llm: LLM) -> list[torch.Tensor]:
    """Every logits tensor the LM head computes from now on."""
    head = llm.engine.executor.runner.model.lm_head
    compute, seen = head.compute_logits, []

    def recorded(hidden):
        logits = compute(hidden)
        seen.append(logits.detach().clone())
        return logits

    head.compute_logits = recorded
    return seen


def _matrix_bytes(llm: LLM) -> int:
    model = llm.engine.executor.runner.model
    return sum(weight_bytes(p) for name, p in model.named_parameters()
               if name.endswith("proj.weight"))


def test_w8a8_logits_follow_the_float_model(llms):
    float_llm, w8a8_llm = llms
    assert _matrix_bytes(w8a8_llm) < _matrix_bytes(float_llm) / 3.9  # int8 + a scale per row
    prompts = [chat_ids(float_llm.get_tokenizer(), p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    float_seen, w8a8_seen = _record_logits(float_llm), _record_logits(w8a8_llm)
    float_llm.generate(prompts, params)
    w8a8_llm.generate(prompts, params)
    ours, theirs = torch.cat(w8a8_seen), torch.cat(float_seen)
    assert ours.shape == theirs.shape and ours.shape[0] >= sum(map(len, prompts)) - len(prompts)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    # Measured over 665 positions: cosine mean 0.987 (min 0.655), top-1 agreement 0.910,
    # largest logit difference 10.2 (logits up to 41.8).
    assert cosine.mean() > 0.98
    assert top1 > 0.88


def _text_nll(llm: LLM, prompts: list[list[int]], texts: list[list[int]]) -> list[float]:
    """The mean negative logprob per token that `llm` gives each prompt's continuation."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([p + t for p, t in zip(prompts, texts)], params)
    return [-sum(entry[0][1] for entry in out.prompt_logprobs[len(p):]) / len(t)
            for out, p, t in zip(outputs, prompts, texts)]


def test_w8a8_greedy_text_follows_the_float_model(llms):
    float_llm, w8a8_llm = llms
    prompts = [chat_ids(float_llm.get_tokenizer(), p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in w8a8_llm.generate(prompts, params)]
    theirs = [o.outputs[0].token_ids for o in float_llm.generate(prompts, params)]
    assert all(len(t) == MAX_TOKENS for t in ours)
    ours_nll, theirs_nll = _text_nll(float_llm, prompts, ours), _text_nll(float_llm, prompts, theirs)
    # Measured (nats per token, under the float model): W8A8's greedy text 0.77 on average
    # (0.16 to 1.40 by prompt), the float model's own 0.57; paths part after 3 tokens on
    # average. Text that went wrong (another language, repetition, noise) costs several nats.
    assert sum(ours_nll) / len(ours_nll) < sum(theirs_nll) / len(theirs_nll) + 0.5, ours_nll
    assert max(ours_nll) < 2.5, ours_nll
