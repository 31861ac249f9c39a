"""``latency``: what one ``logger.info("user %s did %d things", name, n)``
costs the caller, per handler (issue 3).

Each row runs in a fresh process (``benchmarks/caller.py``) so garbage and
warm caches do not leak from one row into the next: same formatter, same
calls, a warm-up first, then ``calls`` calls each timed with
``perf_counter_ns``. The real daemon runs during the whole scenario (started
once per run, on a short ipc path); only the ``NonBlocking, daemon`` row
talks to it. After the calls every handler is closed (which drains it) and
its file must hold every line it did not count as dropped; drops are a
metric, and a goal (``dropped <= 0``) says a handler that drops cannot
count as fast.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .daemon import bench_env, running_daemon
from .harness import ROOT, Goal, Params, Row, rotated, scenario

FLOOR = "no-op handler (floor)"
NB_DAEMON = "NonBlocking, daemon"
NB_EMBEDDED = "NonBlocking, endpoint=None"
ROWS = (
    (FLOOR, "noop"),
    ("FileHandler", "file"),
    ("CLH direct", "clh"),
    ("QueueHandler+QueueListener", "queue"),
    (NB_DAEMON, "nb-daemon"),
    (NB_EMBEDDED, "nb-embedded"),
)
CALLER_TIMEOUT = 600.0


@scenario("latency", baseline=FLOOR, metrics=("p50", "p99", "p99.9", "max"), ratio_metrics=("p50", "p99"),
          goals=[Goal(row, metric=m, max_ratio=r) for row in (NB_DAEMON, NB_EMBEDDED)
                 for m, r in (("p50", 1.5), ("p99", 2.5))]
          + [Goal(row, metric="max", max_value=2000.0) for row in (NB_DAEMON, NB_EMBEDDED)]
          + [Goal(row, metric="dropped", max_value=0) for row in (NB_DAEMON, NB_EMBEDDED)])
def latency(params: Params) -> List[Row]:
    """Per-call logger.info latency flat out (p50/p99/p99.9 µs): no-op floor, stdlib, CLH, NonBlocking.

    Flat out, p99.9 is a known limit, not a goal: the sender thread takes the
    GIL from the caller for a batch now and then (one interpreter, one GIL);
    at a service's pace (``pace``) it has the pauses to do that in."""
    return handler_rows(params, "sync", ROWS, params.calls, params.warmup)


PACE_ROWS = ((FLOOR, "noop"), ("FileHandler", "file"), (NB_DAEMON, "nb-daemon"))


@scenario("pace", baseline=FLOOR, metrics=("p50", "p99", "p99.9", "max"), ratio_metrics=("p50", "p99"),
          goals=[Goal(NB_DAEMON, metric="p99.9", max_ratio=1.5, against="FileHandler"),
                 Goal(NB_DAEMON, metric="dropped", max_value=0)])
def pace(params: Params) -> List[Row]:
    """Per-call logger.info latency at a service's pace (a 0.2 ms pause every 50 calls): p99.9 vs FileHandler."""
    return handler_rows(params, "pace", PACE_ROWS, params.calls, params.warmup)


def handler_rows(params: Params, mode: str, rows: Sequence[Tuple[str, str]], calls: int, warmup: int) -> List[Row]:
    """One caller run in ``mode`` per (row name, handler kind), in this run's
    rotated order, each in its own log directory, against one daemon."""
    workdir = tempfile.mkdtemp(prefix="clh-bench-", dir=params.workdir)
    log_dir = os.path.join(workdir, "logs")
    try:
        with running_daemon(workdir, [log_dir]) as endpoint:
            return [latency_row(name, run_caller({"mode": mode, "handler": kind, "calls": calls, "warmup": warmup,
                                                  "endpoint": endpoint, "dir": _row_dir(log_dir, kind)}))
                    for name, kind in rotated(rows, params.run)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _row_dir(log_dir: str, kind: str) -> str:
    path = os.path.join(log_dir, kind)
    os.makedirs(path)
    return path


def run_caller(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one row's caller process; its JSON result, or an error with its stderr."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.caller", json.dumps(spec)], cwd=ROOT,
                          env=bench_env(), capture_output=True, text=True, timeout=CALLER_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"caller {spec['handler']} ({spec['mode']}) exited with {proc.returncode}:\n"
                           f"{proc.stdout}{proc.stderr}")
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def latency_row(name: str, result: Dict[str, Any], baseline: Optional[str] = None) -> Row:
    pct = dict(result["percentiles"], dropped=float(result["dropped"]))
    # seconds: the sum of the timed intervals (not shown for metrics scenarios)
    return Row(name, result["samples"], result["seconds"], describe(result), pct, baseline)


def describe(result: Dict[str, Any]) -> str:
    """The row's note: what reached the files, and how (handler stats)."""
    parts = []
    if result["lines"] is not None:
        parts.append(f"{result['lines']:,} lines" + (f" in {result['files']} files" if result["files"] > 1 else ""))
    stats = result["stats"]
    if "state" in stats:
        parts.append(f"acked {stats['acked']:,}" if stats.get("acked") else "no daemon acks")
        for key, label in (("fallback_written", "written directly"), ("fallback_count", "queue full->sync"),
                           ("dropped_count", "dropped"), ("resent", "resent")):
            if stats.get(key):
                parts.append(f"{label} {stats[key]:,}")
    return "; ".join(parts)
