"""Structured outputs in the engine: the grammar mask in the sampler, the runner's grammar
state (drafts, replay after preemption), and the built-in model constrained end to end."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from fleetlm import LLM
from fleetlm.executor.sampler import Sampler
from fleetlm.executor.sampling_metadata import SamplingMetadata
from fleetlm.executor.sampling_params import SamplingParams, StructuredOutputsParams
from fleetlm.executor.structured import GrammarBackend, RequestGrammars
from fleetlm.executor.structured.request_grammars import MaskRequest
from fleetlm.executor.weights import load_tokenizer
from fleetlm.executor.wire import decode, encode

VOCAB = 64
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person:", "Write JSON about Bob.", "A record:", "Once upon a time"]
ENGINE_ARGS = {"dtype": "float32", "block_size": 16, "num_blocks": 12, "max_num_seqs": 8,
               "max_model_len": 512}


def _json(schema=PERSON) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=schema)


# ---- the sampler's mask --------------------------------------------------------------------


def _bitmask(allowed: dict[int, list[int]], num_rows: int) -> torch.Tensor:
    """xgrammar's layout: token t is bit t % 32 of int32 word t // 32 (1: allowed)."""
    bits = np.zeros((num_rows, VOCAB), dtype=bool)
    for row, tokens in allowed.items():
        bits[row, tokens] = True
    packed = np.packbits(bits, axis=1, bitorder="little")
    return torch.from_numpy(packed.view("<i4").copy())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_masked_rows_sample_only_allowed_tokens_and_others_are_untouched(temperature):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    allowed = {0: [5, 40, 63], 2: [33]}
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(3)]
    params[0] = SamplingParams(temperature=temperature)  # unseeded: 20 draws vary
    build = {"params": params, "prompt_token_ids": [[1]] * 3, "output_token_ids": [[]] * 3,
             "eos_token_ids": [None] * 3, "vocab_size": VOCAB, "device": "cpu"}
    for _ in range(20):  # fresh metadata each time: its seeded generators are consumed
        masked = SamplingMetadata.build(**build)
        masked.grammar_bitmask, masked.grammar_rows = _bitmask(allowed, 3), [0, 2]
        got = Sampler()(logits.clone(), masked).sampled_token_ids.tolist()
        free = Sampler()(logits.clone(), SamplingMetadata.build(**build)).sampled_token_ids
        assert got[0] in allowed[0] and got[2] == 33
        assert got[1] == free[1].item()  # seeded or greedy: the unmasked row is unchanged


def test_a_constraint_crosses_the_wire_and_is_checked():
    params = SamplingParams(structured_outputs=_json())
    assert decode(encode(params)) == params
    assert json.loads(params.structured_outputs.json) == PERSON
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="non-empty strings"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="min_tokens must be 0 with structured_outputs"):
        SamplingParams(min_tokens=2, structured_outputs=_json())


# ---- the runner's grammar state ----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(builtin_dir):
    return load_tokenizer(builtin_dir)


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(tokenizer, tokenizer.vocab_size)


def _masks(grammars: RequestGrammars, requests: list[MaskRequest], rows: list[int]):
    result = grammars.start_bitmask(requests, rows).result()
    return result.bitmask, result.rows


