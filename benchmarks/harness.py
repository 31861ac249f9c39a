"""Scenario registry, repetition with medians, the table and the JSON record."""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")


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
    quick: bool = False

    @classmethod
    def quick_size(cls) -> "Params":
        return cls(records=10_000, baseline_records=5_000, quick=True)


@dataclass
class Row:
    """One measured thing in one run of a scenario."""

    name: str
    records: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Goal:
    """What a row must reach: a rate, and/or a multiple of the baseline's rate."""

    row: str
    min_rate: Optional[float] = None
    min_ratio: Optional[float] = None

    def describe(self) -> str:
        parts = []
        if self.min_rate is not None:
            parts.append(f">= {self.min_rate:,.0f} records/s")
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:g}x baseline")
        return f"{self.row}: " + " and ".join(parts)


ScenarioFn = Callable[[Params], List[Row]]


@dataclass
class Scenario:
    name: str
    fn: ScenarioFn
    baseline: Optional[str] = None  # the row every ratio is taken against
    goals: List[Goal] = field(default_factory=list)
    doc: str = ""


SCENARIOS: Dict[str, Scenario] = {}


def scenario(name: str, baseline: Optional[str] = None,
             goals: Sequence[Goal] = ()) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register ``fn(params) -> rows`` under ``name``."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        SCENARIOS[name] = Scenario(name, fn, baseline, list(goals), doc[0] if doc else "")
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
        medians[name] = Summary(name, records, records / rate if rate else 0.0, rate, None,
                                rows[0].note, [r.seconds for r in rows])
    base = medians.get(spec.baseline or "")
    for summary in medians.values():
        if base is not None and base.rate > 0:
            summary.ratio = summary.rate / base.rate
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
        out.append({"goal": goal.describe(), "met": bool(met),
                    "rate": s.rate if s else None, "ratio": s.ratio if s else None})
    return out


def render_table(spec: Scenario, summaries: List[Summary], runs: int) -> str:
    header = ("scenario", "records", "seconds", "records/s", f"vs {spec.baseline or 'baseline'}", "note")
    body = []
    for s in summaries:
        ratio = f"{s.ratio:.2f}x" if s.ratio is not None else "-"
        body.append((f"{spec.name}: {s.name}", f"{s.records:,}", f"{s.seconds:.3f}", f"{s.rate:,.0f}", ratio, s.note))
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    right = {1, 2, 3, 4}

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


def run_scenario(spec: Scenario, params: Params, runs: int) -> Dict[str, Any]:
    raw: List[List[Row]] = []
    for i in range(runs):
        started = time.monotonic()
        rows = spec.fn(params)
        raw.append(rows)
        rates = ", ".join(f"{r.name} {r.rate:,.0f}/s" for r in rows)
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


def write_results(results: List[Dict[str, Any]], params: Params, runs: int, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    names = "+".join(r["scenario"] for r in results)
    path = os.path.join(out_dir, f"{stamp}-{names}{'-quick' if params.quick else ''}.json")
    doc = {"started": stamp, "machine": machine_info(), "params": asdict(params), "runs": runs,
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
    p.add_argument("--output", default=RESULTS_DIR, help="directory for the JSON results")
    p.add_argument("--dir", help="where the benchmark files are written (default: the system temp dir)")
    p.add_argument("--check", action="store_true", help="exit 1 when a scenario misses a goal")
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
    for knob in ("records", "baseline_records", "batch", "record_bytes", "window", "max_bytes"):
        value = getattr(args, knob)
        if value is not None:
            setattr(params, knob, value)
    results = []
    for name in names:
        results.append(run_scenario(SCENARIOS[name], params, args.runs))
    sys.stderr.flush()
    missed = 0
    for result in results:
        print()
        print(result["table"])
        for goal in result["goals"]:
            missed += not goal["met"]
            print(f"  goal {'met    ' if goal['met'] else 'MISSED '} {goal['goal']}")
    path = write_results(results, params, args.runs, args.output)
    print(f"\nresults: {os.path.relpath(path)}")
    return 1 if (args.check and missed) else 0
