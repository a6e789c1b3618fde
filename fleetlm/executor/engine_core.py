"""The engine step: schedule, execute, update. Nothing else belongs in it.

Under pipeline parallelism up to `executor.max_concurrent_batches` steps are in flight, so
every stage has work: the scheduler marks scheduled tokens computed at once, so a request
whose step is in flight has nothing new to schedule until its result is in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.executor import Executor, StepFuture
from fleetlm.executor.kv_cache_manager import KVCacheManager
from fleetlm.executor.outputs import EngineCoreOutput, SchedulerOutput
from fleetlm.executor.request import Request, RequestStatus
from fleetlm.executor.scheduler import Scheduler
from fleetlm.executor.spec.controller import SpecDecodeController


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.executor = executor
        kv_cache_manager = KVCacheManager(
            num_blocks=executor.num_blocks,
            block_size=config.cache.block_size,
            enable_caching=config.cache.enable_prefix_caching,
            hash_seed=config.cache.hash_seed,
        )
        scheduler_config = replace(config.scheduler, max_model_len=executor.max_model_len,
                                   num_micro_batches=executor.max_concurrent_batches)
        spec = None if config.speculative is None else SpecDecodeController(config.speculative)
        self.scheduler = Scheduler(scheduler_config, kv_cache_manager, spec=spec)
        self.in_flight: deque[tuple[SchedulerOutput, StepFuture]] = deque()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """Schedule and send steps while more may be in flight, then finish the oldest."""
        while len(self.in_flight) < self.executor.max_concurrent_batches:
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.is_empty and self.in_flight and \
                    not scheduler_output.finished_req_ids:
                break  # nothing new to run or tell before the oldest step's tokens are in
            self.in_flight.append((scheduler_output, self.executor.execute_async(scheduler_output)))
        scheduler_output, future = self.in_flight.popleft()
        return self.scheduler.update_from_output(scheduler_output, future.result())
