"""``python -m benchmarks``: run the registered scenarios (see harness.py)."""

import importlib
import sys

from .harness import main

# Each module registers its scenarios on import; add new ones here.
SCENARIO_MODULES = ("benchmarks.ingest", "benchmarks.latency", "benchmarks.e2e", "benchmarks.aioloop",
                    "benchmarks.appcost")

for _module in SCENARIO_MODULES:
    importlib.import_module(_module)

if __name__ == "__main__":
    sys.exit(main())
