"""Structured outputs: constraints (JSON schema, regex, choice, grammar, structural tags)
compiled by xgrammar into per-token masks that the sampler applies.

`backend.py` compiles (`GrammarBackend`, one per tokenizer, cached per constraint);
`request_grammars.py` keeps the model runner's per-request grammar state and fills each
step's token bitmask on a background thread while the model runs.
"""

from fleetlm.executor.structured.backend import GrammarBackend, apply_token_bitmask
from fleetlm.executor.structured.request_grammars import GrammarBitmask, RequestGrammars

__all__ = ["GrammarBackend", "GrammarBitmask", "RequestGrammars", "apply_token_bitmask"]
