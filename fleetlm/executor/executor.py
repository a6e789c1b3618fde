"""Executors: run a SchedulerOutput on the model's workers and return one ModelRunnerOutput.

`LocalExecutor` runs the model in this process (tensor and pipeline parallel size 1);
`RayExecutor` (ray_executor.py) drives a worker group of Ray actors. Both implement `Executor`,
so the engine core does not know which it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.model_runner import ModelRunner
from fleetlm.executor.outputs import ModelRunnerOutput, SchedulerOutput

T = TypeVar("T")
FailureListener = Callable[[BaseException], None]


class StepFuture(ABC):
    """A step sent to the workers; `result()` waits for its output."""

    @abstractmethod
    def result(self) -> ModelRunnerOutput: ...


class DoneStep(StepFuture):
    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class Executor(ABC):
    """Contract: `execute_async` is called once per engine step with the scheduler's output;
    up to `max_concurrent_batches` steps may be in flight, and their results are collected in
    the order they were sent. `collective_rpc` runs a function on every worker (its
    `ModelRunner` for the local executor, its `Worker` for a group) and returns the results in
    rank order. A worker group that fails between steps tells the `add_failure_listener`
    callbacks at once. The attributes describe what the workers loaded."""

    num_blocks: int
    max_model_len: int
    vocab_size: int
    model_dir: Path
    hf_config: Any
    max_concurrent_batches: int = 1

    @abstractmethod
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepFuture: ...

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(scheduler_output).result()

    @abstractmethod
    def collective_rpc(self, fn: Callable[[Any], T]) -> list[T]: ...

    def add_failure_listener(self, listener: FailureListener) -> None:
        pass

    @property
    def is_healthy(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config.model, config.cache, speculative=config.speculative)
        self.runner.allocate_kv_cache(self.runner.num_available_blocks())
        self.num_blocks = self.runner.num_blocks
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        self.model_dir = self.runner.model_dir
        self.hf_config = self.runner.hf_config

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepFuture:
        return DoneStep(self.runner.execute_model(scheduler_output))

    def collective_rpc(self, fn: Callable[[ModelRunner], T]) -> list[T]:
        return [fn(self.runner)]


def make_executor(config: EngineConfig) -> Executor:
    """The in-process executor for one rank, a Ray worker group otherwise."""
    if not config.parallel.is_distributed:
        return LocalExecutor(config)
    from fleetlm.executor.ray_executor import RayExecutor

    return RayExecutor(config)
