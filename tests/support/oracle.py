"""The sequence oracle: every test record says who wrote it and its number;
the oracle reads every file of a family (rotated, .gz) and reports missing,
duplicated and torn lines (rsyslog's seq_check)."""

import gzip
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple





# -- the sequence oracle ------------------------------------------------------
# Every test record is "SEQ <writer> <n> <payload>": the oracle knows who wrote
# it and in which order, so it can tell missing, duplicated and torn lines.
RECORD_RE = re.compile(r"^SEQ (\S+) (\d+) (.*)$")


def seq_record(writer: str, n: int, payload: str = "") -> str:
    return f"SEQ {writer} {n} {payload or ('x' * (n % 37))}"


def family_files(path: str) -> List[str]:
    """The base file and everything rotation made of it: .N, .N.gz, timed
    suffixes, and orphaned .rotate.* files left by an interrupted rollover."""
    directory, base = os.path.split(path)
    out = []
    for name in sorted(os.listdir(directory)):
        if name == base or name.startswith(base + "."):
            if name.endswith(".lock"):
                continue
            out.append(os.path.join(directory, name))
    return out


def read_lines(path: str) -> List[str]:
    """Every line of the file family, decoded, in no particular file order."""
    lines: List[str] = []
    for name in family_files(path):
        if ".rotate." in name and name.endswith(".gz") and os.path.exists(name[:-3]):
            # A writer killed while compressing: the source still holds every
            # line and the .gz is a partial copy (see set_aside_interrupted_gzips).
            continue
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as f:  # type: ignore[operator]
            data = f.read()
        text = data.decode("utf-8", "replace")
        chunk = text.split("\n")
        if chunk and chunk[-1] == "":
            chunk.pop()
        elif chunk:
            chunk[-1] += "\x00<no terminator>"  # a torn last line shows as malformed
        lines.extend(chunk)
    return lines


@dataclass
class OracleReport:
    expected: int = 0
    found: int = 0
    missing: Dict[str, List[int]] = field(default_factory=dict)
    duplicates: int = 0
    torn: List[str] = field(default_factory=list)
    foreign: int = 0  # well-formed lines from writers not in the expectation

    @property
    def missing_count(self) -> int:
        return sum(len(v) for v in self.missing.values())

    def assert_complete(self, allow_duplicates: bool = False) -> None:
        problems = []
        if self.missing_count:
            sample = {w: v[:10] for w, v in self.missing.items()}
            problems.append(f"{self.missing_count} missing (first: {sample})")
        if self.torn:
            problems.append(f"{len(self.torn)} torn lines (first: {self.torn[:3]!r})")
        if self.duplicates and not allow_duplicates:
            problems.append(f"{self.duplicates} duplicates")
        assert not problems, "; ".join(problems) + f" [expected {self.expected}, found {self.found}]"


def check_sequences(lines: Iterable[str], expected: Dict[str, int], payloads: bool = True) -> OracleReport:
    """Compare lines against ``expected`` = {writer: number of records 0..n-1}."""
    seen: Dict[str, Counter] = defaultdict(Counter)
    report = OracleReport(expected=sum(expected.values()))
    for line in lines:
        m = RECORD_RE.match(line)
        if not m:
            report.torn.append(line)
            continue
        writer, n, payload = m.group(1), int(m.group(2)), m.group(3)
        if payloads and payload.startswith("x") and payload != "x" * (n % 37):
            report.torn.append(line)
            continue
        if writer not in expected:
            report.foreign += 1
            continue
        seen[writer][n] += 1
        report.found += 1
    for writer, count in expected.items():
        got = seen.get(writer, Counter())
        missing = [n for n in range(count) if got[n] == 0]
        if missing:
            report.missing[writer] = missing
        report.duplicates += sum(c - 1 for c in got.values() if c > 1)
    return report


def per_writer_order(lines: Iterable[str]) -> Dict[str, bool]:
    """For lines of one file (not rotated), whether each writer's numbers only go up."""
    last: Dict[str, int] = {}
    ok: Dict[str, bool] = {}
    for line in lines:
        m = RECORD_RE.match(line)
        if not m:
            continue
        writer, n = m.group(1), int(m.group(2))
        ok.setdefault(writer, True)
        if writer in last and n <= last[writer]:
            ok[writer] = False
        last[writer] = n
    return ok


def ordered_family(path: str) -> List[str]:
    """Lines of a size-rotated family oldest first: highest .N first, base last."""
    def rank(name: str) -> Tuple[int, str]:
        m = re.search(r"\.(\d+)(\.gz)?$", name)
        if name == path:
            return (-1, name)
        return (int(m.group(1)) if m else 10**9, name)

    lines: List[str] = []
    for name in sorted(family_files(path), key=rank, reverse=True):
        if ".rotate." in name:
            continue
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as f:  # type: ignore[operator]
            lines.extend(f.read().decode("utf-8", "replace").splitlines())
    return lines


def set_aside_interrupted_gzips(path: str, aside: str) -> List[str]:
    """Move out of the family each ``.rotate.*.gz`` whose source ``.rotate.*``
    is still there: a writer was killed while compressing it (CLH removes the
    source only after the .gz is complete). The source holds every line; the
    .gz is a truncated copy (or a complete one, killed before the removal),
    checked here to hold nothing the source does not. Returns the names moved."""
    import zlib

    moved = []
    for name in family_files(path):
        source = name[:-len(".gz")]
        if ".rotate." not in name or not name.endswith(".gz") or not os.path.exists(source):
            continue
        with open(name, "rb") as f:
            partial = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(f.read())
        with open(source, "rb") as f:
            assert f.read().startswith(partial), f"{name} holds bytes its source {source} does not"
        os.makedirs(aside, exist_ok=True)
        shutil.move(name, os.path.join(aside, os.path.basename(name)))
        moved.append(name)
    return moved


# -- docs/guarantees.md -------------------------------------------------------
# Tests that prove a guarantee record what they did; `make guarantees` runs them
# with CLH_GUARANTEES_OUT set and renders the table from these rows. Without
# the variable nothing is written.
GUARANTEES_ENV = "CLH_GUARANTEES_OUT"


def record_guarantee(nodeid: str, scenario: str, what: str, records: int, missing: int,
                     duplicates: int, note: str = "") -> None:
    """Append one row (JSON line) for docs/guarantees.md."""
    out = os.environ.get(GUARANTEES_ENV)
    if not out:
        return
    import json

    row = {"nodeid": nodeid, "scenario": scenario, "what": what, "records": records,
           "missing": missing, "duplicates": duplicates, "note": note}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


# -- resources of a running process -------------------------------------------
