"""fleetlm's log records in Ray Serve's per-replica log files.

Serve configures only its own logger ("ray.serve"): records of other loggers reach at most
the Ray worker's stderr, and only from WARNING up. A replica that calls
`send_fleetlm_logs_to_serve` writes fleetlm's records (INFO and up, and the workers' "[rank N]"
lines its executor re-logs under "fleetlm.worker") to its own Serve log file instead.
"""

from __future__ import annotations

import logging

FLEETLM_LOGGER = "fleetlm"
SERVE_LOGGER = "ray.serve"


def send_fleetlm_logs_to_serve() -> None:
    """Give fleetlm's logger Serve's handlers; a no-op outside a Serve replica."""
    handlers = logging.getLogger(SERVE_LOGGER).handlers
    if not handlers:
        return
    fleetlm_logger = logging.getLogger(FLEETLM_LOGGER)
    for handler in handlers:
        if handler not in fleetlm_logger.handlers:
            fleetlm_logger.addHandler(handler)
    fleetlm_logger.setLevel(logging.INFO)
    fleetlm_logger.propagate = False  # written once, by Serve's handlers
