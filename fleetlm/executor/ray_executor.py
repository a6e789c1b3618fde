"""`RayExecutor`: one engine replica driving a worker group of Ray actors, one per rank.

Start-up, in order:
    reserve bundles      the Serve replica's own placement group (bundle 0 is the replica,
                         1..N the workers) or, offline, a new one of N worker bundles
    start the workers    one actor per bundle; each dials the driver's link
    process groups       rank 0 picks a rendezvous port; every rank joins over gloo / NCCL
    load, agree, cache   every rank loads its shard; num_blocks = the minimum over ranks
Then each step is one `control.submit` and, when its result is wanted, one `control.result`.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fleetlm.executor import wire
from fleetlm.executor.config import EngineConfig, KVTransferConfig, ModelConfig, ParallelConfig
from fleetlm.executor.control import (
    LinkControlPlane,
    RayCallControlPlane,
    ShmRing,
    WorkerGroupError,
    WorkerLinks,
)
from fleetlm.executor.executor import Executor, FailureListener, StepFuture
from fleetlm.executor.outputs import ModelRunnerOutput, SchedulerOutput
from fleetlm.executor.weights import load_hf_config, resolve_model
from fleetlm.executor.worker import Worker, worker_info
from fleetlm.parallel.state import ParallelLayout

if TYPE_CHECKING:
    from fleetlm.kvtransfer.group import RankReports

T = TypeVar("T")
logger = logging.getLogger("fleetlm.ray_executor")

SETUP_TIMEOUT_S = 600.0  # model loading on a slow disk included
PLACEMENT_TIMEOUT_S = 120.0  # then a clear error says which resources are missing
SHM_SLOTS = 16
SHM_SLOT_BYTES = 1 << 20  # larger steps go over the links


class RayWorker(Worker):
    """`Worker` as a Ray actor, plus where it runs."""

    def info(self) -> dict[str, Any]:
        return worker_info()


class RayExecutor(Executor):
    """`collect_all_ranks`: every rank replies to every step (always with a KV connector,
    which needs each rank's transfer reports; the replies of the sampling ranks are checked
    to agree); otherwise only the output rank replies."""

    def __init__(self, config: EngineConfig, collect_all_ranks: bool = False) -> None:
        import ray

        self.collect_all_ranks = collect_all_ranks or config.kv_transfer is not None
        self.kv_connector = None  # the P/D connector's engine handle, once started
        self.group_id = secrets.token_hex(4)  # names the worker actors: fleetlm-<id>-rank<r>
        parallel = config.parallel
        self.layout = ParallelLayout(parallel.tensor_parallel_size,
                                     parallel.pipeline_parallel_size)
        self.max_concurrent_batches = parallel.num_batches_in_flight
        self._listeners: list[FailureListener] = []
        self._describe_model(config.model, parallel)
        if not ray.is_initialized():
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                     logging_level=logging.WARNING)
        self.driver = worker_info()
        # Every worker runs on the device its bundle reserved (the driver may have none).
        self.device = worker_device(config.model.device)
        self.config = replace(config, model=replace(config.model, device=self.device.type))
        self.placement_group, self._first_bundle, self._owns_group = _reserve_bundles(
            parallel, self.layout.world_size, self.device)
        self.workers: list[Any] = []
        self.ring: ShmRing | None = None
        try:
            self._start_workers()
            self._connect_workers()
            self._init_process_groups()
            self._load_model()
        except BaseException:
            self.shutdown()
            raise
        self.control = self._make_control_plane()
        logger.info("worker group of %d ready (tp %d, pp %d, %s control, %d KV blocks)",
                    self.layout.world_size, self.layout.tensor_parallel_size,
                    self.layout.pipeline_parallel_size, parallel.control_plane, self.num_blocks)

    # ---- start-up ----------------------------------------------------------------------
    def _describe_model(self, model: ModelConfig, parallel: ParallelConfig) -> None:
        """What the engine needs to know, read on the driver: the workers resolve the same
        name on their own nodes (a GGUF is converted once per node)."""
        self.model_dir = Path(model.model) if model.random_weights else resolve_model(model.model)
        self.hf_config = load_hf_config(self.model_dir)
        parallel.check_fits(self.hf_config)
        max_position = self.hf_config.max_position_embeddings
        self.max_model_len = min(model.max_model_len or max_position, max_position)
        self.vocab_size = self.hf_config.vocab_size

    def _start_workers(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        parallel = self.config.parallel
        num_threads = max(1, int(parallel.worker_num_cpus))
        actor_class = ray.remote(RayWorker)
        for rank in range(self.layout.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=self._first_bundle + rank)
            self.workers.append(actor_class.options(
                name=f"fleetlm-{self.group_id}-rank{rank}",
                num_cpus=parallel.worker_num_cpus,
                num_gpus=_worker_num_gpus(parallel, self.device),
                scheduling_strategy=strategy,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(num_threads)}},
            ).remote(rank, self.config, num_threads))
        self.infos = ray.get([w.info.remote() for w in self.workers], timeout=SETUP_TIMEOUT_S)
        nodes = sorted({info["node_ip"] for info in self.infos})
        logger.info("%d workers on %d node(s): %s", len(self.workers), len(nodes), nodes)

    def _connect_workers(self) -> None:
        import ray

        parallel = self.config.parallel
        self.links = WorkerLinks(self.driver["node_ip"], self.layout.world_size, self._fail)
        local = [r for r, info in enumerate(self.infos)
                 if info["node_id"] == self.driver["node_id"]]
        if parallel.control_plane == "shm" and local:
            path = os.path.join(_shm_dir(), f"fleetlm-steps-{self.links.token}")
            self.ring = ShmRing(path, len(local), SHM_SLOTS, SHM_SLOT_BYTES, create=True)
        address = self.links.address(self.ring)
        reply_ranks = set(self.reply_ranks)
        serve_steps = parallel.control_plane != "ray"
        calls = [w.connect.remote(address, local.index(r) if self.ring and r in local else None,
                                  r in reply_ranks, serve_steps)
                 for r, w in enumerate(self.workers)]
        self.links.accept_all(SETUP_TIMEOUT_S)
        ray.get(calls, timeout=SETUP_TIMEOUT_S)
        if self.ring is not None:
            self.ring.unlink()  # every reader has it mapped: nothing is left behind on a crash
        self._ring_ranks = local if self.ring is not None else []

    def _init_process_groups(self) -> None:
        import ray

        first = self.infos[0]
        port = ray.get(self.workers[0].free_port.remote())
        init_method = f"tcp://{first['node_ip']}:{port}"
        ray.get([w.init_distributed.remote(init_method, info["node_ip"])
                 for w, info in zip(self.workers, self.infos)], timeout=SETUP_TIMEOUT_S)

    def _load_model(self) -> None:
        import ray

        blocks = ray.get([w.load_model.remote() for w in self.workers], timeout=SETUP_TIMEOUT_S)
        self.num_blocks = min(blocks)
        ray.get([w.allocate_kv_cache.remote(self.num_blocks) for w in self.workers],
                timeout=SETUP_TIMEOUT_S)

    def _make_control_plane(self):
        parallel = self.config.parallel
        if parallel.control_plane == "ray":
            return RayCallControlPlane(self.workers, self.links, self.reply_ranks,
                                       parallel.step_timeout_s)
        return LinkControlPlane(self.links, self.reply_ranks, parallel.step_timeout_s,
                                self.ring, self._ring_ranks)

    @property
    def reply_ranks(self) -> list[int]:
        """The ranks whose step results the engine reads, the output rank first."""
        output_rank = self.layout.output_rank
        if not self.collect_all_ranks:
            return [output_rank]
        return [output_rank] + [r for r in range(self.layout.world_size) if r != output_rank]

    def start_kv_connector(self, config: KVTransferConfig):
        """The P/D connector's worker half in every rank; its engine handle (`PDConnector`),
        whose news the ranks' news frames set, and which merges the ranks' reports."""
        from fleetlm.kvtransfer.group import RankReports
        from fleetlm.kvtransfer.pd_connector import PDConnector

        ranks = self.collective_rpc(lambda worker: worker.start_kv_connector())
        shards = [shard for shard, _ in ranks]
        self.collective_rpc(lambda worker: worker.kv_connector.join(shards))

        def count(name: str) -> int:
            return sum(self.collective_rpc(lambda worker: getattr(worker.kv_connector, name)))

        self.kv_connector = PDConnector(config, ranks, RankReports(len(self.workers)), count)
        self.links.on_news = self.kv_connector.notify
        return self.kv_connector

    # ---- steps ---------------------------------------------------------------------------
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepFuture:
        if self.kv_connector is not None:
            self.kv_connector.step_sent()  # news from before is collected by this step
        self.control.submit(wire.encode(scheduler_output))
        return _GroupStep(self.control, self.kv_connector)

    def collective_rpc(self, fn: Callable[[Worker], T]) -> list[T]:
        import ray

        return ray.get([w.run.remote(fn) for w in self.workers], timeout=SETUP_TIMEOUT_S)

    # ---- failure -------------------------------------------------------------------------
    def add_failure_listener(self, listener: FailureListener) -> None:
        self._listeners.append(listener)

    @property
    def is_healthy(self) -> bool:
        return self.links.error is None

    def _fail(self, error: BaseException) -> None:
        for listener in list(self._listeners):
            listener(error)

    def shutdown(self) -> None:
        import ray
        from ray.util import remove_placement_group

        if getattr(self, "links", None) is not None:
            self.links.close()
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self.ring is not None:
            self.ring.unlink()
            self.ring.close()
            self.ring = None
        if self._owns_group and self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


class _GroupStep(StepFuture):
    def __init__(self, control, kv_connector) -> None:
        self.control = control
        self.kv_connector = kv_connector

    def result(self) -> ModelRunnerOutput:
        outputs = [wire.decode(reply) for reply in self.control.result()]
        reports = self.kv_connector.reports if self.kv_connector is not None else None
        return merge_rank_outputs(outputs, reports)


def merge_rank_outputs(outputs: list[ModelRunnerOutput],
                       reports: RankReports | None = None) -> ModelRunnerOutput:
    """One step's result from the reply ranks' results (the output rank's first): its tokens,
    checked against every other sampling rank's, and with a KV connector (`reports`: every
    rank replies, in rank order) the transfers now over on every rank (accumulated across
    steps: a load is done when every rank has its part, failed once if any rank's failed)."""
    merged = outputs[0]
    for other in outputs[1:]:
        if other.req_ids and other.sampled_token_ids != merged.sampled_token_ids:
            raise WorkerGroupError("the ranks of the last pipeline stage sampled different "
                                   f"tokens: {merged.sampled_token_ids} != "
                                   f"{other.sampled_token_ids}")
    if reports is not None:  # the reply ranks are in the same order every step
        merged.kv_connector_output = reports.merge([o.kv_connector_output for o in outputs])
    return merged


def worker_device(device: str):
    """The workers' device: as configured, or for "auto" CUDA when the Ray cluster has GPUs
    (the driver's own view may lack them: a Serve replica without GPUs of its own)."""
    import ray
    import torch

    if device != "auto":
        return torch.device(device)
    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return torch.device("cuda" if has_gpus else "cpu")


def _worker_num_gpus(parallel: ParallelConfig, device) -> float:
    if parallel.worker_num_gpus is not None:
        return parallel.worker_num_gpus
    return 1.0 if device.type == "cuda" else 0.0


def worker_bundles(parallel: ParallelConfig, device) -> list[dict[str, float]]:
    """One placement-group bundle per rank."""
    bundle = {"CPU": parallel.worker_num_cpus}
    num_gpus = _worker_num_gpus(parallel, device)
    if num_gpus:
        bundle["GPU"] = num_gpus
    return [dict(bundle) for _ in range(parallel.world_size)]


def _reserve_bundles(parallel: ParallelConfig, num_workers: int, device):
    """(placement group, index of the first worker bundle, whether we made it)."""
    import ray
    from ray.util import get_current_placement_group, placement_group, remove_placement_group

    current = get_current_placement_group()
    if current is not None:
        # A Serve replica deployed with placement_group_bundles: bundle 0 is the replica.
        num_bundles = len(current.bundle_specs)
        if num_bundles < num_workers + 1:
            raise ValueError(f"the replica's placement group has {num_bundles} bundles; "
                             f"{num_workers} workers need {num_workers + 1}")
        return current, 1, False
    bundles = worker_bundles(parallel, device)
    group = placement_group(bundles, strategy=parallel.placement_strategy)
    if not group.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
        remove_placement_group(group)
        raise WorkerGroupError(
            f"could not reserve {num_workers} worker bundles of {bundles[0]} "
            f"({parallel.placement_strategy}) in {PLACEMENT_TIMEOUT_S:.0f} s; the cluster has "
            f"{ray.available_resources()} free")
    return group, 0, True


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
