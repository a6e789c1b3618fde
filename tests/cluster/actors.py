"""Find and kill the processes of a deployed app: an engine replica and its worker actors.

Ray's state API needs the dashboard, which the test cluster runs without; the GCS's own
actor table (`ray._private.state.actors`) has what is needed: class, state, pid, and who owns
each actor (a replica owns its workers). Killing is SIGKILL of the actor's process, as the
kernel's OOM killer would do it.
"""

from __future__ import annotations

import os
import signal

ALIVE = "ALIVE"
WORKER_CLASS = "RayWorker"


def _live(class_name: str) -> list[dict]:
    from ray._private.state import actors

    return [a for a in actors().values()
            if a["ActorClassName"] == class_name and a["State"] == ALIVE]  # fmt: skip


def replica_actor(app: str, deployment: str = "LLMServer", replica: str | None = None) -> dict:
    """The newest live Serve replica actor of a deployment (a replaced one may still be
    shutting down), or the one whose replica id is `replica`."""
    live = _live(f"ServeReplica:{app}:{deployment}")
    if replica is not None:
        [actor] = [a for a in live if a["Name"].endswith(f"#{replica}")]
        return actor
    return max(live, key=lambda a: a["StartTime"])


def worker_actors(replica: dict) -> list[dict]:
    """The live worker actors a replica's engine started (the replica owns them)."""
    owner = _where(replica["Address"])
    return [a for a in _live(WORKER_CLASS) if _where(a["OwnerAddress"]) == owner]


def _where(address: dict) -> tuple[str, int]:
    return address["IPAddress"], address["Port"]


def kill(actor: dict) -> None:
    os.kill(actor["Pid"], signal.SIGKILL)
