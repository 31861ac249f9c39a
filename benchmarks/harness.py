"""Scenario registry, repetition with medians, the table and the JSON record.

Two kinds of rows: throughput rows (records, seconds: a rate, higher is
better) and measurement rows carrying named metrics such as latency
percentiles in µs (lower is better). A scenario that declares ``metrics``
gets one column per metric and one ratio column per ``ratio_metrics`` entry
(row / the row it is compared with), instead of the records/s columns.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import RESULTS_DIR, ROOT  # noqa: F401 (ROOT: the scenarios' modules take it from here)


@dataclass
class Params:
    """Workload knobs shared by all scenarios (each uses what applies to it)."""

    records: int = 1_000_000
    # CLH per record is ~25x slower and its rate does not depend on the count:
    # it writes the first baseline_records records only, to keep runs short.
    baseline_records: int = 100_000
    batch: int = 500  # records per batch (one DEALER message, one ack)
    record_bytes: int = 100  # length of one rendered line, terminator excluded
    window: int = 16  # unacknowledged batches in flight
    max_bytes: int = 16 * 1024 * 1024  # CLH maxBytes of every file written
    workdir: Optional[str] = None  # parent of each run's scratch directory
    # Caller-side scenarios (latency, asyncio, e2e):
    calls: int = 200_000  # timed logger.info calls per latency row
    warmup: int = 20_000  # untimed calls before them
    processes: int = 4  # e2e: processes writing one file
    per_process: int = 100_000  # e2e: records each
    lag_seconds: float = 3.0  # asyncio: how long the loop lag is measured
    lag_rate: int = 20_000  # asyncio: records/s logged meanwhile
    quick: bool = False
    run: int = 0  # which repetition this is (set by the harness)

    @classmethod
    def quick_size(cls) -> "Params":
        return cls(records=10_000, baseline_records=5_000, calls=5_000, warmup=1_000, per_process=2_000,
                   lag_seconds=1.0, quick=True)


@dataclass
class Row:
    """One measured thing in one run of a scenario.

    ``metrics`` holds the measured values of a metrics scenario (for example
    ``{"p50": 4.6, "p99": 8.1}`` in µs). ``baseline`` names the row this one
    is compared with when it is not the scenario's baseline ("" for none).
    """

    name: str
    records: int
    seconds: float
    note: str = ""
    metrics: Dict[str, float] = field(default_factory=dict)
    baseline: Optional[str] = None

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Goal:
    """What a row must reach.

    Throughput: a rate, and/or a multiple of the baseline's rate. With
    ``metric``: that metric at most ``max_value`` and/or at most
    ``max_ratio`` times the same metric of the row it is compared with.
    """

    row: str
    min_rate: Optional[float] = None
    min_ratio: Optional[float] = None
    metric: Optional[str] = None
    max_value: Optional[float] = None
    max_ratio: Optional[float] = None
    # With ``metric`` and ``max_ratio``: compare with this row instead of
    # the row's own baseline (e.g. "<= half of FileHandler's CPU").
    against: Optional[str] = None

    def describe(self) -> str:
        parts = []
        if self.min_rate is not None:
            parts.append(f">= {self.min_rate:,.0f} records/s")
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:g}x baseline")
        if self.max_value is not None:
            parts.append(f"{self.metric} <= {self.max_value:g}")
        if self.max_ratio is not None:
            parts.append(f"{self.metric} <= {self.max_ratio:g}x " + (self.against or "its baseline"))
        return f"{self.row}: " + " and ".join(parts)


ScenarioFn = Callable[[Params], List[Row]]


@dataclass
class Scenario:
    name: str
    fn: ScenarioFn
    baseline: Optional[str] = None  # the row every ratio is taken against
    goals: List[Goal] = field(default_factory=list)
    doc: str = ""
    metrics: Tuple[str, ...] = ()  # metric columns, in order (empty: a throughput scenario)
    ratio_metrics: Tuple[str, ...] = ()  # metrics also shown as a ratio to the row's baseline
    unit: str = "µs"


SCENARIOS: Dict[str, Scenario] = {}


def rotated(rows: Sequence[Any], run: int) -> List[Any]:
    """``rows`` starting at a different one each run.

    The shared machine's speed drifts over seconds; rows measured one after
    the other in a fixed order would carry that drift into their ratios.
    Rotating the order spreads it over the rows, and the median absorbs it.
    """
    k = run % len(rows) if rows else 0
    return list(rows[k:]) + list(rows[:k])


def scenario(name: str, baseline: Optional[str] = None, goals: Sequence[Goal] = (),
             metrics: Sequence[str] = (), ratio_metrics: Sequence[str] = (),
             unit: str = "µs") -> Callable[[ScenarioFn], ScenarioFn]:
    """Register ``fn(params) -> rows`` under ``name``."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        SCENARIOS[name] = Scenario(name, fn, baseline, list(goals), doc[0] if doc else "",
                                   tuple(metrics), tuple(ratio_metrics), unit)
        return fn

    return register


