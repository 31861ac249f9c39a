"""Performance figures in the docs, generated from results files, never copied by hand.

A doc holds generated blocks between two markers; the first names the
results files it comes from (a later file wins for a scenario both hold)
and, optionally, which scenarios and rows it shows and whether it lists
their goals::

    <!-- perf-summary files="benchmarks/results/A.json benchmarks/results/B.json" scenarios="sync,cpu" rows="FileHandler|CLH direct" goals="no" -->
    ...generated...
    <!-- perf-summary end -->

``python -m benchmarks.summary --write README.md docs/patterns.md`` fills
every block from its files; ``--check`` fails (exit 1) when a block is not
what its files give (``make test`` runs it: a figure edited by hand, or a
results file replaced, fails). ``python -m benchmarks.summary FILE...``
prints the block for those files.
"""

import argparse
import importlib
import json
import math
import os
import re
import shlex
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .harness import ROOT, SCENARIOS

BEGIN = re.compile(r"<!-- perf-summary (?P<attrs>files=[^>]*?) -->\n")
END = "<!-- perf-summary end -->"
ATTR = re.compile(r'(\w+)="([^"]*)"')


def _titles() -> Dict[str, str]:
    """Each scenario's one-line description, as registered (declared once, with the scenario)."""
    main = importlib.import_module("benchmarks.__main__")
    for module in main.SCENARIO_MODULES:
        importlib.import_module(module)
    return {name: spec.doc for name, spec in SCENARIOS.items()}


def load(paths: Sequence[str]) -> List[Tuple[str, Dict[str, Any], Dict[str, Any]]]:
    """(path, file, scenario) for every scenario, a later file replacing an earlier one's."""
    chosen: Dict[str, Tuple[str, Dict[str, Any], Dict[str, Any]]] = {}
    for path in paths:
        with open(os.path.join(ROOT, path)) as f:
            doc = json.load(f)
        for scenario in doc["scenarios"]:
            chosen[scenario["scenario"]] = (path, doc, scenario)
    return list(chosen.values())


def _number(value: Optional[float], unit: str = "") -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.1f}"


def _source(path: str, doc: Dict[str, Any], scenarios: List[str]) -> str:
    machine = doc.get("machine", {})
    before = machine.get("loadavg_before") or [math.nan]
    after = machine.get("loadavg") or [math.nan]
    command = "python -m benchmarks --runs {} {}".format(
        doc.get("runs", 1), " ".join(f"--scenario {name}" for name in scenarios))
    return (f"Medians of {doc.get('runs', 1)} run(s) of `{command}`, commit {machine.get('commit', '?')}, "
            f"{machine.get('cpus', '?')} CPUs, load {before[0]:.1f} before and {after[0]:.1f} after: "
            f"`{path}`.")


def table(scenario: Dict[str, Any], title: str, rows: Optional[List[str]] = None, goals: bool = True) -> List[str]:
    """One scenario as a markdown table, then its goals (met or missed)."""
    medians = [row for row in scenario["median"] if rows is None or row["name"] in rows]
    baseline = scenario.get("baseline")
    out = [f"**{scenario['scenario']}**: {title}", ""]
    metrics = [m for m in (medians[0].get("metrics") or {}) if m != "dropped"] if medians else []
    if metrics:
        ratios = list(medians[0].get("ratios") or {})
        head = ["row", *(f"{m} µs" for m in metrics), *(f"{m} vs {baseline}" for m in ratios)]
        out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for row in medians:
            cells = [row["name"], *(_number(row["metrics"].get(m)) for m in metrics),
                     *(_number((row.get("ratios") or {}).get(m), "x") for m in ratios)]
            out.append("| " + " | ".join(cells) + " |")
    else:
        head = ["row", "records/s", f"vs {baseline}"]
        out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for row in medians:
            out.append(f"| {row['name']} | {_number(row.get('rate'))} | {_number(row.get('ratio'), 'x')} |")
    shown = [goal for goal in scenario.get("goals", []) if goals and (rows is None or goal["goal"].split(":")[0] in rows)]
    if shown:
        out.append("")
        for goal in shown:
            measured = (f"{goal['metric']} {_number(goal.get('value'))}" if goal.get("metric")
                        else f"{_number(goal.get('rate'))} records/s")
            if goal.get("metric_ratio") is not None:
                measured += f", {_number(goal['metric_ratio'], 'x')}"
            elif not goal.get("metric") and goal.get("ratio") is not None:
                measured += f", {_number(goal['ratio'], 'x')}"
            out.append(f"- goal {'met' if goal['met'] else '**missed**'}: {goal['goal']} (measured: {measured})")
    return out + [""]


def render(files: Sequence[str], scenarios: Optional[List[str]] = None, rows: Optional[List[str]] = None,
           goals: bool = True) -> str:
    """The block for ``files`` (only ``scenarios`` and ``rows``, when given; ``goals``: list them)."""
    titles = _titles()
    chosen = [(path, doc, s) for path, doc, s in load(files) if scenarios is None or s["scenario"] in scenarios]
    if scenarios is not None:
        order = {name: i for i, name in enumerate(scenarios)}
        chosen.sort(key=lambda item: order[item[2]["scenario"]])
    out: List[str] = []
    for path in dict.fromkeys(path for path, _, _ in chosen):
        doc = next(doc for p, doc, _ in chosen if p == path)
        out += [_source(path, doc, [s["scenario"] for s in doc["scenarios"]]), ""]
        for p, _, scenario in chosen:
            if p == path:
                out += table(scenario, titles.get(scenario["scenario"], ""), rows, goals)
    return "\n".join(out)


def blocks(text: str) -> Iterator[Tuple[int, int, Dict[str, str]]]:
    """(start of the content, its end, the marker's attributes) of every block in ``text``."""
    for match in BEGIN.finditer(text):
        end = text.find(END, match.end())
        if end < 0:
            raise ValueError(f"a perf-summary block has no '{END}'")
        yield match.end(), end, dict(ATTR.findall(match.group("attrs")))


def _block(attrs: Dict[str, str]) -> str:
    files = shlex.split(attrs["files"])
    scenarios = attrs["scenarios"].split(",") if attrs.get("scenarios") else None
    rows = attrs["rows"].split("|") if attrs.get("rows") else None
    return render(files, scenarios, rows, attrs.get("goals", "yes") != "no")


def regenerate(text: str) -> str:
    out, last = [], 0
    for start, end, attrs in blocks(text):
        out += [text[last:start], _block(attrs)]
        last = end
    return "".join(out + [text[last:]])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="results files (print their block), or docs with --write/--check")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="fill every perf-summary block of these docs")
    mode.add_argument("--check", action="store_true", help="exit 1 if a block differs from what its files give")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(render(args.paths))
        return 0
    stale = []
    for path in args.paths:
        with open(path) as f:
            text = f.read()
        fresh = regenerate(text)
        if fresh != text:
            if args.write:
                with open(path, "w") as f:
                    f.write(fresh)
                print(f"{path}: figures regenerated")
            else:
                stale.append(path)
    for path in stale:
        print(f"{path}: a perf-summary block differs from its results files "
              f"(run: python -m benchmarks.summary --write {path})", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
