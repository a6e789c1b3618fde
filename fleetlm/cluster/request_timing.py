"""Feed a replica's `MetricsRecorder` from the outputs of one HTTP request, as the server sees them.

Times are taken on the server's clock when outputs reach it, so they include queueing in the
replica but not the network; with coalesced outputs, the gap since the previous output is
shared evenly by the tokens that arrived together.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fleetlm.cluster.metrics import MetricsRecorder
from fleetlm.executor.outputs import RequestOutput

ABORT_REASON = "abort"


class RequestTimer:
    """Times the choices one replica runs of one request: `num_resumed` maps each to the
    tokens another replica already generated (0 for a new choice), which count neither as
    this replica's first token nor as its output."""

    def __init__(
        self,
        recorder: MetricsRecorder,
        num_resumed: dict[int, int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recorder = recorder
        self.clock = clock
        self.start = clock()
        self._num_resumed = dict(num_resumed)
        self._num_tokens = dict(num_resumed)
        self._last_time = {index: self.start for index in num_resumed}

    def on_snapshot(self, snapshot: dict[int, RequestOutput]) -> None:
        now = self.clock()
        for index, output in snapshot.items():
            num_tokens = len(output.outputs[0].token_ids)
            num_new = num_tokens - self._num_tokens[index]
            if num_new <= 0:
                continue
            if self._num_tokens[index] == 0:
                self.recorder.on_first_token(now - self.start)
            else:
                gap = (now - self._last_time[index]) / num_new
                for _ in range(num_new):
                    self.recorder.on_token(gap)
            self._num_tokens[index] = num_tokens
            self._last_time[index] = now

    def on_end(self, outputs: dict[int, RequestOutput]) -> None:
        """Every choice ends here, finished or not (a choice cut short counts as aborted)."""
        e2e = self.clock() - self.start
        for index, num_resumed in self._num_resumed.items():
            output = outputs.get(index)
            if output is None:
                self.recorder.on_finish(e2e, 0, 0, ABORT_REASON)
                continue
            completion = output.outputs[0]
            self.recorder.on_finish(
                e2e,
                len(output.prompt_token_ids),
                len(completion.token_ids) - num_resumed,
                completion.finish_reason or ABORT_REASON,
            )
