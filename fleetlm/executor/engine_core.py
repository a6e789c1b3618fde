"""The engine step: schedule, execute, update. Nothing else belongs in it.

Under pipeline parallelism up to `executor.max_concurrent_batches` steps are in flight, so
every stage has work: the scheduler marks scheduled tokens computed at once, so a request
whose step is in flight has nothing new to schedule until its result is in.

With a KV connector (`config.kv_transfer`), a step with nothing to run while transfers are
pending (requests waiting for their KV, blocks held for a reader) blocks until the connector
has news, then runs an empty step that collects it: the loop neither spins nor sleeps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from fleetlm.executor.config import EngineConfig, KVTransferConfig
from fleetlm.executor.executor import Executor, LocalExecutor, StepFuture
from fleetlm.executor.kv_cache_manager import KVCacheManager
from fleetlm.executor.kv_events import KVEventBuffer
from fleetlm.executor.outputs import EngineCoreOutput, SchedulerOutput
from fleetlm.executor.request import Request, RequestStatus
from fleetlm.executor.scheduler import Scheduler
from fleetlm.executor.spec.controller import SpecDecodeController


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.executor = executor
        self.kv_events = KVEventBuffer() if config.cache.enable_kv_events else None
        kv_cache_manager = KVCacheManager(
            num_blocks=executor.num_blocks,
            block_size=config.cache.block_size,
            enable_caching=config.cache.enable_prefix_caching,
            hash_seed=config.cache.hash_seed,
            kv_events=self.kv_events,
        )
        scheduler_config = replace(config.scheduler, max_model_len=executor.max_model_len,
                                   num_micro_batches=executor.max_concurrent_batches)
        spec = None if config.speculative is None else SpecDecodeController(config.speculative)
        self.kv_transfer = None if config.kv_transfer is None else \
            _make_kv_transfer(config.kv_transfer, executor)
        connector = None if self.kv_transfer is None else self.kv_transfer.scheduler
        self.scheduler = Scheduler(scheduler_config, kv_cache_manager, connector, spec)
        self.in_flight: deque[tuple[SchedulerOutput, StepFuture]] = deque()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        """Requests to run, steps in flight, or transfer news to collect (a lease ended)."""
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight) or (
            self.kv_transfer is not None and self.kv_transfer.has_news())

    def step(self) -> list[EngineCoreOutput]:
        """Schedule and send steps while more may be in flight, then finish the oldest."""
        while len(self.in_flight) < self.executor.max_concurrent_batches:
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.is_idle:
                if self.in_flight:
                    break  # nothing new to run or tell before the oldest step's tokens are in
                self._wait_for_transfers()
            self.in_flight.append((scheduler_output, self.executor.execute_async(scheduler_output)))
        scheduler_output, future = self.in_flight.popleft()
        return self.scheduler.update_from_output(scheduler_output, future.result())

    def _wait_for_transfers(self) -> None:
        """Nothing to run: if that is because of transfers, block until one has news."""
        scheduler = self.scheduler
        if self.kv_transfer is not None and scheduler.has_unfinished_requests() and (
                scheduler.num_loading or scheduler.sending):
            self.kv_transfer.wait_for_news()

    def wake(self) -> None:
        """Make a step blocked in `_wait_for_transfers` go on (new work arrived)."""
        if self.kv_transfer is not None:
            self.kv_transfer.wake()

    def add_transfer_listener(self, listener) -> None:
        """`listener()` is called from any thread when there is transfer news to collect."""
        if self.kv_transfer is not None:
            self.kv_transfer.add_listener(listener)

    def shutdown(self) -> None:
        if self.kv_transfer is not None:
            self.kv_transfer.close()


def _make_kv_transfer(config: KVTransferConfig, executor: Executor):
    """The P/D connector: its worker half in the one in-process rank, or in every rank of
    a worker group (`RayExecutor.start_kv_connector`)."""
    from fleetlm.kvtransfer.pd_connector import PDConnector

    if isinstance(executor, LocalExecutor):
        return PDConnector.in_process(config, executor.runner)
    return executor.start_kv_connector(config)
