"""`FleetlmRequestRouter`: Ray Serve's request router for fleetlm's engine pools.

Ray Serve pickles this module by value into every process that holds a handle, so it holds
the class alone; the class imports `fleetlm.cluster.serve_router` (by reference) in each
call, where the process's routing tables and fleetlm's policy live.
"""

from __future__ import annotations

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)


class FleetlmRequestRouter(RequestRouter):
    """Serve's request router for fleetlm's engine pools (`request_router_kwargs`:
    `router`, the deployment's `RouterSection` as a dict)."""

    def initialize_state(self, router: dict | None = None, **kwargs) -> None:
        from fleetlm.cluster.config import RouterSection
        from fleetlm.cluster.serve_router import routing_table

        section = RouterSection(**(router or {}))
        self.table = routing_table(self.app_name, self._deployment_id.name, section)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.table.set_replicas([r.replica_id.unique_id for r in replicas])

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.set_replicas([n for n in self.table.replica_names()
                                 if n != replica_id.unique_id])

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        from fleetlm.cluster.serve_router import routing_of

        if pending_request is not None:  # the ranks hold every replica it may go to: when
            # none has room, Serve must wait before asking again, not spin
            pending_request.routing_context.should_backoff = True
        return self.table.rank(candidate_replicas, routing_of(pending_request))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        from fleetlm.cluster.serve_router import routing_of

        self.table.on_routed(pending_request.metadata.internal_request_id,
                             replica_id.unique_id, routing_of(pending_request))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.table.on_completed(internal_request_id)
