"""`make demo` (client/demo.py): it runs, its report adds up, and its own
completeness check can fail.

The demo is the README's first command, so it runs here as a user runs it: a
subprocess in a fresh working directory, starting its own daemon at the
default endpoint (a private runtime directory, so no other daemon is used).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

from support import read_lines, short_socket_dir

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "client" / "demo.py"
PROCESS_LINE = re.compile(
    r"process (\d+): (\d+) calls in \S+s = ([\d.]+) us per call; all written \S+s after the first call: "
    r"(\d+) by the daemon, (\d+) by the process itself \(fallback\), (\d+) dropped; handler state: (\w+)")


def _demo_env(runtime_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CLH_WRITERD_ENDPOINT", "PYTHONPATH")}
    env["XDG_RUNTIME_DIR"] = runtime_dir  # the default endpoint lives here: a daemon of our own
    return env


def test_demo_runs_and_explains_what_it_measured(tmp_path):
    runtime_dir = short_socket_dir()
    try:
        result = subprocess.run([sys.executable, str(DEMO), "--processes", "2", "--records", "3000"],
                                cwd=tmp_path, env=_demo_env(runtime_dir), capture_output=True, text=True,
                                timeout=120)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "starting clh-writerd on the embedded default configuration" in out, out
    # It says what was measured and under which load, and why the README's figure differs.
    assert "what the application paid per logging call" in out and "CPU core(s)" in out, out
    assert "make bench" in out, out

    processes = [m.groups() for m in PROCESS_LINE.finditer(out)]
    assert len(processes) == 2, out
    for _pid, calls, per_call, by_daemon, by_process, dropped, state in processes:
        # Every record is accounted for: written by the daemon or by the fallback, none dropped.
        assert int(calls) == 3000 and int(by_daemon) + int(by_process) == 3000 and int(dropped) == 0, out
        assert float(per_call) > 0 and state in ("daemon", "fallback"), out
    assert "$ clh-writerd stats" in out and "clh-writerd stopped (exit code 0)" in out, out
    assert "check: 2 processes x 3000 records: missing=0 duplicates=0 malformed=0 -> OK" in out, out

    # Independently of the demo's own check: every record of both processes is in the files.
    seen = defaultdict(Counter)
    for line in read_lines(str(tmp_path / "logs" / "demo.log")):
        match = re.search(r"demo\[(\d+)\] record (\d+) of 3000$", line)
        assert match, line
        seen[match.group(1)][int(match.group(2))] += 1
    assert sorted(seen) == sorted(pid for pid, *_ in processes)
    assert all(sorted(c) == list(range(3000)) and max(c.values()) == 1 for c in seen.values())


def test_the_demos_check_reports_a_missing_record(tmp_path, monkeypatch, capsys):
    """Negative control: the demo's completeness check notices one missing line."""
    spec = importlib.util.spec_from_file_location("clh_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # type: ignore[union-attr]
    log = tmp_path / "demo.log"
    monkeypatch.setattr(demo, "LOG", str(log))
    lines = [f"2026-01-01 00:00:00,000 INFO demo[{pid}] record {i} of 5\n" for pid in (1, 2) for i in range(5)]
    log.write_text("".join(lines))
    assert demo.check(2, 5) is True
    log.write_text("".join(lines[:3] + lines[4:]))
    assert demo.check(2, 5) is False
    assert "missing=1" in capsys.readouterr().out
