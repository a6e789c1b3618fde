"""`python -m fleetlm.bench serve ...`: the same as `fleetlm bench serve ...`."""

import sys

from fleetlm.bench.cli import main

sys.exit(main())
