"""The model runner's grammar state: a matcher per constrained request, and each step's
token bitmask, filled on a background thread while the model runs.

A matcher has consumed a prefix of its request's output tokens (`num_accepted`); before a
mask is filled it is advanced with the rest. A request the runner sees anew (first step,
or recomputed after preemption, or resumed on another replica) gets a fresh matcher that
replays its whole output, so the grammar state is always a function of the output tokens.

Drafts (speculative decoding) are verified against the grammar: a request with k drafts
has k + 1 rows, row j filled after the matcher accepts its first j drafts (then rolled
back). A draft the grammar rejects is not allowed by its row's mask, so the verifier
rejects it; rows after it are never emitted and stay unmasked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from fleetlm.executor.sampling_params import StructuredOutputsParams
from fleetlm.executor.structured.backend import GrammarBackend, allocate_bitmask

logger = logging.getLogger("fleetlm.structured")


@dataclass
class GrammarBitmask:
    """One step's masks: `bitmask` has a row per logits row; only `rows` are constrained."""

    bitmask: torch.Tensor  # [num_rows, ceil(vocab / 32)] int32, on the CPU
    rows: list[int]


@dataclass
class MaskRequest:
    """What the mask of one sampling request needs, read on the runner's thread."""

    req_id: str
    new_output_token_ids: list[int]  # its output tokens the matcher has not consumed yet
    drafts: list[int] = field(default_factory=list)


class _RequestGrammar:
    def __init__(self, compiled: Future) -> None:
        self.compiled = compiled
        self.matcher = None
        self.num_accepted = 0  # output tokens the matcher has consumed
        self.is_broken = False  # an output token the grammar rejects: constrain no more

    def advance(self, backend: GrammarBackend, req_id: str, token_ids: list[int]) -> None:
        if self.matcher is None:
            try:
                self.matcher = backend.matcher(self.compiled.result())
            except ValueError as e:  # the frontend checks constraints: not expected here
                logger.error("request %s: %s; not constrained", req_id, e)
                self.is_broken = True
                return
        for token_id in token_ids:
            if self.is_broken or self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(token_id):
                logger.error("request %s: output token %d breaks its grammar; no longer "
                             "constrained", req_id, token_id)
                self.is_broken = True
        self.num_accepted += len(token_ids)

    def fill(self, bitmask: torch.Tensor, row: int, drafts: list[int]) -> None:
        """Rows row .. row + len(drafts): the masks after 0 .. len(drafts) drafts."""
        matcher = self.matcher
        matcher.fill_next_token_bitmask(bitmask, row)
        num_accepted = 0
        for j, draft in enumerate(drafts):
            if matcher.is_terminated() or not matcher.accept_token(draft):
                break
            num_accepted += 1
            matcher.fill_next_token_bitmask(bitmask, row + j + 1)
        if num_accepted:
            matcher.rollback(num_accepted)


class RequestGrammars:
    """Grammar state of the constrained requests one runner holds. `make_backend` is
    called on first use (loading the tokenizer's vocabulary takes a fraction of a second)."""

    def __init__(self, make_backend: Callable[[], GrammarBackend], vocab_size: int) -> None:
        self._make_backend = make_backend
        self._backend: GrammarBackend | None = None
        self.vocab_size = vocab_size
        self._grammars: dict[str, _RequestGrammar] = {}
        # One thread: compiles and mask fills run in submission order, off the step's path.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fleetlm-grammar")

    def add(self, req_id: str, params: StructuredOutputsParams) -> None:
        """Start compiling (a cached grammar is at once ready)."""
        self._grammars[req_id] = _RequestGrammar(self._thread.submit(self._compile, params))

    def remove(self, req_id: str) -> None:
        self._grammars.pop(req_id, None)

    def __len__(self) -> int:
        """Constrained requests held (0: a step has no mask to fill)."""
        return len(self._grammars)

    def num_accepted(self, req_id: str) -> int | None:
        """Output tokens consumed by the request's matcher; None if it is not constrained."""
        grammar = self._grammars.get(req_id)
        return None if grammar is None or grammar.is_broken else grammar.num_accepted

    def start_bitmask(self, requests: list[MaskRequest],
                      num_rows: list[int]) -> Future[GrammarBitmask | None] | None:
        """Fill the masks of a step's sampling requests (`num_rows[i]`: request i's logits
        rows, 1 + its drafts) on the grammar thread. None when none is constrained."""
        if not any(r.req_id in self._grammars for r in requests):
            return None
        return self._thread.submit(self._fill, requests, num_rows)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    # ---- on the grammar thread ----------------------------------------------------------
    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend

    def _compile(self, params: StructuredOutputsParams):
        return self.backend.compile(params)

    def _fill(self, requests: list[MaskRequest], num_rows: list[int]) -> GrammarBitmask | None:
        bitmask = allocate_bitmask(sum(num_rows), self.vocab_size)
        rows: list[int] = []
        row = 0
        for request, count in zip(requests, num_rows):
            grammar = self._grammars.get(request.req_id)
            if grammar is not None:
                grammar.advance(self.backend, request.req_id, request.new_output_token_ids)
                # A grammar that has accepted its stop token (EOS under ignore_eos) is done:
                # what follows is not constrained.
                if not grammar.is_broken and not grammar.matcher.is_terminated():
                    grammar.fill(bitmask, row, request.drafts[:count - 1])
                    rows.extend(range(row, row + count))
            row += count
        return GrammarBitmask(bitmask, rows) if rows else None
