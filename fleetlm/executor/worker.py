"""One rank of a worker group: its device, its process groups, its ModelRunner, and the loop
that takes steps from the driver.

A plain class, driven in this order by `RayExecutor` (which runs it as a Ray actor):
    connect(address, ...)        dial the driver's link (log records flow from here on)
    init_distributed(method)     join the process groups
    load_model() -> blocks       this rank's weights; how many KV blocks it could hold
    allocate_kv_cache(n)         n = the minimum over ranks
    start_kv_connector()         with `kv_transfer`: this rank's half of the P/D connector
    then either execute_step(message) per step (the `ray` control plane) or nothing: the
    link thread started by `connect` runs the steps (`socket` and `shm`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
import torch

from fleetlm.executor import wire
from fleetlm.executor.config import EngineConfig
from fleetlm.executor.control import ERROR, LOG, NEWS, OUTPUT, LinkAddress, WorkerEndpoint
from fleetlm.executor.model_runner import ModelRunner, resolve_device
from fleetlm.executor.openmp import in_passing_thread
from fleetlm.executor.outputs import ModelRunnerOutput
from fleetlm.parallel.state import (
    SINGLE_PROCESS_GROUPS,
    ParallelLayout,
    choose_backend,
    distributed_environment,
)

T = TypeVar("T")
logger = logging.getLogger("fleetlm.worker")

# As in AsyncEngine: the step thread gives up the GIL around every torch op and must get it
# back at once, although Ray's own threads share this process.
_GIL_SWITCH_INTERVAL_S = 0.0002
_SIOCGIFADDR = 0x8915


class Worker:
    def __init__(self, rank: int, config: EngineConfig, num_threads: int = 1) -> None:
        self.rank = rank
        self.config = config
        parallel = config.parallel
        self.layout = ParallelLayout(parallel.tensor_parallel_size,
                                     parallel.pipeline_parallel_size)
        self.device = resolve_device(config.model.device)
        self.groups = SINGLE_PROCESS_GROUPS
        self.runner: ModelRunner | None = None
        self.kv_connector = None  # this rank's PDConnectorWorker, with `kv_transfer`
        self.endpoint: WorkerEndpoint | None = None
        self.is_reply_rank = rank == self.layout.output_rank
        self.step_s = 0.0  # time in steps; minus the runner's handoff wait, this rank's work
        self._exit_stack = contextlib.ExitStack()
        torch.set_num_threads(num_threads)
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))

    # ---- set-up ------------------------------------------------------------------------
    def connect(self, address: LinkAddress, reader_index: int | None, is_reply_rank: bool,
                serve_steps: bool) -> None:
        """Dial the driver; forward this process's fleetlm log records over the link; with
        `serve_steps`, take steps from the link in a thread of their own."""
        self.is_reply_rank = is_reply_rank
        self.endpoint = WorkerEndpoint(address, self.rank, reader_index)
        handler = _LinkLogHandler(self.endpoint)
        fleetlm_logger = logging.getLogger("fleetlm")
        fleetlm_logger.addHandler(handler)
        fleetlm_logger.setLevel(logging.INFO)
        self._exit_stack.callback(fleetlm_logger.removeHandler, handler)
        if serve_steps:
            threading.Thread(target=self._serve_steps, daemon=True,
                             name=f"fleetlm-steps-{self.rank}").start()

    def free_port(self) -> int:
        """A free TCP port on this node (rank 0 hosts the rendezvous)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def init_distributed(self, init_method: str, node_ip: str | None = None) -> None:
        backend = choose_backend(self.config.parallel.backend, self.device)
        if node_ip is not None:
            _use_interface_of(node_ip, backend)
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray gives each worker its own CUDA_VISIBLE_DEVICES
        self.groups = self._exit_stack.enter_context(distributed_environment(
            self.layout, self.rank, init_method, backend))
        logger.info("rank %d: tp %d/%d, pp %d/%d, %s on %s", self.rank, self.groups.tp.rank,
                    self.groups.tp.world_size, self.groups.pp.rank, self.groups.pp.world_size,
                    backend, self.device)

    def load_model(self) -> int:
        """Load this rank's share of the model; the KV blocks this rank could hold. Set-up
        runs in passing threads, leaving the stepping thread the only OpenMP team."""
        self.runner = in_passing_thread(ModelRunner, self.config.model, self.config.cache,
                                        self.groups, self.config.parallel,
                                        self.config.speculative)
        return in_passing_thread(self.runner.num_available_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        in_passing_thread(self.runner.allocate_kv_cache, num_blocks)

    def start_kv_connector(self):
        """This rank's leases, KV server and loader; (its shard with the server's address,
        its cache's layout). Its transfer news wakes the engine over the link."""
        from fleetlm.kvtransfer.pd_connector import PDConnectorWorker

        self.kv_connector = PDConnectorWorker(self.config.kv_transfer, self.runner.kv_caches,
                                              self.runner.kv_shard, self.rank, self._send_news)
        self._exit_stack.callback(self.kv_connector.close)
        self.runner.kv_connector = self.kv_connector
        return self.kv_connector.shard, self.kv_connector.local_layout

    def _send_news(self) -> None:
        with contextlib.suppress(OSError):  # a closed link is the group's failure already
            self.endpoint.send(NEWS, b"")

    # ---- steps ---------------------------------------------------------------------------
    def execute_step(self, message: bytes) -> bytes | None:
        """Run one encoded `SchedulerOutput`; the encoded result on a reply rank, else None."""
        started = time.perf_counter()
        output = self.runner.execute_model(wire.decode(message))
        self.step_s += time.perf_counter() - started
        if not self.is_reply_rank:
            return None
        if output is None:  # an earlier pipeline stage: nothing sampled, only its reports
            output = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        return wire.encode(output)

    def _serve_steps(self) -> None:
        try:
            while (message := self.endpoint.recv_step()) is not None:
                reply = self.execute_step(message)
                if reply is not None:
                    self.endpoint.send(OUTPUT, reply)
        except BaseException:  # noqa: BLE001 - the driver must hear of it
            logger.exception("rank %d: step failed", self.rank)
            with contextlib.suppress(OSError):
                self.endpoint.send(ERROR, msgpack.packb([traceback.format_exc()]))

    # ---- the rest ------------------------------------------------------------------------
    def run(self, fn: Callable[[Worker], T]) -> T:
        """`collective_rpc`: run a set-up or inspection function on this worker."""
        return fn(self)

    def shutdown(self) -> None:
        self._exit_stack.close()
        if self.endpoint is not None:
            self.endpoint.close()


class _LinkLogHandler(logging.Handler):
    """Sends this worker's log records to the driver, which logs them with the rank."""

    def __init__(self, endpoint: WorkerEndpoint) -> None:
        super().__init__(logging.INFO)
        self.endpoint = endpoint

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.endpoint.send(LOG, msgpack.packb([record.levelno, record.name, message]))
        except Exception:  # noqa: BLE001 - logging must never break a step
            self.handleError(record)


def _use_interface_of(node_ip: str, backend: str) -> None:
    """gloo and NCCL find their address from the host name, which on a multi-homed host (or
    in a network namespace) may not be the address other nodes reach: name the interface."""
    name = _interface_of(node_ip)
    if name is not None:
        variable = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
        os.environ.setdefault(variable, name)


def _interface_of(ip: str) -> str | None:
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR,
                                     struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == ip:
            return name
    return None


def worker_info() -> dict[str, Any]:
    """Where this process runs (for placement checks and the ring: same node or not)."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}
