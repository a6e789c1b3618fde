"""One rank's model: loads its share of the weights, owns its KV cache, runs a SchedulerOutput."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from fleetlm.executor.config import CacheConfig, ModelConfig, ParallelConfig, SpeculativeConfig
from fleetlm.executor.input_batch import (CachedRequestState, DecodeBuffers, PreparedBatch,
                                          prepare_batch)
from fleetlm.executor.models import get_model_class
from fleetlm.executor.outputs import ModelRunnerOutput, SchedulerOutput
from fleetlm.executor.sampler import Sampler, compute_prompt_logprobs
from fleetlm.executor.sampling_metadata import SamplingMetadata
from fleetlm.executor.spec.proposers import DraftRequest, make_proposer
from fleetlm.executor.spec.verify import VerifiedTokens, verify_drafts
from fleetlm.executor.structured.request_grammars import MaskRequest, RequestGrammars
from fleetlm.executor.weights import (
    ReadCounter,
    iterate_checkpoint,
    load_hf_config,
    load_tokenizer,
    resolve_model,
    resolve_tokenizer,
)
from fleetlm.kernels import fused_ops, huge_pages, kv_quant
from fleetlm.kvtransfer.base import KVConnectorWorker
from fleetlm.kvtransfer.params import KVShard
from fleetlm.parallel.pipeline import StageHandoff
from fleetlm.parallel.state import SINGLE_PROCESS_GROUPS, ProcessGroups

logger = logging.getLogger("fleetlm.model_runner")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: without them CPU bf16 matrix products are several times slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype,
                           device: torch.device) -> torch.dtype:
    """The KV cache's tensor dtype for `kv_cache_dtype` (auto: the model's)."""
    if name == "auto":
        return model_dtype
    dtype = kv_quant.KV_CACHE_DTYPES[name]
    if dtype == torch.int8 and device.type != "cpu":
        raise ValueError(f"kv_cache_dtype {name} runs on CPU only (the CUDA attention "
                         f"kernels read float and float8 caches); use kv_cache_dtype fp8 or "
                         f"auto on {device}")
    if dtype != torch.int8 and device.type != "cuda":
        raise ValueError(f"kv_cache_dtype {name} runs on CUDA only (the CPU attention kernel "
                         f"reads float and int8 caches); use kv_cache_dtype int8 or auto on "
                         f"{device}")
    return dtype


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
        return _DTYPES[name]
    if device.type == "cuda" or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _is_argmax_only(state: CachedRequestState) -> bool:
    """Whether the sampler would take the request's next token as the argmax of its logits,
    untouched: greedy, no penalties, no logprobs, past min_tokens (no grammar: the caller's
    check)."""
    params = state.sampling_params
    return params.is_greedy and not params.has_penalties and params.logprobs is None and (
        len(state.token_ids) - state.num_prompt_tokens >= params.min_tokens)


# A decode step of more rows than this makes its own tensors (`DecodeBuffers`); a step's
# few tensors then cost little beside its rows.
DECODE_BUFFER_ROWS = 64


class ModelRunner:
    """One rank's model. Set-up is two-phase so a worker group can agree on the cache size:
    construct (loads this rank's weights), `num_available_blocks()` on every rank, then
    `allocate_kv_cache(min over ranks)`."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 groups: ProcessGroups = SINGLE_PROCESS_GROUPS,
                 parallel: ParallelConfig | None = None,
                 speculative: SpeculativeConfig | None = None) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.device = resolve_device(model_config.device)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(cache_config.kv_cache_dtype, self.dtype,
                                               self.device)
        self.groups = groups
        self.parallel = parallel or ParallelConfig()
        self.requests: dict[str, CachedRequestState] = {}
        # Unseeded requests draw from this generator: seeded alike on every rank, so every
        # rank of a worker group samples the same tokens.
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(model_config.seed))
        self.handoff = StageHandoff(groups.pp)
        self.weights_read = ReadCounter()
        self._load_model()
        # Where CPU decode steps of up to DECODE_BUFFER_ROWS requests write their inputs.
        self.decode_buffers = DecodeBuffers(
            DECODE_BUFFER_ROWS, -(-self.max_model_len // self.block_size),
        ) if self.device.type == "cpu" else None
        # Speculative decoding: only the output rank's drafts are read, so only it proposes.
        self.proposer = make_proposer(
            speculative, model_config=model_config, cache_config=cache_config,
            device=self.device, target_vocab_size=self.vocab_size,
        ) if groups.is_output_rank else None
        # Structured outputs: grammar state of the constrained requests (ranks that sample).
        self.grammars = RequestGrammars(self._make_grammar_backend, self.vocab_size)
        # The worker half of a KV connector (`fleetlm.kvtransfer`), set by the engine; None:
        # this rank moves no KV to or from elsewhere.
        self.kv_connector: KVConnectorWorker | None = None

    # ---- setup -------------------------------------------------------------------------
    def _load_model(self) -> None:
        started = time.perf_counter()
        cfg = self.model_config
        # Random weights need only a config: a directory with config.json (no checkpoint).
        self.model_dir = Path(cfg.model) if cfg.random_weights else resolve_model(cfg.model)
        self.hf_config = load_hf_config(self.model_dir)
        self.max_model_len = min(cfg.max_model_len or self.hf_config.max_position_embeddings,
                                 self.hf_config.max_position_embeddings)
        model_class = get_model_class(self.hf_config)
        with _default_dtype(self.dtype), self.device:
            self.model = model_class(self.hf_config, self.groups, self.parallel).eval()
        if cfg.random_weights:
            _init_random(self.model, cfg.seed)
        else:
            self._load_weights()
        if self.device.type == "cpu":  # a decode step streams them: on 2 MiB pages
            huge_pages.gather_gguf_weights(self.model)
        logger.info("model %s loaded in %.1f s (%s, %s)", cfg.model,
                    time.perf_counter() - started, self.dtype, self.device)

    def _load_weights(self) -> None:
        cfg = self.model_config
        weights = iterate_checkpoint(cfg.model, cfg.quantization, self.model_dir, self.hf_config,
                                     counter=self.weights_read,
                                     progress=self.groups.world.is_first_rank)
        loaded = self.model.load_weights(weights)
        missing = {n for n, _ in self.model.named_parameters()} - loaded
        if missing:
            raise ValueError(f"checkpoint in {self.model_dir} lacks {sorted(missing)[:5]}")

    @property
    def _kv_block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): `(block_size, num_kv_heads, row)`, row being
        head_dim, or head_dim + 4 in an int8 cache (`kv_quant`: the row's scale)."""
        attention = next(iter(self.model.layers.values())).self_attn
        return (self.block_size, attention.num_kv_heads,
                kv_quant.row_width(attention.head_dim, self.kv_dtype))

    @property
    def kv_bytes_per_block(self) -> int:
        """K and V of one block over this rank's layers and KV heads."""
        element = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * len(self.model.layers) * element * int(torch.Size(self._kv_block_shape).numel())

    def num_available_blocks(self) -> int:
        """Blocks this rank could hold: `num_blocks` if configured, else what
        `kv_cache_memory_bytes` (per rank) buys with this rank's share of the model."""
        draft_bytes = self.proposer.kv_bytes_per_block if self.proposer is not None else 0
        return self.cache_config.num_blocks or (
            self.cache_config.kv_cache_memory_bytes // (self.kv_bytes_per_block + draft_bytes))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("kv_cache_memory_bytes is too small for one KV block")
        self.num_blocks = num_blocks
        shape = (num_blocks, *self._kv_block_shape)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
            for _ in self.model.layers
        ]
        if self.proposer is not None:
            self.proposer.allocate_kv_cache(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%.0f MiB, %s)", num_blocks,
                    self.block_size, num_blocks * self.kv_bytes_per_block / 2**20,
                    str(self.kv_dtype).removeprefix("torch."))

    @property
    def kv_shard(self) -> KVShard:
        """The layers and KV heads (engine-wide indices) this rank's cache holds."""
        qkv = next(iter(self.model.layers.values())).self_attn.qkv_proj
        first = self.groups.tp.rank // qkv.kv_replicas * qkv.num_kv_heads
        layers = self.model.layer_range
        return KVShard((layers.start, layers.stop), (first, first + qkv.num_kv_heads))

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def _make_grammar_backend(self):
        from fleetlm.executor.structured.backend import GrammarBackend

        return GrammarBackend(load_tokenizer(
            resolve_tokenizer(self.model_config.tokenizer, self.model_dir)), self.vocab_size)

    # ---- the step ------------------------------------------------------------------------
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run this rank's part of one step. The last stage returns the sampled tokens (and
        the KV connector's transfer news); earlier stages hand their hidden states on and
        return None (or only their transfer news)."""
        if self.kv_connector is not None:
            self.kv_connector.start_load_kv(scheduler_output.kv_connector_metadata)
        output = self._execute_model(scheduler_output)
        if self.kv_connector is not None:
            if output is None:  # an earlier pipeline stage: its transfer news only
                output = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
            output.kv_connector_output = self.kv_connector.get_finished()
        return output

    @torch.inference_mode()
    def _execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        batch = prepare_batch(self.requests, scheduler_output.num_scheduled_tokens,
                              self.block_size, self.device,
                              scheduler_output.scheduled_spec_decode_tokens, self.decode_buffers)
        grammar_bitmask = self._start_grammar_bitmask(batch)  # filled while the model runs
        plain = self._is_plain_greedy(batch, grammar_bitmask)
        hidden, sampled = None, self._greedy_step(batch) if plain else None
        if sampled is None:
            intermediate = None
            if not self.model.is_first_stage:
                intermediate = self.handoff.recv(len(batch.positions),
                                                 self.hf_config.hidden_size, self.dtype,
                                                 self.device)
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches,
                                batch.attn_metadata, intermediate)
            if not self.model.is_last_stage:
                self.handoff.send(*hidden)
                return None
            sampled = self._sample(batch, hidden, grammar_bitmask, plain)
        output = self._make_output(batch, sampled, hidden)
        if self.proposer is not None and scheduler_output.num_draft_tokens:
            output.draft_token_ids = self._propose(scheduler_output.num_draft_tokens, output)
        return output

    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
            self.grammars.remove(req_id)
        if self.proposer is not None and out.finished_req_ids:
            self.proposer.forget(out.finished_req_ids)
        for new in out.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                new.eos_token_id, list(new.block_ids), new.num_computed_tokens)
            constraint = new.sampling_params.structured_outputs
            if constraint is not None and self.model.is_last_stage:
                # A fresh matcher replays the output so far (after preemption: all of it).
                self.grammars.add(new.req_id, constraint)
        cached = out.scheduled_cached_reqs
        for req_id, block_ids, num_computed, token_ids in zip(
                cached.req_ids, cached.new_block_ids, cached.num_computed_tokens,
                cached.new_token_ids):
            state = self.requests[req_id]
            state.block_ids.extend(block_ids)
            state.num_computed_tokens = num_computed
            state.token_ids.extend(token_ids)

    def _start_grammar_bitmask(self, batch: PreparedBatch):
        """The constrained sampling requests' token masks, filled on the grammar thread."""
        if not self.model.is_last_stage or not batch.sampling_req_ids or not self.grammars:
            return None
        requests = []
        for req_id, drafts in zip(batch.sampling_req_ids, batch.sampling_drafts):
            num_accepted = self.grammars.num_accepted(req_id)
            state = self.requests[req_id]
            new_ids = [] if num_accepted is None else \
                state.token_ids[state.num_prompt_tokens + num_accepted:]
            requests.append(MaskRequest(req_id, new_ids, drafts))
        return self.grammars.start_bitmask(requests, [len(d) + 1 for d in batch.sampling_drafts])

    def _is_plain_greedy(self, batch: PreparedBatch, grammar_bitmask) -> bool:
        """Whether every sampling row takes the argmax of its logits untouched
        (`_is_argmax_only`, no grammar, no drafts): then no sampler metadata is built. Right
        after the weights have streamed through the caches, building it and the sampler's
        Python took 0.14 ms of a one-sequence decode step on the 2-vCPU EPYC."""
        return grammar_bitmask is None and not any(batch.sampling_drafts) and all(
            _is_argmax_only(self.requests[r]) for r in batch.sampling_req_ids)

    def _sample(self, batch: PreparedBatch, hidden: torch.Tensor, grammar_bitmask=None,
                plain: bool = False) -> VerifiedTokens | None:
        """The new tokens of each sampling request: one sampled token, or its accepted drafts
        and one more when it verifies drafts. `plain`: `_is_plain_greedy` holds."""
        if not batch.sampling_req_ids:
            return None
        if not plain:
            states = [self.requests[r] for r in batch.sampling_req_ids]
            # One row per position: a request verifying k drafts has k + 1, row j seeing its
            # first j drafts as outputs (penalties, min_tokens and seeds of that position).
            rows = [(s, drafts[:j]) for s, drafts in zip(states, batch.sampling_drafts)
                    for j in range(len(drafts) + 1)]
            metadata = SamplingMetadata.build(
                params=[s.sampling_params for s, _ in rows],
                prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s, _ in rows],
                output_token_ids=[s.output_token_ids + drafts for s, drafts in rows],
                eos_token_ids=[s.eos_token_id for s, _ in rows],
                vocab_size=self.vocab_size,
                device=self.device,
            )
        # The indices increase, so as many as the rows are every row in order: a decode step's
        # case, which then skips a copy (30-50 us here after the weights have left the caches).
        rows = hidden if len(batch.logits_indices) == hidden.shape[0] else \
            hidden[batch.logits_indices]
        logits = self.model.compute_logits(rows).float()
        if plain:  # what the sampler would do with these rows
            token_ids = fused_ops.argmax(logits).tolist()
            return VerifiedTokens([[t] for t in token_ids], [None] * len(token_ids))
        grammar = grammar_bitmask.result() if grammar_bitmask is not None else None
        if grammar is not None:
            metadata.grammar_bitmask, metadata.grammar_rows = grammar.bitmask, grammar.rows
        if len(rows) > len(states):
            return verify_drafts(self.sampler, logits, metadata, batch.sampling_drafts)
        sampled = self.sampler(logits, metadata)
        token_ids = sampled.sampled_token_ids.tolist()
        logprobs = [None] * len(token_ids) if sampled.logprobs is None else \
            [None if lp is None else [lp] for lp in sampled.logprobs]
        return VerifiedTokens([[t] for t in token_ids], logprobs)

    def _greedy_step(self, batch: PreparedBatch) -> VerifiedTokens | None:
        """A plain greedy step's tokens (`_is_plain_greedy`) from the model's own greedy call
        (`decode_argmax`: the model, its LM head and the argmax in one native call), where
        nothing else needs the hidden states or logits (every row samples, no prompt
        logprobs); else None, and nothing ran."""
        decode_argmax = getattr(self.model, "decode_argmax", None)
        if decode_argmax is None or batch.prompt_logprob_rows \
                or len(batch.sampling_req_ids) != len(batch.req_ids):
            return None
        tokens = decode_argmax(batch.input_ids, batch.positions, self.kv_caches,
                               batch.attn_metadata)
        return None if tokens is None else VerifiedTokens([[t] for t in tokens],
                                                          [None] * len(tokens))

    def _make_output(self, batch: PreparedBatch, sampled: VerifiedTokens | None,
                     hidden) -> ModelRunnerOutput:
        sampled_ids: dict[str, list[int]] = {}
        logprobs = {}
        if sampled is not None:  # the tokens come back in the next step's diffs
            for i, req_id in enumerate(batch.sampling_req_ids):
                sampled_ids[req_id] = sampled.token_ids[i]
                if sampled.logprobs[i] is not None:
                    logprobs[req_id] = sampled.logprobs[i]
        return ModelRunnerOutput(
            req_ids=batch.req_ids,
            sampled_token_ids=[sampled_ids.get(r, []) for r in batch.req_ids],
            logprobs=logprobs,
            prompt_logprobs=self._prompt_logprobs(batch, hidden),
        )

    def _propose(self, num_drafts: dict[str, int], output: ModelRunnerOutput):
        requests = [
            DraftRequest(req_id, self.requests[req_id].token_ids + token_ids, num_drafts[req_id],
                         self.requests[req_id].block_ids)
            for req_id, token_ids in zip(output.req_ids, output.sampled_token_ids)
            if token_ids and num_drafts.get(req_id)
        ]
        return self.proposer.propose(requests) if requests else {}

    def _prompt_logprobs(self, batch: PreparedBatch, hidden: torch.Tensor):
        result = {}
        for req_id, (row, count, first_pos) in batch.prompt_logprob_rows.items():
            state = self.requests[req_id]
            logits = self.model.compute_logits(hidden[row:row + count]).float()
            targets = state.token_ids[first_pos + 1:first_pos + 1 + count]
            entries = compute_prompt_logprobs(logits, targets,
                                              state.sampling_params.prompt_logprobs)
            result[req_id] = ([None] if first_pos == 0 else []) + entries
        return result


def _init_random(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        values = torch.ones(param.shape) if "norm" in name else \
            torch.randn(param.shape, generator=generator) * 0.02
        param.detach().copy_(values)
