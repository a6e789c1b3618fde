"""Helpers shared by the scheduler tests: small schedulers, requests and a fake runner."""

from __future__ import annotations

from fleetlm.executor.config import SchedulerConfig
from fleetlm.executor.kv_cache_manager import KVCacheManager
from fleetlm.executor.outputs import ModelRunnerOutput, SchedulerOutput
from fleetlm.executor.request import Request
from fleetlm.executor.sampling_params import SamplingParams
from fleetlm.executor.scheduler import Scheduler

BLOCK_SIZE = 4
EOS = 2


def make_scheduler(num_blocks=32, enable_caching=True, connector=None, spec=None,
                   **config) -> Scheduler:
    config.setdefault("max_model_len", 1024)
    manager = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=enable_caching)
    return Scheduler(SchedulerConfig(**config), manager, connector, spec)


def make_request(request_id, prompt, arrival_time=0.0, priority=0, **params) -> Request:
    params.setdefault("max_tokens", 100)
    if isinstance(prompt, int):  # a prompt of this many tokens, unique to the request
        prompt = [1000 * sum(map(ord, request_id)) + i for i in range(prompt)]
    return Request(request_id, prompt, SamplingParams(**params), EOS, arrival_time, priority)


def runner_output(scheduler: Scheduler, output: SchedulerOutput, tokens=None) -> ModelRunnerOutput:
    """Sample for each request whose scheduled tokens reach its end, as the runner would:
    `tokens[req_id]` if given, else 500 + its number of output tokens."""
    tokens = tokens or {}
    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        is_complete = request.num_computed_tokens == request.num_tokens
        sampled.append([tokens.get(req_id, 500 + request.num_output_tokens)] if is_complete else [])
    return ModelRunnerOutput(req_ids, sampled)


def step(scheduler: Scheduler, tokens=None):
    output = scheduler.schedule()
    engine_outputs = scheduler.update_from_output(output, runner_output(scheduler, output, tokens))
    scheduler.check_invariants()
    return output, {o.req_id: o for o in engine_outputs}
