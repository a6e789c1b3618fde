"""Ray Serve's autoscaler driven by what the engine replicas report.

Each replica reports to Serve (`LLMServer.record_autoscaling_stats`, every
`replicas.autoscaling.metrics_interval_s`): requests running and waiting in its engine, and
its KV-cache usage. Serve calls this policy in its controller loop with those reports
averaged over `look_back_period_s`; it answers the replicas wanted:

    by requests  = requests in flight at the handles / target_ongoing_requests
    by KV cache  = replicas * mean KV usage / target_kv_usage
    wanted       = the larger of the two

Serve then applies min/max_replicas and the up/downscale delays (a wish must last that long),
and drains a replica before removing it.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext, AutoscalingPolicy

from fleetlm.cluster.config import AutoscalingSection

KV_USAGE = "kv_cache_usage"


class QueueAndKVPolicy:
    def __init__(self, target_kv_usage: float = 0.8) -> None:
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        num_replicas = ctx.current_num_replicas
        if num_replicas == 0:
            return ctx.target_num_replicas, {}
        by_requests = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        usage = (ctx.aggregated_metrics or {}).get(KV_USAGE) or {}
        mean_usage = sum(usage.values()) / len(usage) if usage else 0.0
        by_kv = num_replicas * mean_usage / self.target_kv_usage
        return max(by_requests, by_kv), {}


def serve_autoscaling_config(section: AutoscalingSection) -> dict[str, Any]:
    """The deployment's `autoscaling_config` for Ray Serve."""
    policy = AutoscalingPolicy(
        policy_function=f"{__name__}:{QueueAndKVPolicy.__name__}",
        policy_kwargs={"target_kv_usage": section.target_kv_usage})
    return {
        "min_replicas": section.min_replicas,
        "initial_replicas": section.min_replicas,
        "max_replicas": section.max_replicas,
        "target_ongoing_requests": section.target_ongoing_requests,
        "upscale_delay_s": section.upscale_delay_s,
        "downscale_delay_s": section.downscale_delay_s,
        "metrics_interval_s": section.metrics_interval_s,
        "look_back_period_s": section.look_back_period_s,
        "policy": policy,
    }
