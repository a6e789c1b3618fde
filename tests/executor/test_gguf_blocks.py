"""`quantization: gguf` on a tiny GGUF file written here with a mix of types: q/k Q4_0 and
v Q8_0 (one fused qkv matrix of two types), gate Q4_1 and up Q8_0, down F16, a Q8_0
embedding and an F32 LM head (untied). The same file dequantized on load is the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_weights import NUM_LAYERS, gguf_tensors, tiny_hf_tensors, write_tiny_gguf

from fleetlm import LLM, SamplingParams
from fleetlm.executor.attention import AttentionMetadata
from fleetlm.executor.weights import (
    iterate_gguf_weights,
    iterate_weights,
    load_hf_config,
    resolve_model,
)
from fleetlm.kernels import decode_stack, gguf_linear
from fleetlm.kernels.gguf_linear import GGUFWeight
from fleetlm.parallel.layers import whole

LAYER_TYPES = {"attn_q": T.Q4_0, "attn_k": T.Q4_0, "attn_v": T.Q8_0, "attn_output": T.Q4_1,
               "ffn_gate": T.Q4_1, "ffn_up": T.Q8_0, "ffn_down": T.F16}
TYPES = {"token_embd.weight": T.Q8_0, **{
    f"blk.{i}.{name}.weight": qtype for i in range(NUM_LAYERS)
    for name, qtype in LAYER_TYPES.items()}}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    path = root / "mixed.gguf"
    hf = tiny_hf_tensors(np.random.default_rng(0))
    for name, w in hf.items():  # weight-sized values, so that logits are not saturated
        hf[name] = w * 0.1 if w.ndim == 2 else w
    write_tiny_gguf(path, hf, TYPES)
    assert set(TYPES) <= set(gguf_tensors(hf))
    return path


def test_blocks_keep_their_types_and_dequantize_to_the_converted_folder(mixed_gguf):
    model_dir = resolve_model(str(mixed_gguf), cache_dir=mixed_gguf.parent / "cache")
    converted = dict(iterate_gguf_weights(mixed_gguf, load_hf_config(model_dir),
                                          progress=False))
    q = converted["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, GGUFWeight) and q.qtype == T.Q4_0
    assert converted["model.layers.1.mlp.down_proj.weight"].qtype == T.F16
    assert converted["lm_head.weight"].qtype == T.F32
    assert isinstance(converted["model.norm.weight"], torch.Tensor)
    for name, tensor in iterate_weights(model_dir, progress=False):  # q/k rows unpermuted
        assert torch.equal(whole(converted[name]), whole(tensor)), name


@pytest.mark.parametrize(("int8_dot", "tolerance"), [(False, 1e-4), (True, 2e-2)])
def test_quantized_model_follows_the_dequantized_one(mixed_gguf, monkeypatch, int8_dot,
                                                     tolerance):
    """Greedy tokens equal the dequantized model's; logprobs equal them to summation order
    with fp32 activations, and move by at most 0.02 nats (measured: 0.005) when steps under
    64 tokens round the activations to int8 per block for integer dot products."""
    monkeypatch.setattr(gguf_linear, "_INT8_DOT", int8_dot)
    common = {"dtype": "float32", "kv_cache_memory_bytes": 4 << 20, "seed": 0}
    quantized = LLM(str(mixed_gguf), quantization="gguf", **common)
    reference = LLM(str(mixed_gguf), **common)
    model = quantized.engine.executor.runner.model
    assert model.layers["0"].self_attn.qkv_proj.weight.quantized.qtypes == ["Q4_0", "Q8_0"]
    assert model.layers["0"].mlp.gate_up_proj.weight.quantized.qtypes == ["Q4_1", "Q8_0"]
    prompts = [[1, 3, 4, 5], [1, 7, 8], [2, 3, 3, 3, 6, 7, 8, 4]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    for ours, theirs in zip(quantized.generate(prompts, params),
                            reference.generate(prompts, params)):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        assert len(ours.outputs[0].logprobs) == 8
        for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs):
            assert a[0][1] == pytest.approx(b[0][1], abs=tolerance)  # sampled token's logprob


# Every matrix of a layer whole in one integer-dot type: the native decode stack's case; the
# LM head too (Q8_0, as SmolLM2's), so that greedy steps take it in the same call.
PLAIN_TYPES = {"output.weight": T.Q8_0, **{
    f"blk.{i}.{name}.weight": qtype for i in range(NUM_LAYERS)
    for name, qtype in {"attn_q": T.Q4_0, "attn_k": T.Q4_0, "attn_v": T.Q4_0,
                        "attn_output": T.Q4_1, "ffn_gate": T.Q8_0, "ffn_up": T.Q8_0,
                        "ffn_down": T.Q4_1}.items()}}


@pytest.fixture(scope="module")
def plain_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "plain.gguf"
    hf = tiny_hf_tensors(np.random.default_rng(1))
    for name, w in hf.items():
        hf[name] = w * 0.1 if w.ndim == 2 else w
    write_tiny_gguf(path, hf, PLAIN_TYPES)
    return path


@pytest.fixture(scope="module", params=["auto", "int8"])
def plain_llm(plain_gguf, request):
    """The plain model over an fp32 KV cache and over an int8 one."""
    # No prefix caching: a second run of a prompt must prefill it the same way.
    return LLM(str(plain_gguf), quantization="gguf", dtype="float32", block_size=4,
               kv_cache_dtype=request.param, enable_prefix_caching=False,
               kv_cache_memory_bytes=4 << 20, seed=0)


def _count_stack_runs(monkeypatch) -> list[int]:
    """Patches DecodeStack.run and run_model to count their calls (rows of each; a whole
    model's call as a negative count)."""
    calls: list[int] = []
    for name, sign in (("run", 1), ("run_model", -1)):
        def counted(self, rows, *args, _run=getattr(decode_stack.DecodeStack, name), _sign=sign):
            calls.append(_sign * rows.shape[0])
            return _run(self, rows, *args)

        monkeypatch.setattr(decode_stack.DecodeStack, name, counted)
    return calls


def test_native_decode_stack_equals_the_layer_loop(plain_llm, monkeypatch):
    """Decode steps through the one native call (embedding, every layer and the final norm)
    give the layer loop's logprobs bit for bit, over prompts of different lengths crossing
    4-token blocks; prefill steps, and decode steps without int8 products, keep the loop."""
    calls = _count_stack_runs(monkeypatch)
    prompts = [[1, 3, 4, 5], [1, 7, 8], [2, 3, 3, 3, 6, 7, 8, 4, 5, 6]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)

    def run(native: str) -> list:
        monkeypatch.setenv(decode_stack.ENV, native)
        return [(out.outputs[0].token_ids, out.outputs[0].logprobs)
                for out in plain_llm.generate(prompts, params)]

    native = run("1")
    assert calls and min(calls) == -3 and max(calls) < 0  # every decode step of the three,
    # a whole model's call each, none of the prefills
    assert plain_llm.engine.executor.runner.model._native_stack is not None
    calls.clear()
    assert run("0") == native and not calls
    # Without the ends (a pipeline stage, a packed embedding) the model's Python runs them
    # around the layers' call, with the same result.
    model = plain_llm.engine.executor.runner.model
    monkeypatch.setattr(model, "_decode_ends", lambda: None)
    model._is_stack_made = False
    assert run("1") == native and calls and min(calls) > 0
    calls.clear()
    monkeypatch.setattr(gguf_linear, "_INT8_DOT", False)
    run("1")
    assert not calls
    model._is_stack_made = False  # the next test's stack has its ends again


def _native_and_loop(llm, monkeypatch, prompts, params, threads) -> dict[str, list]:
    """Token ids and logprobs of `prompts` through the native call and the layer loop, with
    torch (and so both) on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = {}
        for native in ("1", "0"):
            monkeypatch.setenv(decode_stack.ENV, native)
            results[native] = [(out.outputs[0].token_ids, out.outputs[0].logprobs)
                               for out in llm.generate(prompts, params)]
        return results
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [2, 3])
def test_stack_as_one_team_equals_the_layer_loop(plain_llm, monkeypatch, threads):
    """Below csrc/decode_stack.c's TEAM_MAX_ROWS rows, on more than one thread, the native call
    runs its layers as one team (one region, products and attention shared out by hand,
    team.h's barrier between): attention, which the loop runs on one thread at these lengths,
    shared out by kv heads. One and two sequences at a time, and with more threads than this
    machine's cores (a barrier that sleeps): its logprobs equal the layer loop's bit for
    bit."""
    prompts = [[1, 3, 4, 5], [2, 3, 3, 3, 6, 7]]
    params = SamplingParams(temperature=0, max_tokens=110, ignore_eos=True, logprobs=3)
    for batch in (prompts[:1], prompts):
        results = _native_and_loop(plain_llm, monkeypatch, batch, params, threads)
        assert results["1"] == results["0"]


def test_team_attention_splits_long_sequences_into_spans_as_a_region_does(
        plain_gguf, tmp_path, monkeypatch):
    """Past 256 kv tokens (and 2,304 = tokens x heads of work) decode attention splits a
    sequence's tokens into spans, one per thread, merged at the end: a team does it where a
    region does, with the same spans, so the native call still equals the loop bit for bit."""
    path = tmp_path / "long.gguf"
    hf = tiny_hf_tensors(np.random.default_rng(1))
    write_tiny_gguf(path, {name: w * 0.1 if w.ndim == 2 else w for name, w in hf.items()},
                    PLAIN_TYPES, context_length=1024)
    llm = LLM(str(path), quantization="gguf", dtype="float32", block_size=16,
              kv_cache_dtype="int8", enable_prefix_caching=False,
              kv_cache_memory_bytes=4 << 20, seed=0)
    params = SamplingParams(temperature=0, max_tokens=600, ignore_eos=True, logprobs=1)
    results = _native_and_loop(llm, monkeypatch, [[1, 3, 4, 5]], params, threads=2)
    assert results["1"] == results["0"]


def test_greedy_steps_take_the_lm_head_and_argmax_in_the_same_call(plain_llm, monkeypatch):
    """Where every row of a decode step is a plain greedy sample (no logprobs, penalties,
    grammar or drafts), its tokens come from one native call that runs the LM head and the
    argmax after the model: the tokens of the layer loop and the sampler. A batch with a row
    asking for logprobs takes the sampler, with the same tokens."""
    calls: list[int] = []
    original = decode_stack.DecodeStack.run_model_argmax

    def counted(self, ids, *args):
        calls.append(ids.shape[0])
        return original(self, ids, *args)

    monkeypatch.setattr(decode_stack.DecodeStack, "run_model_argmax", counted)
    prompts = [[1, 3, 4, 5], [1, 7, 8], [2, 3, 3, 3, 6, 7, 8, 4, 5, 6]]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def run(native: str, params=greedy) -> list:
        monkeypatch.setenv(decode_stack.ENV, native)
        return [out.outputs[0].token_ids for out in plain_llm.generate(prompts, params)]

    native = run("1")
    assert calls and max(calls) == 3  # the three sequences' decode steps
    calls.clear()
    assert run("0") == native and not calls
    asking = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    assert run("1", [greedy, greedy, asking]) == native and not calls


def test_greedy_native_call_takes_inputs_of_other_dtypes(plain_llm):
    """`run_model_argmax` converts int32 ids and positions (and any metadata not in the C
    call's dtypes) before the call: the same tokens as with the dtypes a decode step passes."""
    plain_llm.generate([[1, 3, 4]], SamplingParams(temperature=0, max_tokens=2))
    runner = plain_llm.engine.executor.runner
    stack = runner.model._native_stack
    assert stack is not None and stack.has_head
    ids, positions = torch.tensor([1, 2]), torch.tensor([0, 0])
    slots = torch.tensor([0, 4])  # two sequences, one block each, block_size 4
    seq_lens, tables = torch.tensor([1, 1], dtype=torch.int32), torch.tensor([[0], [1]])
    tokens = stack.run_model_argmax(ids, positions, runner.kv_caches, slots, seq_lens,
                                    tables.to(torch.int32))
    again = stack.run_model_argmax(ids.to(torch.int32), positions.to(torch.int32),
                                   runner.kv_caches, slots.to(torch.int32), seq_lens.long(),
                                   tables)
    assert again == tokens and len(tokens) == 2


def test_whole_model_step_rejects_ids_and_positions_outside_its_tables(plain_llm):
    """A token id past the vocabulary or a position past the rotary tables is an IndexError
    before any layer runs, and the model serves on."""
    greedy = SamplingParams(temperature=0, max_tokens=3)
    first = plain_llm.generate([[1, 3, 4]], greedy)[0].outputs[0].token_ids
    runner = plain_llm.engine.executor.runner
    stack = runner.model._native_stack
    assert stack.ends is not None
    vocab, max_position = stack.ends.embedding.shape[0], stack.ends.cos.shape[0]
    one = (torch.tensor([0]), torch.tensor([1], dtype=torch.int32),
           torch.tensor([[0]], dtype=torch.int32))
    with pytest.raises(IndexError, match="embedding: a token id is past the vocabulary"):
        stack.run_model(torch.tensor([vocab]), torch.tensor([0]), runner.kv_caches, *one)
    with pytest.raises(IndexError, match="rotary: a position is past the rotary tables"):
        stack.run_model(torch.tensor([1]), torch.tensor([max_position]), runner.kv_caches, *one)
    assert plain_llm.generate([[1, 3, 4]], greedy)[0].outputs[0].token_ids == first


def test_stack_errors_name_the_layer_and_stage(plain_llm):
    plain_llm.generate([[1, 3, 4]], SamplingParams(max_tokens=2))
    runner = plain_llm.engine.executor.runner
    stack = runner.model._native_stack
    hidden, cos = torch.randn(1, 64), torch.zeros(1, 1, 8)
    num_slots = runner.kv_caches[0][0].shape[0] * runner.kv_caches[0][0].shape[1]
    args = (cos, cos, runner.kv_caches)
    with pytest.raises(ValueError, match="layer 0, KV-cache write: a slot is outside"):
        stack.run(hidden.clone(), None, *args, torch.tensor([num_slots]),
                  torch.tensor([1]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="layer 0, attention: a block table row"):
        stack.run(hidden.clone(), None, *args, torch.tensor([0]),
                  torch.tensor([1]), torch.tensor([[1 << 20]]))
    with pytest.raises(ValueError, match="1 KV caches for 2 layers"):
        stack.run(hidden.clone(), None, cos, cos, runner.kv_caches[:1], torch.tensor([0]),
                  torch.tensor([1]), torch.tensor([[0]]))
    wrong = [(k[..., :-1], v) for k, v in runner.kv_caches]  # not contiguous, a row too short
    with pytest.raises(ValueError, match="does not fit 2 kv heads of 16"):
        stack.run(hidden.clone(), None, cos, cos, wrong, torch.tensor([0]),
                  torch.tensor([1]), torch.tensor([[0]]))
    out = plain_llm.generate([[1, 3, 4]], SamplingParams(temperature=0, max_tokens=3))
    assert len(out[0].outputs[0].token_ids) == 3  # the stack's own caches again


def test_stack_only_for_whole_int8_dot_matrices(mixed_gguf, plain_llm):
    """A fused qkv of two types, or float weights, keep the layer loop."""
    common = {"dtype": "float32", "kv_cache_memory_bytes": 4 << 20}
    mixed = LLM(str(mixed_gguf), quantization="gguf", **common).engine.executor.runner.model
    assert mixed._make_decode_stack() is None
    dense = LLM(str(mixed_gguf), **common).engine.executor.runner.model
    assert dense._make_decode_stack() is None
    assert plain_llm.engine.executor.runner.model._make_decode_stack() is not None


def test_stack_takes_a_residual_as_a_later_pipeline_stage_does(plain_llm):
    """Given a residual (what a pipeline stage after the first receives), the stack equals
    the layer loop over two rows, bit for bit (the KV written and read back through either
    cache dtype)."""
    model = plain_llm.engine.executor.runner.model
    caches = plain_llm.engine.executor.runner.kv_caches
    plain_llm.generate([[1, 3, 4]], SamplingParams(max_tokens=2))
    stack = model._native_stack
    generator = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(2, 2, 64, generator=generator)
    cos, sin = model.rotary.cos_sin(torch.tensor([3, 5]))
    slots, seq_lens = torch.tensor([1, 5]), torch.tensor([2, 2], dtype=torch.int32)
    tables = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    meta = AttentionMetadata(slots, 2, tables, seq_lens, 0, torch.zeros(1, dtype=torch.int32),
                             torch.zeros(0, dtype=torch.int32),
                             torch.zeros(0, 1, dtype=torch.int32), False)
    ours = stack.run(hidden.clone(), residual.clone(), cos, sin, caches, slots, seq_lens, tables)
    theirs = (hidden.clone(), residual.clone())
    for layer, kv_cache in zip(model.layers.values(), caches):
        theirs = layer((cos, sin), *theirs, kv_cache, meta)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_stack_rebinds_to_a_new_list_of_caches(plain_llm):
    """The stack keeps the list of caches it bound last (the runner passes the same list every
    step); another list is bound anew: its caches are written, the runner's are not, and the
    next step binds the runner's again."""
    runner = plain_llm.engine.executor.runner
    greedy = SamplingParams(temperature=0, max_tokens=4)
    first = plain_llm.generate([[1, 3, 4]], greedy)[0].outputs[0].token_ids
    stack = runner.model._native_stack
    other = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    before = [k.clone() for k, _ in runner.kv_caches]
    hidden, cos = torch.randn(1, 64), torch.zeros(1, 1, 8)
    stack.run(hidden, None, cos, cos, other, torch.tensor([7]),
              torch.tensor([8], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32))
    assert all(torch.equal(k, b) for (k, _), b in zip(runner.kv_caches, before))
    assert not torch.equal(other[0][0][1, 3], before[0][1, 3])  # slot 7: block 1, row 3
    assert plain_llm.generate([[1, 3, 4]], greedy)[0].outputs[0].token_ids == first