# -- running ------------------------------------------------------------------
@dataclass
class Summary:
    """The median of each row over the runs, with rate and ratio to the baseline."""

    name: str
    records: int
    seconds: float
    rate: float
    ratio: Optional[float]
    note: str
    runs: List[float]  # seconds of each run
    metrics: Dict[str, float] = field(default_factory=dict)  # median of each metric
    ratios: Dict[str, float] = field(default_factory=dict)  # metric / the compared row's
    compared_with: Optional[str] = None
    metric_runs: Dict[str, List[float]] = field(default_factory=dict)


def summarize(spec: Scenario, runs: List[List[Row]]) -> List[Summary]:
    order: List[str] = []
    by_name: Dict[str, List[Row]] = {}
    for rows in runs:
        for row in rows:
            if row.name not in by_name:
                order.append(row.name)
                by_name[row.name] = []
            by_name[row.name].append(row)
    medians: Dict[str, Summary] = {}
    for name in order:
        rows = by_name[name]
        rate = statistics.median(r.rate for r in rows)
        records = rows[0].records
        metric_runs = {m: [r.metrics[m] for r in rows if m in r.metrics]
                       for m in dict.fromkeys(k for r in rows for k in r.metrics)}
        compared = rows[0].baseline if rows[0].baseline is not None else spec.baseline
        medians[name] = Summary(name, records, records / rate if rate else 0.0, rate, None,
                                rows[0].note, [r.seconds for r in rows],
                                {m: statistics.median(v) for m, v in metric_runs.items()}, {},
                                compared or None, metric_runs)
    base = medians.get(spec.baseline or "")
    for summary in medians.values():
        if base is not None and base.rate > 0:
            summary.ratio = summary.rate / base.rate
        other = medians.get(summary.compared_with or "")
        if other is not None:
            for m in spec.ratio_metrics:
                if m in summary.metrics and other.metrics.get(m):
                    summary.ratios[m] = summary.metrics[m] / other.metrics[m]
    return [medians[name] for name in order]


def check_goals(spec: Scenario, summaries: List[Summary]) -> List[Dict[str, Any]]:
    by_name = {s.name: s for s in summaries}
    out = []
    for goal in spec.goals:
        s = by_name.get(goal.row)
        met = s is not None
        if s is not None and goal.min_rate is not None:
            met = met and s.rate >= goal.min_rate
        if s is not None and goal.min_ratio is not None:
            met = met and s.ratio is not None and s.ratio >= goal.min_ratio
        value = s.metrics.get(goal.metric) if s is not None and goal.metric else None
        metric_ratio = s.ratios.get(goal.metric) if s is not None and goal.metric else None
        if goal.against is not None and s is not None and goal.metric:
            other = by_name.get(goal.against)
            ref = other.metrics.get(goal.metric) if other is not None else None
            metric_ratio = value / ref if value is not None and ref else None
        if goal.max_value is not None:
            met = met and value is not None and value <= goal.max_value
        if goal.max_ratio is not None:
            met = met and metric_ratio is not None and metric_ratio <= goal.max_ratio
        entry: Dict[str, Any] = {"goal": goal.describe(), "met": bool(met),
                                 "rate": s.rate if s else None, "ratio": s.ratio if s else None}
        if goal.metric:
            entry.update(metric=goal.metric, value=value, metric_ratio=metric_ratio)
        out.append(entry)
    return out


def _measured(goal: Dict[str, Any]) -> str:
    """What a goal's row measured, for the goal line under the table."""
    if goal.get("metric"):
        parts = []
        if goal.get("value") is not None:
            parts.append(f"{goal['metric']} {goal['value']:,.1f}")
        if goal.get("metric_ratio") is not None:
            parts.append(f"{goal['metric_ratio']:.2f}x")
        return ", ".join(parts)
    if goal.get("ratio") is not None:
        return f"{goal['rate']:,.0f}/s, {goal['ratio']:.2f}x"
    return f"{goal['rate']:,.0f}/s" if goal.get("rate") is not None else ""


