"""Performance figures in the docs are generated, never copied by hand
(``benchmarks/summary.py``): every block equals what its results files
give, and outside the blocks the docs that quote benchmarks quote no figure.
"""

import re
import subprocess
import sys
from pathlib import Path

from benchmarks import summary

REPO = Path(__file__).resolve().parents[3]
# The docs whose figures come from the benchmark harness (other pages quote
# measurements of their own tests: docs/security.md, docs/forwarding.md).
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "docs" / "patterns.md",
        REPO / "docs" / "migration.md"]
FIGURE = re.compile(r"\d[\d,.]*\s*(?:µs|records/s|/s\b)")
# Workload parameters, not measurements.
PARAMETERS = {"20,000 records/s"}
# benchmarks/README.md keeps the history of what was tried, each figure with the results file it cites.
HISTORY = "## History: what was measured and tried"


def outside_blocks(text: str) -> str:
    kept, last = [], 0
    for start, end, _ in summary.blocks(text):
        kept.append(text[last:start])
        last = end
    kept.append(text[last:])
    return "".join(kept)


def test_every_generated_block_is_what_its_results_files_give():
    done = subprocess.run([sys.executable, "-m", "benchmarks.summary", "--check", *map(str, DOCS)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for doc in DOCS:
        assert list(summary.blocks(doc.read_text())), f"{doc.name} has no generated block"


def test_a_figure_edited_by_hand_is_caught(tmp_path):
    """Negative control: one digit changed in a generated table fails the check."""
    text = (REPO / "README.md").read_text()
    start, end, _ = next(summary.blocks(text))
    block = text[start:end]
    row = next(line for line in block.splitlines() if line.startswith("| ") and re.search(r"\d", line))
    digit = re.search(r"\d", row)
    assert digit is not None
    edited = row[:digit.start()] + str((int(digit.group(0)) + 1) % 10) + row[digit.end():]
    copy = tmp_path / "README.md"
    copy.write_text(text[:start] + block.replace(row, edited, 1) + text[end:])
    done = subprocess.run([sys.executable, "-m", "benchmarks.summary", "--check", str(copy)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "differs from its results files" in done.stderr


def test_no_figure_is_quoted_outside_the_generated_blocks():
    found = []
    for doc in DOCS:
        text = outside_blocks(doc.read_text()).split(HISTORY)[0]
        quoted = (" ".join(m.group(0).split()) for m in FIGURE.finditer(text))
        found += [f"{doc.relative_to(REPO)}: {figure}" for figure in quoted if figure not in PARAMETERS]
    assert found == [], "figures copied by hand (generate them: python -m benchmarks.summary --write):\n" + "\n".join(found)


def test_the_generator_takes_a_later_file_for_a_scenario_both_hold():
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "benchmarks" / "results").glob("*e2e*.json"))[-2:]
    chosen = summary.load(files)
    assert [path for path, _, s in chosen if s["scenario"] == "e2e"] == [files[-1]]
