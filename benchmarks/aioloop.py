"""``asyncio``: what logging costs an event loop (issue 4).

Two kinds of rows, each in a fresh process (``benchmarks/caller.py``), same
formatter and message everywhere:

- per call: ``logger.info`` from a coroutine (yielding to the loop every 100
  calls), p50/p99/p99.9 in µs, compared with the no-op floor;
- loop lag: how late a ticker's ``asyncio.sleep(0.001)`` wakes (p50/p99/max
  in µs) while another coroutine logs ``lag_rate`` records/s for
  ``lag_seconds``, compared with the same load on a no-op handler. The
  ``slow disk, no daemon`` row wraps a CLH whose ``do_write`` sleeps 50 ms and
  points at an endpoint nobody serves, so everything goes through the
  fallback in the executor.

Every handler is closed at the end and its files must hold every record it
did not report as dropped. Drops (the default ``'drop'`` policy) are in the
note and a metric; the per-call goals also require none.
"""

import os
import shutil
import tempfile
from typing import Any, Dict, List

from .daemon import running_daemon, short_socket_dir
from .harness import Goal, Params, Row, rotated, scenario
from .latency import latency_row, run_caller

FLOOR = "no-op handler (floor)"
ASYNC_DAEMON = "AsyncConcurrentHandler, daemon"
ASYNC_EMBEDDED = "AsyncConcurrentHandler, endpoint=None"
CALL_ROWS = (
    (FLOOR, "noop"),
    ("FileHandler", "file"),
    ("QueueHandler on the loop", "queue"),
    (ASYNC_DAEMON, "async-daemon"),
    (ASYNC_EMBEDDED, "async-embedded"),
)
LAG_FLOOR = "lag: no-op handler"
LAG_SLOW = "lag: Async, slow disk, no daemon"
LAG_DAEMON = "lag: Async, daemon"
LAG_ROWS = (
    ("lag: idle loop (no logging)", "noop"),
    (LAG_FLOOR, "noop"),
    ("lag: QueueHandler on the loop", "queue"),
    (LAG_DAEMON, "async-daemon"),
    (LAG_SLOW, "async-slow-nodaemon"),
)
YIELD_EVERY = 100
LAG_WARMUP = 2_000


@scenario("asyncio", baseline=FLOOR, metrics=("p50", "p99", "p99.9", "max"), ratio_metrics=("p50", "p99"),
          goals=[Goal(ASYNC_DAEMON, metric="p50", max_ratio=1.2), Goal(ASYNC_EMBEDDED, metric="p50", max_ratio=1.2),
                 Goal(ASYNC_DAEMON, metric="dropped", max_value=0),
                 Goal(ASYNC_EMBEDDED, metric="dropped", max_value=0),
                 Goal(LAG_DAEMON, metric="p99", max_ratio=1.5, against=LAG_FLOOR),
                 Goal(LAG_SLOW, metric="p99", max_value=1000.0)])
def asyncio_cost(params: Params) -> List[Row]:
    """Per-call latency from a coroutine, and event-loop lag at 20k records/s (slow disk too)."""
    workdir = tempfile.mkdtemp(prefix="clh-bench-", dir=params.workdir)
    log_dir = os.path.join(workdir, "logs")
    nobody = short_socket_dir()
    rows: List[Row] = []
    try:
        with running_daemon(workdir, [log_dir]) as endpoint:
            for name, kind in rotated(CALL_ROWS, params.run):
                spec = _spec(kind, log_dir, endpoint, mode="coroutine", calls=params.calls, warmup=params.warmup)
                rows.append(latency_row(name, run_caller(spec)))
            for name, kind in rotated(LAG_ROWS, params.run):
                idle = "idle" in name
                target = f"ipc://{nobody}/nobody.sock" if kind == "async-slow-nodaemon" else endpoint
                spec = _spec(kind, log_dir, target, mode="lag", idle=idle, rate=params.lag_rate,
                             seconds=params.lag_seconds, warmup=LAG_WARMUP)
                baseline = "" if idle or name == LAG_FLOOR else LAG_FLOOR
                row = latency_row(name, run_caller(spec), baseline)
                if not idle:
                    row.note = f"{params.lag_rate:,}/s for {params.lag_seconds:g}s; " + row.note
                rows.append(row)
        return rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(nobody, ignore_errors=True)


def _spec(kind: str, log_dir: str, endpoint: Any, **extra: Any) -> Dict[str, Any]:
    directory = tempfile.mkdtemp(prefix=f"{kind}-", dir=_ensure(log_dir))
    return {"handler": kind, "dir": directory, "endpoint": endpoint, "yield_every": YIELD_EVERY, **extra}


def _ensure(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
