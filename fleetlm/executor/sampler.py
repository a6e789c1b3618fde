"""The sampler: one next token per row of fp32 logits, plus the logprobs requests asked for.

Order of operations (vLLM v1's):
  1. logprobs, when any row asks: from the *raw* logits' log_softmax, before the grammar,
     min_tokens, penalties and temperature (vLLM's default "raw_logprobs": the model's own
     distribution);
  2. structured outputs: tokens the row's grammar does not allow get -inf;
     min_tokens: EOS (unless ignore_eos) and stop_token_ids get -inf below min_tokens;
  3. penalties: repetition (HF), then frequency and presence (OpenAI);
  4. greedy rows: argmax of the penalised logits (`fused_ops.argmax` on CPUs: torch's reads one
     value at a time);
  5. random rows: temperature, min_p, top-k / top-p, then the exponential race
     argmax(probs / E) with E ~ Exp(1), which draws token i with probability probs[i].
     Seeded rows draw E from their own generator (seeded from seed and output position);
     the other rows share one batched draw from the sampler's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetlm.executor.outputs import PositionLogprobs
from fleetlm.executor.sampling_metadata import PenaltyTensors, SamplingMetadata
from fleetlm.kernels import fused_ops

# Top-p on CPU first looks at this many best tokens per row (see apply_top_k_top_p).
_NUM_CPU_TOP_P_CANDIDATES = 1024


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_reqs] int64, on the logits' device (no sync)
    # Per row: the sampled token's (id, logprob) then the top-N; None for rows that did not
    # ask. None altogether when no row asked.
    logprobs: list[PositionLogprobs | None] | None = None


class Sampler:
    """Samples one token per row. `generator` drives the unseeded rows (None: torch's global)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        return self.forward(logits, metadata)

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """`logits`: [num_reqs, vocab] fp32, one row per request; modified in place."""
        assert logits.dim() == 2 and logits.shape[0] == metadata.num_reqs
        raw_logprobs = self.raw_logprobs(logits, metadata)
        logits = self.preprocess(logits, metadata)
        sampled = self._sample(logits, metadata)
        if raw_logprobs is None:
            return SamplerOutput(sampled)
        return SamplerOutput(sampled, logprobs_per_row(raw_logprobs, sampled, metadata))

    @staticmethod
    def raw_logprobs(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor | None:
        """Step 1: the asking rows' log-softmax of the raw logits (None when no row asks)."""
        if metadata.num_logprobs is None:
            return None
        return _rows(logits, metadata.logprob_rows).log_softmax(dim=-1)

    @staticmethod
    def preprocess(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Steps 2 and 3: grammar masks, min_tokens and penalties, in place."""
        if metadata.grammar_bitmask is not None:
            # Imported here: xgrammar takes a second to import; unconstrained serving skips it.
            from fleetlm.executor.structured.backend import apply_token_bitmask

            apply_token_bitmask(logits, metadata.grammar_bitmask, metadata.grammar_rows)
        if metadata.min_tokens_mask is not None:
            logits[metadata.min_tokens_mask] = float("-inf")
        if metadata.penalties is not None:
            logits = apply_penalties(logits, metadata.penalties)
        return logits

    @staticmethod
    def random_probs(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Step 5 up to the draw: each row's distribution after temperature, min_p, top-k and
        top-p (greedy rows get temperature 1). Modifies `logits`."""
        logits = logits.div_(metadata.temperature)
        if metadata.min_p is not None:
            logits = apply_min_p(logits, metadata.min_p)
        if metadata.top_k is not None or metadata.top_p is not None:
            logits = _truncate(logits, metadata)
        return logits.softmax(dim=-1)

    def _sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        greedy = None if metadata.is_all_random else fused_ops.argmax(logits)
        if metadata.is_all_greedy:
            return greedy
        probs = self.random_probs(logits, metadata)
        random = exponential_race(probs, metadata.generators, self.generator)
        return random if greedy is None else torch.where(metadata.is_greedy, greedy, random)


def _rows(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows]


def _truncate(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    rows = metadata.truncated_rows
    truncated = apply_top_k_top_p(
        _rows(logits, rows), metadata.top_k, metadata.max_top_k, metadata.top_p
    )
    if rows is None:
        return truncated
    logits[rows] = truncated
    return logits


def logprobs_per_row(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, metadata: SamplingMetadata
) -> list[PositionLogprobs | None]:
    """Logprobs of the asking rows (`raw_logprobs` holds only those), None for the others."""
    num_logprobs = [n for n in metadata.num_logprobs if n is not None]
    asking = iter(
        gather_logprobs(raw_logprobs, _rows(sampled, metadata.logprob_rows), num_logprobs)
    )
    return [None if n is None else next(asking) for n in metadata.num_logprobs]


def apply_penalties(logits: torch.Tensor, penalties: PenaltyTensors) -> torch.Tensor:
    """Repetition: tokens seen in prompt or output get logit / r if positive, else logit * r.
    Then logit -= frequency * count_in_output + presence * (count_in_output > 0)."""
    if penalties.repetition.numel():
        seen = logits[penalties.seen]
        factor = penalties.repetition
        logits[penalties.seen] = torch.where(seen > 0, seen / factor, seen * factor)
    if penalties.output_offsets.numel():
        logits[penalties.in_output] -= penalties.output_offsets
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's top_k logits, then its smallest set of tokens with mass >= top_p
    (a token stays while the mass of the better tokens is < top_p; the best always stays).

    Done as a per-row threshold on the logits, so ties at the cut are all kept. Rows with
    top_k == vocab and top_p == 1 are untouched. Top-k alone needs only torch.topk; top-p
    needs the sorted row: on GPU a full sort, on CPU (where sorting the vocabulary costs
    ~20x a topk) the best `_NUM_CPU_TOP_P_CANDIDATES` first, sorting all only when some
    row's kept set does not fit in them.
    """
    if top_p is None:
        return logits if top_k is None else _apply_top_k_only(logits, top_k, max_top_k)
    num_reqs, vocab_size = logits.shape
    if top_k is None:
        top_k = torch.full((num_reqs,), vocab_size, dtype=torch.int64, device=logits.device)
    num_candidates = vocab_size
    if logits.device.type == "cpu":
        num_candidates = min(vocab_size, max(_NUM_CPU_TOP_P_CANDIDATES, max_top_k))
    threshold, is_covered = _top_k_top_p_threshold(logits, top_k, top_p, num_candidates)
    if num_candidates < vocab_size and not bool(is_covered.all()):
        threshold, _ = _top_k_top_p_threshold(logits, top_k, top_p, vocab_size)
    return logits.masked_fill_(logits < threshold, float("-inf"))


def _top_k_top_p_threshold(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([num_reqs, 1] smallest kept logit, [num_reqs] whether it is exact), looking only at
    each row's best `num_candidates` logits (which must be >= every top_k in use)."""
    vocab_size = logits.shape[1]
    values = logits.topk(num_candidates, dim=-1).values  # descending
    rank = torch.arange(num_candidates, device=logits.device)
    values.masked_fill_(rank >= top_k.unsqueeze(1), float("-inf"))
    is_top_k = (top_k < vocab_size).unsqueeze(1)
    # Probabilities under the top-k-truncated row: top-k rows fit in the candidates.
    log_norm = torch.where(
        is_top_k, values.logsumexp(dim=-1, keepdim=True), logits.logsumexp(dim=-1, keepdim=True)
    )
    probs = (values - log_norm).exp()
    cumulative = probs.cumsum(dim=-1)
    is_no_top_p = top_p >= 1.0
    is_kept = ((cumulative - probs) < top_p) | is_no_top_p
    num_kept = (is_kept & (values > float("-inf"))).sum(dim=-1, keepdim=True)
    threshold = values.gather(1, num_kept - 1)
    threshold.masked_fill_(~is_top_k & is_no_top_p, float("-inf"))
    is_covered = is_top_k | is_no_top_p | (cumulative[:, -1:] >= top_p)
    return threshold, is_covered.squeeze(1)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    top_values = logits.topk(max_top_k, dim=-1).values  # descending
    kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    kth.masked_fill_((top_k >= logits.shape[1]).unsqueeze(1), float("-inf"))  # rows with k off
    return logits.masked_fill_(logits < kth, float("-inf"))


def exponential_race(
    probs: torch.Tensor,
    generators: dict[int, torch.Generator],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """argmax(probs / E), E ~ Exp(1) i.i.d.: row i yields token j with probability probs[i, j].

    Row r in `generators` draws its whole noise row from generators[r], so its result
    depends only on its own probs and generator; the other rows share one batched draw.
    """
    noise = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        noise.uniform_(generator=generator)
    for row, row_generator in generators.items():
        noise[row].uniform_(generator=row_generator)
    # E = -log(U) ~ Exp(1) (4x cheaper than exponential_ on CPU), and argmax(probs / E) =
    # argmin(probs / log U), one pass less. log U is in [-inf, 0): never a division by zero.
    noise.log_()
    return probs.div_(noise).argmin(dim=-1)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int | None]
) -> list[PositionLogprobs | None]:
    """Per row: [(token, logprob), then the top-N (id, logprob) by descending logprob].

    `num_logprobs[i]` is row i's N (0: only the token; None: row skipped). One host sync.
    """
    max_num = max((n for n in num_logprobs if n is not None), default=0)
    chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(max_num, dim=-1)
    tokens, top_values, top_ids = token_ids.tolist(), top_values.tolist(), top_ids.tolist()
    result: list[PositionLogprobs | None] = []
    for row, num in enumerate(num_logprobs):
        if num is None:
            result.append(None)
            continue
        top = list(zip(top_ids[row][:num], top_values[row][:num]))
        result.append([(tokens[row], chosen[row])] + top)
    return result


def compute_prompt_logprobs(
    logits: torch.Tensor, target_token_ids: torch.Tensor | list[int], num_top: int
) -> list[PositionLogprobs]:
    """Logprob of each next prompt token plus the top-`num_top` at each position.

    `logits`: [num_positions, vocab], row i predicting `target_token_ids[i]`.
    """
    targets = torch.as_tensor(target_token_ids, dtype=torch.int64, device=logits.device)
    assert targets.shape == (logits.shape[0],)
    logprobs = logits.float().log_softmax(dim=-1)
    return gather_logprobs(logprobs, targets, [num_top] * logits.shape[0])
