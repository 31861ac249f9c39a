"""The clh-writerd benchmark harness: ``python -m benchmarks`` (``make bench``).

A scenario is a function registered with :func:`benchmarks.harness.scenario`
that runs once and returns rows (name, records, seconds, and for measurement
scenarios such as latency percentiles, named metrics). The harness repeats
it ``--runs`` times, reports the median of each row, its rate (or each
metric) and its ratio to the row it is compared with, checks the scenario's
goals, and writes the whole run as JSON to ``benchmarks/results/``. Goals are ratios and rates measured in
one run on one machine; no test ever asserts a speed.

To add a scenario: write a module with a ``@scenario(...)`` function and add
it to ``SCENARIO_MODULES`` in ``benchmarks/__main__.py``.
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the checkout
RESULTS_DIR = os.path.join(HERE, "results")
