"""Disaggregated prefill and decode in the serving layer: the decode replica orchestrates.

    ingress ──> decode replica (LLMServer with a `RemotePrefill`)
                  decide: fewer prompt tokens than `pd.threshold_tokens` missing from the
                          local prefix cache? prefill here, as a colocated replica would
                  else: a prefill replica's `LLMServer.prefill(token ids)` computes the prompt
                        (one token, discarded) and answers the KV's transfer params
                  engine.generate(prompt, kv_transfer_params=...) reads the KV and decodes

The prefill pool is one Serve deployment routed least-loaded by fleetlm's request router
(serve_router.py); a prefill replica that failed gets no prompts for DOWN_FOR_S unless every
one has. The prefill replicas' engines keep each prompt's blocks under a lease until the decode
engine has read them (or the lease ends); the decode engine applies `kv_transfer.
failure_policy` to a load that fails. Here the same policy covers the prefill call itself:
a prefill replica that is dead, errs or takes longer than `pd.prefill_timeout_s` means
`recompute` (the decode replica prefills itself) or `fail` (a 503 in OpenAI's shape).
"""

from __future__ import annotations

import logging
from typing import Any

from fleetlm.cluster.config import PDSection
from fleetlm.cluster.migration import call_replica
from fleetlm.cluster.router import RoutingRequest
from fleetlm.cluster.serve_router import RoutingTable, routing_table

logger = logging.getLogger(__name__)

# A prefill replica that failed gets no prompts for this long (unless every one has failed).
DOWN_FOR_S = 5.0


class PrefillFailed(Exception):
    """No prefill replica computed the prompt; `cause` labels the failure metric."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(f"{cause}: {message}")
        self.cause = cause


class RemotePrefill:
    """A decode replica's view of the prefill pool: which prompts go there, and the calls."""

    def __init__(self, prefill_server: Any, pd: PDSection) -> None:
        """`prefill_server`: a handle to the prefill pool's deployment."""
        self.handle = prefill_server.options(stream=False)
        self.threshold_tokens = pd.threshold_tokens
        self.timeout_s = pd.prefill_timeout_s
        # For the metrics: prompts sent to the prefill pool or kept here, failed calls.
        self.num_remote = 0
        self.num_local = 0
        self.failures_by_cause: dict[str, int] = {}

    def is_worth_it(self, num_prompt_tokens: int, num_cached_tokens: int) -> bool:
        """The decider: does the prompt have enough uncached tokens to send it away?"""
        is_remote = num_prompt_tokens - num_cached_tokens >= max(self.threshold_tokens, 1) \
            and num_prompt_tokens > 1
        if is_remote:
            self.num_remote += 1
        else:
            self.num_local += 1
        return is_remote

    async def prefill(self, token_ids: list[int], request_id: str) -> dict | None:
        """The transfer params of `token_ids` computed by a prefill replica; None if the
        prefill replica refused the prompt as invalid (the decode replica's own engine then
        answers the client's mistake, a 400); `PrefillFailed` if no replica computed it.
        Cancelling this cancels the prefill replica's request."""
        try:
            params = await call_replica(self.handle, "prefill", self.timeout_s, token_ids,
                                        request_id, routing=RoutingRequest(request_id))
        except TimeoutError:
            raise self._failed(request_id, "prefill_timeout",
                               f"did not answer within {self.timeout_s:g} s") from None
        except ValueError:  # an invalid prompt (a Ray task error subclasses the cause's type)
            return None
        except Exception as e:  # noqa: BLE001 - dead, being replaced, or its engine failed
            raise self._failed(request_id, "prefill_failed",
                               f"{type(e).__name__}: {e}") from None
        return params

    @property
    def table(self) -> RoutingTable:
        return routing_table(self.handle.app_name, self.handle.deployment_name)

    def _failed(self, request_id: str, cause: str, message: str) -> PrefillFailed:
        replica = self.table.replica_of(request_id)
        message = f"prefill replica {replica or '(none reached)'} {message}"
        logger.warning("prefill failed (%s)", message)
        if replica is not None:
            self.table.set_health(replica, False, for_s=DOWN_FOR_S)
        self.failures_by_cause[cause] = self.failures_by_cause.get(cause, 0) + 1
        return PrefillFailed(cause, message)

    def snapshot(self) -> dict[str, Any]:
        return {"num_remote": self.num_remote, "num_local": self.num_local,
                "failures_by_cause": dict(self.failures_by_cause)}
