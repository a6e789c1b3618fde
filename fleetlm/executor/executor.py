"""Executors: run a SchedulerOutput on the model's workers and return one ModelRunnerOutput.

`LocalExecutor` runs the model in this process (tensor and pipeline parallel size 1). A Ray
worker-group executor for TP x PP comes with the parallelism issues; it implements the same
interface, so the engine core does not change.
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


class Executor(ABC):
    """Contract: `execute` is called once per engine step with the scheduler's output and
    returns the sampled tokens; `collective_rpc` runs a setup function on every worker and
    returns the results in rank order. The attributes describe what the workers loaded."""

    num_blocks: int
    max_model_len: int
    vocab_size: int
    model_dir: Path
    hf_config: Any

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    @abstractmethod
    def collective_rpc(self, fn: Callable[[ModelRunner], T]) -> list[T]: ...

    def shutdown(self) -> None:
        pass


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config.model, config.cache)
        self.runner.allocate_kv_cache(self.runner.num_available_blocks())
        self.num_blocks = self.runner.num_blocks
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        self.model_dir = self.runner.model_dir
        self.hf_config = self.runner.hf_config

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def collective_rpc(self, fn: Callable[[ModelRunner], T]) -> list[T]:
        return [fn(self.runner)]
