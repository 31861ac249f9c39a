"""``e2e``: several processes logging into one rotating file, end to end
(issue 3).

``processes`` processes x ``per_process`` records into one file (maxBytes
16 MiB, backupCount 20), through the daemon with NonBlockingConcurrentHandler
and through CLH direct, in the same run. The clock starts when every process
is ready (imports done, handler built) and is told to go, and stops when the
last process's ``close()`` returned, i.e. when every record is in the files
(for the daemon path: acknowledged as written). Then a sequence check reads
every file: a record missing fails the run; duplicates are reported.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

from .daemon import bench_env, running_daemon
from .handlers import LOG_NAME, log_files, sequence_check
from .harness import ROOT, Goal, Params, Row, rotated, scenario

BASELINE = "CLH direct"
DAEMON = "NonBlocking via daemon"
WRITER_TIMEOUT = 600.0


# Issue 3 asked 4x; issue 16 raised it to 6x.
@scenario("e2e", baseline=BASELINE, goals=[Goal(DAEMON, min_ratio=4.5)])
def e2e(params: Params) -> List[Row]:
    """N processes into one rotating file: NonBlocking via the daemon vs CLH direct."""
    workdir = tempfile.mkdtemp(prefix="clh-bench-", dir=params.workdir)
    log_dir = os.path.join(workdir, "logs")
    try:
        with running_daemon(workdir, [log_dir]) as endpoint:
            rows = [(DAEMON, "nb-daemon", endpoint), (BASELINE, "clh", None)]
            return [run_writers(name, kind, params, os.path.join(log_dir, kind), target)
                    for name, kind, target in rotated(rows, params.run)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_writers(name: str, kind: str, params: Params, directory: str, endpoint: Any) -> Row:
    os.makedirs(directory)
    procs = []
    try:
        for proc in range(params.processes):
            spec = {"handler": kind, "dir": directory, "endpoint": endpoint, "proc": proc,
                    "per_process": params.per_process}
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.e2e_writer", json.dumps(spec)],
                                          cwd=ROOT, env=bench_env(), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for p in procs:
            if p.stdout is None or p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{name}: a writer did not start:\n{_errors(p)}")
        started = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=WRITER_TIMEOUT)
            if p.returncode != 0:
                raise RuntimeError(f"{name}: a writer exited with {p.returncode}:\n{err}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seconds = max(r["finished"] for r in results) - started
    files = log_files(os.path.join(directory, LOG_NAME))
    missing, duplicates, unparsed = sequence_check(files, params.processes, params.per_process)
    if missing or unparsed:
        raise RuntimeError(f"{name}: {missing} records missing, {unparsed} unparsable lines in {files}")
    return Row(name, params.processes * params.per_process, seconds, _note(results, files, duplicates))


def _errors(p: "subprocess.Popen[str]") -> str:
    p.kill()
    _, err = p.communicate()
    return err


def _note(results: List[Dict[str, Any]], files: List[str], duplicates: int) -> str:
    parts = [f"{len(results)} procs", f"{len(files)} files", "0 lost", f"{duplicates} dup"]
    logged = max(r["logged"] for r in results) - min(r["started"] for r in results)
    parts.append(f"last logger.info returned at {logged:.2f}s")
    totals: Dict[str, int] = {}
    for r in results:
        for key in ("fallback_count", "fallback_written", "resent", "dropped_count"):
            totals[key] = totals.get(key, 0) + int(r["stats"].get(key, 0))
    for key, label in (("fallback_count", "queue full->sync"), ("fallback_written", "written directly"),
                       ("resent", "resent"), ("dropped_count", "dropped")):
        if totals.get(key):
            parts.append(f"{label} {totals[key]:,}")
    return "; ".join(parts)
