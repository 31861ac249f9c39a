"""An SVG bar chart of benchmark results, written by hand (no plotting library).

    python -m benchmarks.chart RESULTS.json [RESULTS.json ...] -o docs/bench.svg
    python -m benchmarks.chart --newest -o docs/bench.svg   # newest full run of each scenario
    python -m benchmarks --chart docs/bench.svg ...         # chart the run just made

Each scenario becomes one panel of horizontal bars, its medians as the
harness recorded them: records/s for throughput scenarios, one bar per
percentile (p50, p99) for latency scenarios. Rows named ``"<group>: ..."``
(the asyncio scenario's ``lag:`` rows) get a panel of their own, since they
measure something else. When a scenario is in several files, the last file
given wins. The footer names the files, the commit and the load average.
"""

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import RESULTS_DIR, ROOT

DEFAULT_SCENARIOS = ("ingest", "latency", "e2e", "asyncio")
PERCENTILES = ("p50", "p99")  # the metric bars drawn, when a row has them

# Layout (px) and colours.
WIDTH = 960
LABEL_W = 300  # row labels, right-aligned against the bars
VALUE_W = 90  # room right of the longest bar for its value
BAR_H = 13
BAR_GAP = 2
ROW_GAP = 8
PANEL_GAP = 26
TITLE_H = 22
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""
COLOURS = {"records/s": "#3b6fb6", "p50": "#3b6fb6", "p99": "#e0893a"}
OURS = ("daemon", "NonBlocking", "Async")  # rows measuring clh-writerd are drawn solid, the rest lighter


@dataclass
class Panel:
    title: str
    series: Tuple[str, ...]  # one bar per series per row
    rows: List[Tuple[str, Dict[str, float]]] = field(default_factory=list)


def newest_results(results_dir: str = RESULTS_DIR, scenarios: Sequence[str] = DEFAULT_SCENARIOS) -> List[str]:
    """For each scenario, the newest full (not ``--quick``) results file holding it."""
    chosen: List[str] = []
    for name in scenarios:
        for path in sorted(glob.glob(os.path.join(results_dir, "*.json")), reverse=True):
            if path.endswith("-quick.json"):
                continue
            with open(path) as f:
                doc = json.load(f)
            if any(s["scenario"] == name for s in doc.get("scenarios", [])):
                if path not in chosen:
                    chosen.append(path)
                break
    return sorted(chosen)


def build_panels(docs: Sequence[Dict[str, Any]]) -> List[Panel]:
    """Panels from the scenarios of ``docs`` (a later document replaces a scenario of an earlier one)."""
    scenarios: Dict[str, Tuple[Dict[str, Any], int]] = {}
    for doc in docs:
        for result in doc.get("scenarios", []):
            scenarios[result["scenario"]] = (result, doc.get("runs", 0))
    panels: List[Panel] = []
    for name, (result, runs) in scenarios.items():
        groups: Dict[str, Panel] = {}
        for row in result["median"]:
            metrics = row.get("metrics") or {}
            group, _, label = row["name"].partition(": ") if ": " in row["name"] else ("", "", row["name"])
            if metrics:
                series = tuple(p for p in PERCENTILES if p in metrics)
                values = {p: float(metrics[p]) for p in series}
                what = f"{', '.join(series)} µs per {'wake-up' if group == 'lag' else 'call'}, lower is better"
            else:
                series = ("records/s",)
                values = {"records/s": float(row["rate"])}
                what = "records/s, higher is better"
            if not series:
                continue
            if group not in groups:
                title = f"{name}{' ' + group if group else ''}: {what} (median of {runs})"
                groups[group] = Panel(title, series)
            groups[group].rows.append((label, values))
        panels.extend(groups.values())
    return panels


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _fmt(value: float, series: str) -> str:
    if series == "records/s":
        return f"{value / 1e6:.2f}M/s" if value >= 1e6 else f"{value:,.0f}/s"
    return f"{value:,.1f}"


