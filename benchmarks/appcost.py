"""``cpu`` and ``sync``: what the app process pays (issue 16).

- ``cpu``: the app CPU per record. Each handler of the ``latency`` table in a
  fresh process (``benchmarks/caller.py``, mode ``cpu``): ``calls`` untimed
  ``logger.info`` calls after a warm-up, and the process's CPU time over all
  its threads (``getrusage(RUSAGE_SELF)``: sender thread and libzmq's I/O
  threads included) from the first call until the handler is closed (every
  record written or acknowledged), divided by the calls. The daemon's CPU is
  not the app's: that is the point of a sidecar.
- ``burst``: an asyncio app logging ``BURST`` records from a coroutine that
  yields to the loop every 200 records, daemon up, default settings: how
  many the handler drops (goal: none), and the per-call latency.
- ``sync``: the synchronous path. ``logger.error`` (at the default
  ``sync_level``: confirmed before the call returns) timed per call, with a
  1 ms pause every 10 calls, through the daemon, against CLH direct's
  ``logger.error`` in the same run, and beside them the same calls whose
  handler only does a bare ping round trip to the daemon (the floor).
"""

import os
import shutil
import tempfile
from typing import List

from .daemon import running_daemon
from .harness import Goal, Params, Row, scenario
from .latency import FLOOR, NB_DAEMON, ROWS, _row_dir, handler_rows, latency_row, run_caller

CLH_ERROR = "CLH direct, logger.error"
NB_SYNC = "NonBlocking sync, daemon"
PING = "ping round trip, daemon (floor)"
SYNC_ROWS = ((CLH_ERROR, "clh"), (PING, "ping"), (NB_SYNC, "nb-daemon"))
SYNC_CALLS = 3_000
SYNC_WARMUP = 300
BURST = 20_000
BURST_YIELD_EVERY = 200
ASYNC_BURST = "Async, daemon, yield every 200"


@scenario("cpu", baseline=FLOOR, metrics=("cpu",), ratio_metrics=("cpu",),
          goals=[Goal(NB_DAEMON, metric="cpu", max_ratio=1.0, against="FileHandler"),
                 Goal(NB_DAEMON, metric="cpu", max_ratio=0.3, against="CLH direct")])
def app_cpu(params: Params) -> List[Row]:
    """App CPU per record (µs, all threads, until written) for every latency-table handler."""
    return handler_rows(params, "cpu", ROWS, params.calls, params.warmup)


@scenario("sync", baseline=CLH_ERROR, metrics=("p50", "p99", "p99.9", "max"), ratio_metrics=("p50", "p99"),
          goals=[Goal(NB_SYNC, metric="p50", max_ratio=4.0), Goal(NB_SYNC, metric="p99", max_ratio=4.0)])
def sync_path(params: Params) -> List[Row]:
    """logger.error confirmed through the daemon vs CLH direct's, beside the bare ping round trip (its floor).

    The ping row: the record formatted, then one REQ/REP ping to the daemon,
    nothing written: what any sync record costs at least in this design."""
    return handler_rows(params, "error", SYNC_ROWS, min(SYNC_CALLS, params.calls), SYNC_WARMUP)


@scenario("burst", metrics=("p50", "p99", "max", "dropped"),
          goals=[Goal(ASYNC_BURST, metric="dropped", max_value=0)])
def asyncio_burst(params: Params) -> List[Row]:
    """asyncio burst: 20,000 records, a yield every 200, daemon up, default settings: records dropped."""
    workdir = tempfile.mkdtemp(prefix="clh-bench-", dir=params.workdir)
    log_dir = os.path.join(workdir, "logs")
    try:
        with running_daemon(workdir, [log_dir]) as endpoint:
            spec = {"mode": "coroutine", "handler": "async-daemon", "calls": BURST, "warmup": 0,
                    "yield_every": BURST_YIELD_EVERY, "endpoint": endpoint, "dir": _row_dir(log_dir, "burst")}
            return [latency_row(ASYNC_BURST, run_caller(spec))]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
