"""Per-step sampling tensors, built by the model runner from the requests it holds.

`SamplingMetadata.build` turns one step's per-request inputs into the few tensors the sampler
needs. Every optional part is None when no row of the batch uses it, so an all-greedy batch
without penalties, min_tokens or logprobs builds nothing but a flag and samples by argmax.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from itertools import chain

import torch

from fleetlm.executor.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
# splitmix64 constants (Steele, Lea, Flood 2014): a cheap, well-mixed 64-bit hash.
_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
_SPLITMIX_MUL2 = 0x94D049BB133111EB


def _splitmix64(x: int) -> int:
    x = (x + _SPLITMIX_GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * _SPLITMIX_MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _SPLITMIX_MUL2) & _MASK64
    return x ^ (x >> 31)


def seed_for_position(seed: int, position: int) -> int:
    """The generator seed of a seeded request's `position`-th output token.

    Depends on (seed, position) only, so a request draws the same tokens whatever else is in
    the batch, wherever its row is, and again when it is recomputed after preemption.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ position)


@dataclass
class PenaltyTensors:
    """Repetition (HF: over prompt + output) and presence/frequency (OpenAI: output only).

    Penalties touch only tokens a request has seen, so they are sparse (row, token id)
    pairs, each listed once; rows without a penalty have no pairs.
    """

    seen: tuple[torch.Tensor, torch.Tensor]  # in prompt or output, rows with repetition != 1
    repetition: torch.Tensor  # [num_seen] fp32, the pair's row's repetition_penalty
    in_output: tuple[torch.Tensor, torch.Tensor]  # in output, rows with presence/frequency
    output_offsets: torch.Tensor  # [num_in_output] fp32, frequency * count + presence


