"""The engine side of `AsyncEngine`: a loop that takes commands from a pipe, steps the engine
and sends the outputs back. It runs in its own process (the default: the engine then owns a
GIL of its own, so serving threads never stall a step) or in a thread (tests that share an
engine). Both ends speak the same messages:

    to the engine:   ("add", request_id, prompt, requests) | ("abort", request_id) | ("shutdown",)
    from the engine: ("ready", EngineInfo) | ("outputs", [RequestOutput], EngineStats)
                     | ("stats", EngineStats) | ("request_error", request_id, error)
                     | ("dead", error)

The channel is a `multiprocessing` connection between our own processes on this machine (a
pipe, or a Unix socket with a random key), never a network socket.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from pathlib import Path

from fleetlm.executor.config import EngineConfig
from fleetlm.executor.engine import LLMEngine
from fleetlm.executor.scheduler import SchedulerQueueFullError

logger = logging.getLogger("fleetlm.engine_loop")

# In a thread, the loop gives the GIL up around every torch op and must get it back at once;
# with Python's default 5 ms switch interval busy serving threads stall every step.
_GIL_SWITCH_INTERVAL_S = 0.0002


@dataclass(frozen=True)
class EngineInfo:
    """What the frontend needs to validate and tokenize requests on its own."""

    model_dir: Path
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None


class EngineLoop:
    def __init__(self, engine: LLMEngine, commands: Connection, outputs: Connection) -> None:
        self.engine = engine
        self.commands = commands
        self.outputs = outputs

    def run(self) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        try:
            self.outputs.send(("ready", self._info()))
            while self._handle_commands():
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self.outputs.send(("outputs", outputs, self.engine.stats()))
        except (EOFError, BrokenPipeError):
            return  # the frontend is gone
        except BaseException as exc:  # noqa: BLE001 - every caller must hear of it
            logger.exception("engine loop died")
            self.outputs.send(("dead", RuntimeError(f"{type(exc).__name__}: {exc}")))
        finally:
            self.outputs.close()  # the frontend's reader sees EOF

    def _info(self) -> EngineInfo:
        processor = self.engine.input_processor
        return EngineInfo(Path(self.engine.executor.model_dir), self.engine.max_model_len,
                          processor.vocab_size, processor.eos_token_id)

    def _handle_commands(self) -> bool:
        """Apply every queued command (waiting for one while idle); False on shutdown."""
        timeout = 0 if self.engine.has_unfinished_requests() else None
        handled = False
        while self.commands.poll(timeout):
            command = self.commands.recv()
            timeout, handled = 0, True
            if command[0] == "shutdown":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self.engine.abort_request(command[1])
        if handled and not self.engine.has_unfinished_requests():
            self.outputs.send(("stats", self.engine.stats()))  # e.g. blocks freed by an abort
        return True

    def _add(self, request_id, prompt, requests) -> None:
        try:
            self.engine.add_requests(request_id, prompt, requests)
        except (ValueError, SchedulerQueueFullError) as exc:  # this request's, not the engine's
            self.outputs.send(("request_error", request_id, exc))


def run_engine_process(config: EngineConfig, connection: Connection) -> None:
    """The engine process's work: load the model, then loop until shutdown."""
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - the frontend waits for ready or dead
        connection.send(("dead", RuntimeError(f"engine start failed: {type(exc).__name__}: {exc}")))
        return
    EngineLoop(engine, connection, connection).run()


def main() -> None:
    """`python -m fleetlm.executor.engine_loop ADDRESS`, started by `AsyncEngine`: connect back
    over the Unix socket (key on stdin), receive the config, run. A fresh interpreter rather
    than multiprocessing's spawn, which would re-run the caller's main script."""
    logging.basicConfig(level=logging.INFO)
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    connection = Client(sys.argv[1], family="AF_UNIX", authkey=authkey)
    run_engine_process(connection.recv(), connection)


if __name__ == "__main__":
    # Run the copy imported under its package name, so what it pickles (EngineInfo) names
    # fleetlm.executor.engine_loop rather than __main__.
    from fleetlm.executor import engine_loop

    engine_loop.main()