def render_table(spec: Scenario, summaries: List[Summary], runs: int) -> str:
    if spec.metrics:
        header: Tuple[str, ...] = ("scenario", "records", *(f"{m} {spec.unit}" for m in spec.metrics),
                                   *(f"{m} vs base" for m in spec.ratio_metrics), "compared with", "note")
        body = []
        for s in summaries:
            values = [f"{s.metrics[m]:,.1f}" if m in s.metrics else "-" for m in spec.metrics]
            ratios = [f"{s.ratios[m]:.2f}x" if m in s.ratios else "-" for m in spec.ratio_metrics]
            compared = s.compared_with if s.compared_with and s.compared_with != s.name else "-"
            body.append((f"{spec.name}: {s.name}", f"{s.records:,}", *values, *ratios, compared, s.note))
        right = set(range(1, 2 + len(spec.metrics) + len(spec.ratio_metrics)))
    else:
        header = ("scenario", "records", "seconds", "records/s", f"vs {spec.baseline or 'baseline'}", "note")
        body = []
        for s in summaries:
            ratio = f"{s.ratio:.2f}x" if s.ratio is not None else "-"
            body.append((f"{spec.name}: {s.name}", f"{s.records:,}", f"{s.seconds:.3f}", f"{s.rate:,.0f}", ratio,
                         s.note))
        right = {1, 2, 3, 4}
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    title = f"{spec.name} (median of {runs} run{'s' if runs != 1 else ''})"
    return "\n".join([title, line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def machine_info() -> Dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "commit": commit,
    }


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def run_scenario(spec: Scenario, params: Params, runs: int) -> Dict[str, Any]:
    raw: List[List[Row]] = []
    for i in range(runs):
        started = time.monotonic()
        rows = spec.fn(replace(params, run=i))
        raw.append(rows)
        rates = ", ".join(f"{r.name} " + (" ".join(f"{m} {v:,.1f}" for m, v in r.metrics.items())
                                            if r.metrics else f"{r.rate:,.0f}/s") for r in rows)
        print(f"  {spec.name} run {i + 1}/{runs} ({time.monotonic() - started:.1f}s): {rates}", file=sys.stderr)
    summaries = summarize(spec, raw)
    return {
        "scenario": spec.name,
        "baseline": spec.baseline,
        "runs": [[asdict(r) for r in rows] for rows in raw],
        "median": [asdict(s) for s in summaries],
        "goals": check_goals(spec, summaries),
        "table": render_table(spec, summaries, runs),
    }


def write_results(results: List[Dict[str, Any]], params: Params, runs: int, out_dir: str,
                  loadavg_before: Optional[List[float]] = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    names = "+".join(r["scenario"] for r in results)
    path = os.path.join(out_dir, f"{stamp}-{names}{'-quick' if params.quick else ''}.json")
    machine = machine_info()
    machine["loadavg_before"] = loadavg_before
    doc = {"started": stamp, "machine": machine, "params": asdict(params), "runs": runs,
           "scenarios": results}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return path


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="scenario to run (repeatable; default: all). --list shows them.")
    p.add_argument("--runs", type=int, default=3, help="repetitions; the median is reported (default 3)")
    p.add_argument("--quick", action="store_true", help="small smoke-test size")
    p.add_argument("--records", type=int, help="records per measured row (default 1,000,000)")
    p.add_argument("--baseline-records", type=int, help="records written by the CLH-per-record row")
    p.add_argument("--batch", type=int, help="records per batch")
    p.add_argument("--record-bytes", type=int, help="bytes per rendered record")
    p.add_argument("--window", type=int, help="unacknowledged batches in flight")
    p.add_argument("--max-bytes", type=int, help="CLH maxBytes of the files written")
    p.add_argument("--calls", type=int, help="timed calls per latency row (default 200,000)")
    p.add_argument("--per-process", type=int, help="e2e: records per process (default 100,000)")
    p.add_argument("--processes", type=int, help="e2e: processes (default 4)")
    p.add_argument("--lag-seconds", type=float, help="asyncio: seconds of loop-lag measurement (default 3)")
    p.add_argument("--output", default=RESULTS_DIR, help="directory for the JSON results")
    p.add_argument("--dir", help="where the benchmark files are written (default: the system temp dir)")
    p.add_argument("--check", action="store_true", help="exit 1 when a scenario misses a goal")
    p.add_argument("--chart", metavar="PATH", help="also write an SVG bar chart of this run to PATH")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        for spec in SCENARIOS.values():
            print(f"{spec.name:12} {spec.doc}")
        return 0
    names = args.scenario or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return 2
    params = Params.quick_size() if args.quick else Params()
    params.workdir = args.dir
    for knob in ("records", "baseline_records", "batch", "record_bytes", "window", "max_bytes",
                 "calls", "per_process", "processes", "lag_seconds"):
        value = getattr(args, knob)
        if value is not None:
            setattr(params, knob, value)
    load_before = _loadavg()
    loadavg_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = []
    for name in names:
        results.append(run_scenario(SCENARIOS[name], params, args.runs))
    sys.stderr.flush()
    print(f"\nload average (1, 5, 15 min) on {os.cpu_count()} cpus: before {load_before}, after {_loadavg()}")
    missed = 0
    for result in results:
        print()
        print(result["table"])
        for goal in result["goals"]:
            missed += not goal["met"]
            print(f"  goal {'met    ' if goal['met'] else 'MISSED '} {goal['goal']}  (measured: {_measured(goal)})")
    path = write_results(results, params, args.runs, args.output, loadavg_before)
    print(f"\nresults: {os.path.relpath(path)}")
    if args.chart:
        from .chart import write_chart  # chart imports this module

        print(f"chart: {os.path.relpath(write_chart([path], args.chart))}")
    return 1 if (args.check and missed) else 0