def render_svg(panels: Sequence[Panel], title: str, footer: Sequence[str]) -> str:
    """The chart as an SVG document."""
    out: List[str] = []
    y = 34
    bar_x = LABEL_W + 10
    bar_w = WIDTH - bar_x - VALUE_W
    for panel in panels:
        out.append(f'<text x="10" y="{y + 14}" font-size="13" font-weight="bold">{_esc(panel.title)}</text>')
        legend_x = WIDTH - 10
        if len(panel.series) > 1:
            for s in reversed(panel.series):
                out.append(f'<text x="{legend_x}" y="{y + 14}" font-size="11" text-anchor="end">{_esc(s)}</text>')
                legend_x -= 8 + 7 * len(s)
                out.append(f'<rect x="{legend_x - 12}" y="{y + 4}" width="10" height="10" fill="{COLOURS[s]}"/>')
                legend_x -= 24
        y += TITLE_H
        top = max((v for _, values in panel.rows for v in values.values()), default=1.0) or 1.0
        for label, values in panel.rows:
            block = len(panel.series) * (BAR_H + BAR_GAP) - BAR_GAP
            opacity = "1" if any(word in label for word in OURS) else "0.45"
            out.append(f'<text x="{LABEL_W}" y="{y + block / 2 + 4:.1f}" font-size="12" '
                       f'text-anchor="end">{_esc(label)}</text>')
            for i, s in enumerate(panel.series):
                value = values.get(s)
                by = y + i * (BAR_H + BAR_GAP)
                if value is None:
                    continue
                w = max(1.0, bar_w * value / top)
                out.append(f'<rect x="{bar_x}" y="{by}" width="{w:.1f}" height="{BAR_H}" '
                           f'fill="{COLOURS[s]}" fill-opacity="{opacity}"><title>{_esc(label)} {s}: '
                           f'{_esc(_fmt(value, s))}</title></rect>')
                out.append(f'<text x="{bar_x + w + 4:.1f}" y="{by + BAR_H - 2}" font-size="11">'
                           f'{_esc(_fmt(value, s))}</text>')
            y += block + ROW_GAP
        y += PANEL_GAP - ROW_GAP
    for line in footer:
        out.append(f'<text x="10" y="{y}" font-size="10" fill="#555">{_esc(line)}</text>')
        y += 14
    height = y + 6
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" {FONT}>',
            f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
            f'<text x="10" y="20" font-size="15" font-weight="bold">{_esc(title)}</text>']
    return "\n".join(head + out + ["</svg>", ""])


def _footer(paths: Sequence[str], docs: Sequence[Dict[str, Any]]) -> List[str]:
    lines = []
    for path, doc in zip(paths, docs):
        machine = doc.get("machine", {})
        load = machine.get("loadavg_before") or machine.get("loadavg")
        load_text = " ".join(f"{x:.1f}" for x in load) if load else "n/a"
        names = ", ".join(s["scenario"] for s in doc.get("scenarios", []))
        lines.append(f"{os.path.basename(path)}: {names}; commit {machine.get('commit') or '?'}, "
                     f"{machine.get('cpus')} CPUs, Python {machine.get('python')}, load average {load_text}")
    lines.append("Solid bars: clh-writerd's handlers and daemon; light bars: what they are compared with.")
    return lines


def write_chart(paths: Sequence[str], output: str, title: str = "clh-writerd benchmarks") -> str:
    """Read results files, write the SVG chart to ``output``; returns ``output``."""
    docs = []
    for path in paths:
        with open(path) as f:
            docs.append(json.load(f))
    panels = build_panels(docs)
    if not panels:
        raise ValueError("no scenario results in " + ", ".join(paths))
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write(render_svg(panels, title, _footer(paths, docs)))
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chart", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", help="results JSON files (default with --newest: benchmarks/results/)")
    p.add_argument("--newest", action="store_true",
                   help="the newest full run of each of: " + ", ".join(DEFAULT_SCENARIOS) + " (the default)")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("-o", "--output", default=os.path.join(ROOT, "docs", "bench.svg"))
    args = p.parse_args(argv)
    if args.newest and args.results:
        p.error("give results files or --newest, not both")
    paths = list(args.results) or newest_results(args.results_dir)
    if not paths:
        print(f"no results files in {args.results_dir}: run `make bench` first", file=sys.stderr)
        return 1
    write_chart(paths, args.output)
    print(f"chart: {os.path.relpath(args.output)} from {', '.join(os.path.relpath(x) for x in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
