"""xgrammar behind one small interface: compile a `StructuredOutputsParams`, make matchers,
apply a bitmask.

Why xgrammar (not llguidance): on the built-in model's tokenizer (49,152 tokens) it fills a
JSON-schema mask in ~5 us per token against llguidance's ~50 us, and applies 32 rows' masks
to the logits on CPU in ~90 us (see README, dependency table).
"""

from __future__ import annotations

import json
import logging
import re

import torch
import xgrammar as xgr

from fleetlm.executor.sampling_params import StructuredOutputsParams

logger = logging.getLogger("fleetlm.structured")


class GrammarBackend:
    """Compiles constraints for one tokenizer. xgrammar's compiler caches each compiled
    grammar by its source, so a schema sent again is not compiled again."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Raises ValueError naming the constraint when it is not valid."""
        try:
            return self._compile(params.kind, params.spec)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError and others
            message = _SOURCE_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip()
                                         else type(e).__name__)
            raise ValueError(f"invalid {_NAMES[params.kind]}: {message}") from None

    def _compile(self, kind: str, spec) -> xgr.CompiledGrammar:
        if kind == "json":
            json.loads(spec)  # a clear error for text that is not JSON at all
            # Compact JSON (no free whitespace): a small model left free to add whitespace
            # can emit newlines until max_tokens and never close the object.
            return self.compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        if kind == "choice":
            return self.compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(c) for c in spec))
        if kind == "grammar":
            if "::=" in spec:
                return self.compiler.compile_grammar(spec)
            return self.compiler.compile_lark(spec)
        assert kind == "structural_tag", kind
        return self.compiler.compile_structural_tag(spec)

    def matcher(self, compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled)  # unlimited rollback: drafts are verified


# xgrammar's C++ errors start "[20:24:52] /project/cpp/regex_converter.cc:94: ".
_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
_NAMES = {
    "json": "JSON schema", "json_object": "JSON object", "regex": "regex",
    "choice": "choice", "grammar": "grammar", "structural_tag": "structural tag",
}


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab / 32)] int32, every token allowed."""
    return xgr.allocate_token_bitmask(num_rows, vocab_size)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of tokens whose bit is 0 to -inf, in rows `rows` only (in place)."""
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)
