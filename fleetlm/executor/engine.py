"""The synchronous engine: input processing, the engine core, output processing.

The offline `LLM` drives it directly; `AsyncEngine` drives it from a background thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.engine_core import EngineCore
from fleetlm.executor.executor import Executor, make_executor
from fleetlm.executor.input_processor import InputProcessor
from fleetlm.executor.output_processor import OutputProcessor
from fleetlm.executor.outputs import RequestOutput
from fleetlm.executor.protocol import EngineStats
from fleetlm.executor.request import Request, RequestStatus
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.executor.weights import load_tokenizer, resolve_tokenizer
from fleetlm.kvtransfer.params import check_request_params


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.executor = executor or make_executor(config)
        self.core = EngineCore(config, self.executor)
        self.tokenizer = load_tokenizer(
            resolve_tokenizer(config.model.tokenizer, self.executor.model_dir))
        self.max_model_len = self.executor.max_model_len
        self.input_processor = InputProcessor(
            self.tokenizer, self.max_model_len, self.executor.vocab_size,
            _eos_token_id(self.tokenizer, self.executor.hf_config))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.kv_bytes_per_block = kv_bytes_per_block(self.executor, config)

    def make_requests(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                      priority: int = 0, resume_token_ids: list[int] | None = None,
                      kv_transfer_params: dict | None = None) -> list[Request]:
        """Validate and tokenize (raises ValueError); safe to call off the engine thread.
        `resume_token_ids`: go on after output already generated elsewhere (see `Request`).
        `kv_transfer_params` (n == 1): {"do_remote_decode": True} on a prefill engine, or
        the transfer params of a prefill engine's output on a decode engine."""
        prompt_token_ids = self.input_processor.tokenize(prompt)
        requests = self.input_processor.make_requests(
            request_id, prompt_token_ids, params, priority, resume_token_ids=resume_token_ids)
        if kv_transfer_params is not None:
            if len(requests) != 1:
                raise ValueError("kv_transfer_params needs n == 1")
            check_request_params(kv_transfer_params)
            requests[0].kv_transfer_params = kv_transfer_params
        return requests

    def add_requests(self, request_id: str, prompt: str | None,
                     requests: list[Request]) -> None:
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        first = requests[0]
        params = first.sampling_params if len(requests) == 1 else \
            _parent_params(first.sampling_params, len(requests))
        self.output_processor.add_request(request_id, prompt, first.prompt_token_ids, params,
                                          first.arrival_time, first.output_token_ids)
        try:
            for request in requests:
                self.core.add_request(request)
        except Exception:  # queue full: take back the children already queued
            self.abort_request(request_id)
            raise
        self.num_prompt_tokens += first.num_prompt_tokens

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, resume_token_ids: list[int] | None = None,
                    kv_transfer_params: dict | None = None) -> None:
        requests = self.make_requests(request_id, prompt, params, priority, resume_token_ids,
                                      kv_transfer_params)
        self.add_requests(request_id, prompt if isinstance(prompt, str) else None, requests)

    def abort_request(self, request_id: str) -> None:
        self.core.finish_requests(self.output_processor.child_ids(request_id),
                                  RequestStatus.FINISHED_ABORTED)
        self.output_processor.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        if self.core.kv_events is not None:
            self.core.kv_events.end_step()  # this step's cache changes: one batch
        self.num_generation_tokens += sum(len(o.new_token_ids) for o in core_outputs)
        processed = self.output_processor.process_outputs(core_outputs)
        if processed.reqs_to_stop:
            self.core.finish_requests(processed.reqs_to_stop, RequestStatus.FINISHED_STOPPED)
        return processed.request_outputs

    def shutdown(self) -> None:
        """Stop the KV connector's server and the executor's workers (a worker group's
        actors and placement group)."""
        self.core.shutdown()
        self.executor.shutdown()

    def stats(self) -> EngineStats:
        s = self.core.scheduler.stats()
        return EngineStats(
            num_running=s["num_running"], num_waiting=s["num_waiting"],
            kv_cache_usage=s["kv_cache_usage"], num_kv_blocks=s["num_kv_blocks"],
            prefix_cache_queries=s["prefix_cache_queries"],
            prefix_cache_hits=s["prefix_cache_hits"], num_preemptions=s["num_preemptions"],
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            **_spec_stats(s.get("spec_decode")),
            **self._transfer_stats(s))

    def _transfer_stats(self, s: dict) -> dict:
        if self.config.kv_transfer is None:
            return {}
        transfers = s["transfers"]
        return {"kv_active_leases": s["num_active_leases"],
                "kv_transfers_done": transfers.num_loads_done,
                "kv_transfer_bytes": transfers.num_blocks_loaded * self.kv_bytes_per_block,
                "kv_transfer_failures": dict(transfers.failures_by_cause),
                "kv_transfer_latency": transfers.latency.to_dict()}

    def kv_events_since(self, engine_id: str | None, seq: int) -> dict:
        """The prefix cache's changes after batch `seq` of engine `engine_id`, or a snapshot
        (`KVEventBuffer.since`); safe to ask from any thread. ValueError if events are off."""
        if self.core.kv_events is None:
            raise ValueError("KV events are off: set engine.enable_kv_events")
        return self.core.kv_events.since(engine_id, seq)

    def kv_events_unseen(self, cursors: Mapping[str, int]) -> dict | None:
        """The prefix cache's changes a router with `cursors` (engine id -> last batch it
        applied) has not seen, as `kv_events_since` batches; None: no cursor of this
        engine's, too far behind (`KVEventBuffer.unseen`), or events are off. Any thread."""
        if self.core.kv_events is None:
            return None
        return self.core.kv_events.unseen(cursors)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block if none is in use (`BlockPool.reset_prefix_cache`);
        engine thread only."""
        is_reset = self.core.scheduler.kv_cache_manager.block_pool.reset_prefix_cache()
        if self.core.kv_events is not None:
            self.core.kv_events.end_step()
        return is_reset

    def num_cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading prompt tokens whose KV this engine's prefix cache holds now (see
        `KVCacheManager.num_cached_prefix_tokens`); safe to ask from any thread."""
        return self.core.scheduler.kv_cache_manager.num_cached_prefix_tokens(token_ids)


def _spec_stats(stats) -> dict:
    if stats is None:
        return {}
    return {"spec_num_drafts": stats.num_drafts,
            "spec_num_draft_tokens": stats.num_draft_tokens,
            "spec_num_accepted_tokens": stats.num_accepted_tokens,
            "spec_accepted_per_position": tuple(stats.accepted_per_position)}


def _parent_params(child: SamplingParams, n: int) -> SamplingParams:
    return replace(child, n=n)


def _eos_token_id(tokenizer, hf_config) -> int | None:
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    eos = getattr(hf_config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) else eos


def kv_bytes_per_block(executor: Executor, config: EngineConfig) -> int:
    """K and V of one block over every layer and KV head (all ranks together)."""
    import torch

    from fleetlm.executor.model_runner import resolve_dtype, resolve_kv_cache_dtype
    from fleetlm.kernels.kv_quant import row_width

    hf_config = executor.hf_config
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    runner = getattr(executor, "runner", None)  # in-process: its dtype; a group's: resolved
    device = getattr(executor, "device", torch.device("cpu"))
    dtype = runner.kv_dtype if runner is not None else resolve_kv_cache_dtype(
        config.cache.kv_cache_dtype, resolve_dtype(config.model.dtype, device), device)
    element_size = torch.empty((), dtype=dtype).element_size()
    return (2 * hf_config.num_hidden_layers * config.cache.block_size * num_kv_heads
            * row_width(head_dim, dtype) * element_size)