def _allows(row: torch.Tensor, token_id: int) -> bool:
    return bool((int(row[token_id // 32]) >> (token_id % 32)) & 1)


def test_replayed_output_and_drafts_give_the_masks_of_the_advanced_grammar(tokenizer, backend):
    token_ids = tokenizer.encode('{"name": "Al", "age": 7, "pets": []}')
    incremental = RequestGrammars(lambda: backend, tokenizer.vocab_size)
    incremental.add("a", _json())
    expected = []
    for i in range(len(token_ids)):  # one token per step, as a request decodes
        new = token_ids[i - 1:i] if i else []
        bitmask, _ = _masks(incremental, [MaskRequest("a", new)], [1])
        expected.append(bitmask[0].clone())
        assert _allows(bitmask[0], token_ids[i])
    # A request seen anew (after preemption) replays its output in one go; a verify step
    # with drafts gets each draft position's mask in its rows.
    for start in (0, 5, 11):
        replayed = RequestGrammars(lambda: backend, tokenizer.vocab_size)
        replayed.add("a", _json())
        drafts = token_ids[start:start + 4]
        bitmask, rows = _masks(replayed, [MaskRequest("free", []),
                                          MaskRequest("a", token_ids[:start], drafts)], [1, 5])
        assert rows == [1, 2, 3, 4, 5]
        assert torch.equal(bitmask[0], torch.full_like(bitmask[0], -1))  # free: all allowed
        for j in range(5):
            assert torch.equal(bitmask[1 + j], expected[start + j])
        assert replayed.num_accepted("a") == start  # the drafts were rolled back


def test_a_draft_the_grammar_rejects_leaves_later_rows_unmasked(tokenizer, backend):
    grammars = RequestGrammars(lambda: backend, tokenizer.vocab_size)
    grammars.add("a", StructuredOutputsParams(choice=["yes", "no"]))
    [bad] = tokenizer.encode("maybe")[:1]
    bitmask, rows = _masks(grammars, [MaskRequest("a", [], [bad, bad])], [3])
    assert rows == [0, 1, 2]
    assert not _allows(bitmask[0], bad)
    assert torch.equal(bitmask[1], torch.full_like(bitmask[1], -1))


def test_a_constraint_is_compiled_once(backend):
    schema = {"type": "object", "properties": {"cache_probe": {"type": "integer"}}}
    backend.compile(_json(schema))
    size = backend.compiler.get_cache_size_bytes()
    backend.compile(_json(dict(schema)))  # the same schema again, from another request
    assert backend.compiler.get_cache_size_bytes() == size > 0


def test_bad_constraints_are_value_errors_naming_them(backend):
    with pytest.raises(ValueError, match="invalid JSON schema"):
        backend.compile(StructuredOutputsParams(json='{"type": "objectx"}'))
    with pytest.raises(ValueError, match="invalid JSON schema"):
        backend.compile(StructuredOutputsParams(json="{not json"))
    with pytest.raises(ValueError, match="invalid regex: .*Unclosed"):
        backend.compile(StructuredOutputsParams(regex="[0-9"))
    with pytest.raises(ValueError, match="invalid grammar"):
        backend.compile(StructuredOutputsParams(grammar="root ::= undefined_rule"))


# ---- the engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(builtin_dir):
    with LLM(builtin_dir, **ENGINE_ARGS) as engine:
        yield engine


def _texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def test_constraints_hold_at_temperature_1_through_preemption(llm):
    """8 sampled requests at once are more than the 12 blocks hold: some are preempted and
    recomputed, and their grammars replay their output."""
    before = llm.engine.stats().num_preemptions
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs=_json())
              for i in range(8)]
    outputs = llm.generate([PROMPTS[i % 4] + " " * i for i in range(8)], params)
    assert llm.engine.stats().num_preemptions > before
    for output in outputs:
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), PERSON)
    # A seeded request draws the same tokens alone (no preemption) as in the crowd.
    [alone] = llm.generate([PROMPTS[0]], params[0])
    assert alone.outputs[0].text == outputs[0].outputs[0].text


def test_choice_regex_and_grammar(llm):
    choice = StructuredOutputsParams(choice=["red", "green", "blue"])
    regex = StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")
    grammar = StructuredOutputsParams(grammar='root ::= "(" ("x" | "y")+ ")"')
    outputs = llm.generate(
        ["My favourite colour is"] * 3 + ["Code:", "Pairs:"],
        [SamplingParams(temperature=1.0, seed=i, max_tokens=12, structured_outputs=choice)
         for i in range(3)]
        + [SamplingParams(temperature=1.0, max_tokens=12, structured_outputs=regex),
           SamplingParams(temperature=1.0, max_tokens=40, structured_outputs=grammar)])
    texts = _texts(outputs)
    assert set(texts[:3]) <= {"red", "green", "blue"}
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs[:3])
    assert len(texts[3]) == 6 and texts[3][:3].isdigit() and texts[3][3] == "-"
    assert texts[4].startswith("(") and set(texts[4][1:].rstrip(")")) <= {"x", "y"}


def test_requests_past_the_context_or_with_bad_constraints_are_refused(llm):
    with pytest.raises(ValueError, match=r"maximum context length is 512 tokens\. However, you "
                                         r"requested 603 tokens \(3 in the messages, 600 in"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=600))
    with pytest.raises(ValueError, match="invalid JSON schema"):
        llm.generate(["x"], SamplingParams(structured_outputs=_json({"type": "objectx"})))
    [ok] = llm.generate(["x"], SamplingParams(max_tokens=2))  # the engine goes on serving
    assert len(ok.outputs[0].token_ids) == 2


def test_speculative_drafts_are_verified_against_the_grammar(builtin_dir, llm):
    """n-gram drafts copy the prompt's repeated words; the grammar rejects some, and greedy
    speculative output equals greedy plain output."""
    schema = {"type": "array", "items": {"enum": ["apple", "banana", "cherry"]},
              "minItems": 6, "maxItems": 6}
    prompt = 'Fruit: ["apple", "banana", "apple", "banana", "apple", "banana"] again:'
    params = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=_json(schema))
    [plain] = llm.generate([prompt], params)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
            "min_acceptance_rate": 0.0}
    with LLM(builtin_dir, speculative_config=spec, **ENGINE_ARGS) as spec_llm:
        [got] = spec_llm.generate([prompt], params)
        stats = spec_llm.engine.stats()
    assert got.outputs[0].token_ids == plain.outputs[0].token_ids
    assert len(json.loads(got.outputs[0].text)) == 6
    assert stats.spec_num_draft_tokens > 0