@dataclass
class SamplingMetadata:
    """What the sampler needs for one step; one row per request that samples this step.

    Optional parts are None when no row uses them. Rows that do not use a part that other
    rows use hold its neutral value (top_k = vocab_size, top_p = 1, min_p = 0, temperature
    1 on greedy rows). Row subsets (`truncated_rows`, `logprob_rows`) are None when every
    row belongs.
    """

    num_reqs: int
    is_all_greedy: bool
    is_all_random: bool
    is_greedy: torch.Tensor | None = None  # [num_reqs] bool; None when all greedy or random
    temperature: torch.Tensor | None = None  # [num_reqs, 1] fp32; None when all greedy
    min_p: torch.Tensor | None = None  # [num_reqs, 1] fp32
    # Top-k / top-p, over the rows that use either (random rows only):
    truncated_rows: torch.Tensor | None = None  # [num_truncated] int64
    top_k: torch.Tensor | None = None  # [num_truncated] int64, vocab_size where off
    max_top_k: int = 0  # largest top_k in use (a host value: no device sync)
    top_p: torch.Tensor | None = None  # [num_truncated, 1] fp32
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded gen
    penalties: PenaltyTensors | None = None
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids)
    num_logprobs: list[int | None] | None = None  # per row top-N; None when no row asks
    logprob_rows: torch.Tensor | None = None  # [num_asking] int64, the rows with an N
    # Structured outputs: a token bitmask per row (bit 1: allowed), applied to `grammar_rows`
    # only. Filled by the runner's grammar thread (`fleetlm.executor.structured`).
    grammar_bitmask: torch.Tensor | None = None  # [num_reqs, ceil(vocab / 32)] int32
    grammar_rows: list[int] | None = None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_ids: list[int | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Build one step's metadata. All lists have one entry per row of the logits.

        `params`: each request's SamplingParams. `prompt_token_ids`: its prompt (read only
        by rows with repetition_penalty != 1). `output_token_ids`: the tokens it has
        generated so far, excluding the one being sampled now; its length is the output
        position that seeds a seeded request and decides min_tokens. `eos_token_ids`: the
        request's EOS id (masked below min_tokens unless ignore_eos), None if the model has
        none. Token ids must be < vocab_size (SamplingParams.validate_for_model).
        """
        num_reqs = len(params)
        assert len(prompt_token_ids) == len(output_token_ids) == len(eos_token_ids) == num_reqs
        num_outputs = [len(ids) for ids in output_token_ids]
        is_greedy = [p.is_greedy for p in params]
        meta = cls(num_reqs, is_all_greedy=all(is_greedy), is_all_random=not any(is_greedy))
        if not meta.is_all_greedy:
            meta._add_random(params, is_greedy, num_outputs, vocab_size, device)
        if any(p.has_penalties for p in params):
            meta.penalties = _build_penalties(params, prompt_token_ids, output_token_ids, device)
        meta.min_tokens_mask = _build_min_tokens_mask(params, num_outputs, eos_token_ids, device)
        num_logprobs = [p.logprobs for p in params]
        asking = [row for row, num in enumerate(num_logprobs) if num is not None]
        if asking:
            meta.num_logprobs = num_logprobs
            meta.logprob_rows = _subset(asking, num_reqs, device)
        return meta

    def _add_random(
        self,
        params: list[SamplingParams],
        is_greedy: list[bool],
        num_outputs: list[int],
        vocab_size: int,
        device,
    ) -> None:
        if not self.is_all_random:
            self.is_greedy = torch.tensor(is_greedy, device=device)
        self.temperature = _column(
            [1.0 if greedy else p.temperature for p, greedy in zip(params, is_greedy)], device
        )
        if any(p.min_p > 0.0 and not g for p, g in zip(params, is_greedy)):
            self.min_p = _column([0.0 if g else p.min_p for p, g in zip(params, is_greedy)], device)
        self._add_truncation(params, is_greedy, vocab_size, device)
        self.generators = {
            row: _seeded_generator(p.seed, num_outputs[row], device)
            for row, p in enumerate(params)
            if p.seed is not None and not is_greedy[row]
        }

    def _add_truncation(
        self, params: list[SamplingParams], is_greedy: list[bool], vocab_size: int, device
    ) -> None:
        rows = [
            row for row, p in enumerate(params)
            if not is_greedy[row] and (0 < p.top_k < vocab_size or p.top_p < 1.0)
        ]
        if not rows:
            return
        self.truncated_rows = _subset(rows, len(params), device)
        top_ks = [min(params[row].top_k or vocab_size, vocab_size) for row in rows]
        if min(top_ks) < vocab_size:
            self.top_k = torch.tensor(top_ks, dtype=torch.int64, device=device)
            self.max_top_k = max(k for k in top_ks if k < vocab_size)
        if any(params[row].top_p < 1.0 for row in rows):
            self.top_p = _column([params[row].top_p for row in rows], device)


def _subset(rows: list[int], num_reqs: int, device) -> torch.Tensor | None:
    return None if len(rows) == num_reqs else torch.tensor(rows, dtype=torch.int64, device=device)


def _column(values: list[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _seeded_generator(seed: int, position: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed_for_position(seed, position))
    return generator


def _build_penalties(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    device,
) -> PenaltyTensors:
    seen = {
        row: set(prompt_token_ids[row]).union(output_token_ids[row])
        for row, p in enumerate(params)
        if p.repetition_penalty != 1.0
    }
    counts = {
        row: Counter(output_token_ids[row])
        for row, p in enumerate(params)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    }
    seen_rows, seen_ids = _pairs(seen, device)
    output_rows, output_ids = _pairs(counts, device)
    num_times = _int64(chain.from_iterable(c.values() for c in counts.values()), device)

    def per_pair(name: str, rows: torch.Tensor) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], device=device)[rows]

    return PenaltyTensors(
        seen=(seen_rows, seen_ids),
        repetition=per_pair("repetition_penalty", seen_rows),
        in_output=(output_rows, output_ids),
        output_offsets=per_pair("frequency_penalty", output_rows) * num_times
        + per_pair("presence_penalty", output_rows),
    )


def _pairs(tokens_by_row: dict[int, Collection[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, token ids) of every pair of a row and one of its distinct tokens."""
    lengths = _int64([len(tokens) for tokens in tokens_by_row.values()], device)
    rows = torch.repeat_interleave(_int64(tokens_by_row, device), lengths)
    return rows, _int64(chain.from_iterable(tokens_by_row.values()), device)


def _int64(values: Iterable[int], device) -> torch.Tensor:
    """Like torch.tensor(list) but through a C array: ~30x faster for long token lists."""
    buffer = array("q", values)
    if not buffer:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.frombuffer(buffer, dtype=torch.int64).to(device)


def _build_min_tokens_mask(
    params: list[SamplingParams], num_outputs: list[int], eos_token_ids: list[int | None], device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, token ids) to mask: below min_tokens, stop_token_ids and (unless ignore_eos) EOS."""
    rows: list[int] = []
    cols: list[int] = []
    for row, p in enumerate(params):
        if num_outputs[row] >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids)
        if not p.ignore_eos and eos_token_ids[row] is not None:
            banned.add(eos_token_ids[row])
        rows.extend([row] * len(banned))
        cols.extend(sorted(banned))
    if not rows:
        return None
    return _int64(rows, device), _int64(cols, device)
