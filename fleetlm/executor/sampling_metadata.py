"""Per-step sampling tensors, built by the model runner from the requests it holds.

`SamplingMetadata.build` turns one step's per-request inputs into the few tensors the sampler
needs. Every optional part is None when no row of the batch uses it, so an all-greedy batch
without penalties, min_tokens or logprobs builds nothing but a flag and samples by argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    Rows without penalties hold neutral values (1, 0, 0) and empty token sets.
    """

    repetition: torch.Tensor  # [num_reqs, 1] fp32
    presence: torch.Tensor  # [num_reqs, 1] fp32
    frequency: torch.Tensor  # [num_reqs, 1] fp32
    output_counts: torch.Tensor  # [num_reqs, vocab] fp32, occurrences in the output
    is_in_prompt: torch.Tensor  # [num_reqs, vocab] bool


@dataclass
class SamplingMetadata:
    """What the sampler needs for one step; one row per request that samples this step.

    Optional parts are None when no row uses them. Rows that do not use a part that other
    rows use hold its neutral value (top_k = vocab_size, top_p = 1, min_p = 0, temperature
    1 on greedy rows).
    """

    num_reqs: int
    is_all_greedy: bool
    is_all_random: bool
    is_greedy: torch.Tensor | None = None  # [num_reqs] bool; None when all greedy or random
    temperature: torch.Tensor | None = None  # [num_reqs, 1] fp32; None when all greedy
    top_k: torch.Tensor | None = None  # [num_reqs] int64
    max_top_k: int = 0  # largest top_k actually in use (host value: no device sync)
    top_p: torch.Tensor | None = None  # [num_reqs, 1] fp32
    min_p: torch.Tensor | None = None  # [num_reqs, 1] fp32
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded gen
    penalties: PenaltyTensors | None = None
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids)
    num_logprobs: list[int | None] | None = None  # per row top-N; None when no row asks

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
        meta = cls(num_reqs=num_reqs, is_all_greedy=all(is_greedy), is_all_random=not any(is_greedy))
        if not meta.is_all_greedy:
            meta._add_random(params, is_greedy, num_outputs, vocab_size, device)
        if any(p.has_penalties for p in params):
            meta.penalties = _build_penalties(
                params, prompt_token_ids, output_token_ids, vocab_size, device
            )
        meta.min_tokens_mask = _build_min_tokens_mask(params, num_outputs, eos_token_ids, device)
        if any(p.logprobs is not None for p in params):
            meta.num_logprobs = [p.logprobs for p in params]
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
        random_params = [p for p, greedy in zip(params, is_greedy) if not greedy]
        top_ks = [min(p.top_k, vocab_size) if p.top_k and not greedy else vocab_size
                  for p, greedy in zip(params, is_greedy)]
        if min(top_ks) < vocab_size:
            self.top_k = torch.tensor(top_ks, dtype=torch.int64, device=device)
            self.max_top_k = max(k for k in top_ks if k < vocab_size)
        if any(p.top_p < 1.0 for p in random_params):
            self.top_p = _column([1.0 if g else p.top_p for p, g in zip(params, is_greedy)], device)
        if any(p.min_p > 0.0 for p in random_params):
            self.min_p = _column([0.0 if g else p.min_p for p, g in zip(params, is_greedy)], device)
        self.generators = {
            row: _seeded_generator(p.seed, num_outputs[row], device)
            for row, p in enumerate(params)
            if p.seed is not None and not is_greedy[row]
        }


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
    vocab_size: int,
    device,
) -> PenaltyTensors:
    outputs = [ids if p.has_penalties else [] for p, ids in zip(params, output_token_ids)]
    prompts = [
        ids if p.repetition_penalty != 1.0 else [] for p, ids in zip(params, prompt_token_ids)
    ]
    return PenaltyTensors(
        repetition=_column([p.repetition_penalty for p in params], device),
        presence=_column([p.presence_penalty for p in params], device),
        frequency=_column([p.frequency_penalty for p in params], device),
        output_counts=_token_counts(outputs, vocab_size, device),
        is_in_prompt=_token_counts(prompts, vocab_size, device) > 0,
    )


def _token_counts(token_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[num_rows, vocab_size] fp32 occurrence counts; padding goes to an extra dropped column."""
    width = max((len(ids) for ids in token_ids), default=0)
    padded = [ids + [vocab_size] * (width - len(ids)) for ids in token_ids]
    index = torch.tensor(padded, dtype=torch.int64, device=device).view(len(token_ids), width)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


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
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(cols, dtype=torch.int64, device=device),
    )
