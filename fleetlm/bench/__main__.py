"""`python -m fleetlm.bench serve ...`: the same as `fleetlm bench serve ...`."""

import sys

from fleetlm.bench import run

sys.exit(run())
