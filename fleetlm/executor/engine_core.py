"""The engine step: schedule, execute, update. Nothing else belongs in it."""

from __future__ import annotations

from dataclasses import replace

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.executor import Executor
from fleetlm.executor.kv_cache_manager import KVCacheManager
from fleetlm.executor.outputs import EngineCoreOutput
from fleetlm.executor.request import Request, RequestStatus
from fleetlm.executor.scheduler import Scheduler


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.executor = executor
        kv_cache_manager = KVCacheManager(
            num_blocks=executor.num_blocks,
            block_size=config.cache.block_size,
            enable_caching=config.cache.enable_prefix_caching,
            hash_seed=config.cache.hash_seed,
        )
        scheduler_config = replace(config.scheduler, max_model_len=executor.max_model_len)
        self.scheduler = Scheduler(scheduler_config, kv_cache_manager)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)
