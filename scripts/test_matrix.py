#!/usr/bin/env python3
"""Run the unit tests and one end-to-end test on every CPython 3.6-3.13 found here.

``make test-matrix`` (or ``python3 scripts/test_matrix.py``). For each version
it looks for an interpreter (pyenv's ``~/.pyenv/versions/3.X.Y`` first, then
``python3.X`` on PATH), reuses or creates ``.venv-matrix/3.X``, installs the
project there (``pip install -e '.[test]'``, only when pyproject.toml or the
interpreter changed), and runs ``TEST_FILES`` with pytest. Versions run one
after the other. Prints which versions were found and which are missing, a
summary table, and exits 1 if any version that was found failed.

3.6 and 3.7 are client-only versions: the thread handler, ``protocol``,
``_batchwrite`` and the fallback support them, the daemon and the asyncio
handler do not. There the project's wheel (built by the newest full version,
as a user on an old Python would install one built elsewhere) goes into the
venv, ``CLIENT_TEST_FILES`` run, and their daemons run on the newest full
version's venv (``CLH_WRITERD_DAEMON_PYTHON``).

Options: ``--versions 3.8,3.12`` to pick some, ``--recreate`` to rebuild the
venvs, and anything after ``--`` goes to pytest.
"""

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

SUMMARY = re.compile(r"\b(passed|failed|error|errors|no tests ran)\b.* in [0-9.]+s")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX_DIR = os.path.join(ROOT, ".venv-matrix")
VERSIONS = ("3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
CLIENT_ONLY = ("3.6", "3.7")
LAST_PIP = {"3.6": "pip<22", "3.7": "pip<24.1"}
# Every unit test (tests/unit: no daemon) plus one end-to-end test.
TEST_FILES = (
    "tests/unit",
    "tests/e2e/daemon/test_smoke.py",
)
# The thread client on Python 3.6/3.7, against a daemon on a newer Python.
CLIENT_TEST_FILES = (
    "tests/unit/test_protocol.py",
    "tests/unit/test_batchwrite.py",
    "tests/e2e/test_batchwrite.py",
    "tests/unit/client/test_core.py",
    "tests/unit/client/test_options.py",
    "tests/e2e/client/test_options.py",
    "tests/unit/client/test_nonblocking.py",
    "tests/e2e/client/test_handler.py",
)
CLIENT_TEST_PACKAGES = ("pytest", "hypothesis")
PYTEST_ARGS = ("-q", "-p", "no:cacheprovider")
INSTALL_TIMEOUT = 600
TEST_TIMEOUT = 600
STAMP = ".matrix-stamp"


class Outcome(NamedTuple):
    version: str
    interpreter: str
    result: str  # "passed", "FAILED", "SETUP FAILED"
    seconds: float
    detail: str


def interpreter_version(exe: str) -> Optional[Tuple[int, int, int]]:
    """(major, minor, micro) of a CPython interpreter, or None if it does not run."""
    try:
        out = subprocess.run(
            [exe, "-c", "import sys, platform; print(platform.python_implementation(), *sys.version_info[:3])"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.stdout.split()
    if out.returncode != 0 or len(parts) != 4 or parts[0] != "CPython":
        return None
    return int(parts[1]), int(parts[2]), int(parts[3])


def find_interpreter(version: str) -> Optional[str]:
    """The newest pyenv 3.X.Y, else ``python3.X`` on PATH; checked by running it."""
    major, minor = (int(x) for x in version.split("."))
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = []
    pattern = re.compile(rf"^{major}\.{minor}\.(\d+)$")
    found = []
    for path in glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*")):
        m = pattern.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), os.path.join(path, "bin", "python")))
    candidates += [exe for _, exe in sorted(found, reverse=True)]
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    for exe in candidates:
        if os.access(exe, os.X_OK) and (interpreter_version(exe) or ())[:2] == (major, minor):
            return exe
    return None


def venv_python(version: str) -> str:
    return os.path.join(MATRIX_DIR, version, "bin", "python")


def _stamp_text(interpreter: str) -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return f"{os.path.realpath(interpreter)}\n{digest}\n"


def _run_logged(cmd: Sequence[str], log: List[str], timeout: float, env: Optional[Dict[str, str]] = None) -> bool:
    log.append("$ " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=dict(_env(), **(env or {})))
    except subprocess.TimeoutExpired:
        log.append(f"timed out after {timeout}s")
        return False
    log.append(proc.stdout + proc.stderr)
    return proc.returncode == 0


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "PYENV_VERSION"):
        env.pop(name, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def prepare_venv(version: str, interpreter: str, recreate: bool, log: List[str]) -> bool:
    """Create or reuse .venv-matrix/3.X with the project installed; False on failure."""
    venv = os.path.join(MATRIX_DIR, version)
    stamp_path = os.path.join(venv, STAMP)
    wanted = _stamp_text(interpreter)
    python = venv_python(version)
    if not recreate and os.path.exists(stamp_path) and interpreter_version(python):
        with open(stamp_path) as f:
            if f.read() == wanted:
                log.append(f"reusing {venv}")
                return True
    fresh = recreate or not interpreter_version(python)
    if fresh:
        shutil.rmtree(venv, ignore_errors=True)
        if not _run_logged([interpreter, "-m", "venv", venv], log, INSTALL_TIMEOUT):
            return False
        # Old bundled pips cannot install a pyproject-only project in editable mode.
        if not _run_logged([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], log, INSTALL_TIMEOUT):
            return False
    if not _run_logged([python, "-m", "pip", "install", "--quiet", "-e", ".[test]"], log, INSTALL_TIMEOUT):
        return False
    with open(stamp_path, "w") as f:
        f.write(wanted)
    return True


def prepare_client_venv(version: str, interpreter: str, builder: str, recreate: bool, log: List[str]) -> bool:
    """A 3.6/3.7 venv with this checkout's wheel (built by ``builder``) and the test runner."""
    venv = os.path.join(MATRIX_DIR, version)
    python = venv_python(version)
    if recreate or not interpreter_version(python):
        shutil.rmtree(venv, ignore_errors=True)
        if not _run_logged([interpreter, "-m", "venv", venv], log, INSTALL_TIMEOUT):
            return False
    # The bundled pip is too old to respect pip's own Requires-Python: name the last release for this Python.
    if not _run_logged([python, "-m", "pip", "install", "--quiet", "--upgrade", LAST_PIP[version]], log,
                       INSTALL_TIMEOUT):
        return False
    wheels = os.path.join(MATRIX_DIR, "wheel")
    shutil.rmtree(wheels, ignore_errors=True)
    if not _run_logged([builder, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, ROOT], log,
                       INSTALL_TIMEOUT):
        return False
    wheel = glob.glob(os.path.join(wheels, "clh_writerd-*.whl"))
    if len(wheel) != 1:
        log.append(f"expected one wheel in {wheels}, found {wheel}")
        return False
    return (_run_logged([python, "-m", "pip", "install", "--quiet", *CLIENT_TEST_PACKAGES], log, INSTALL_TIMEOUT)
            and _run_logged([python, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", wheel[0]],
                            log, INSTALL_TIMEOUT)
            and _run_logged([python, "-m", "pip", "install", "--quiet", wheel[0]], log, INSTALL_TIMEOUT))


def run_tests(version: str, files: Sequence[str], extra: Sequence[str], log: List[str],
              daemon_python: Optional[str] = None) -> Tuple[bool, str]:
    cmd = [venv_python(version), "-m", "pytest", *PYTEST_ARGS, *files, *extra]
    env = {"CLH_WRITERD_DAEMON_PYTHON": daemon_python} if daemon_python else {}
    ok = _run_logged(cmd, log, TEST_TIMEOUT, env)
    # pytest's own summary ("1 failed, 306 passed in 22.9s"), not whatever the
    # process printed last (the suite's at-exit loss notices come after it).
    lines = [line for line in log[-1].splitlines() if line.strip()]
    summaries = [line for line in lines if SUMMARY.search(line)]
    return ok, (summaries or lines or ["no output"])[-1].strip("= ")


def run_version(version: str, interpreter: str, files: Sequence[str], extra: Sequence[str],
                recreate: bool, daemon_python: Optional[str] = None) -> Outcome:
    """One version; a client-only one (``daemon_python`` given) gets the wheel and CLIENT_TEST_FILES."""
    started = time.monotonic()
    log: List[str] = []
    log_path = os.path.join(MATRIX_DIR, f"{version}.log")
    try:
        if daemon_python:
            ready = prepare_client_venv(version, interpreter, daemon_python, recreate, log)
        else:
            ready = prepare_venv(version, interpreter, recreate, log)
        if not ready:
            return Outcome(version, interpreter, "SETUP FAILED", time.monotonic() - started,
                           f"see {os.path.relpath(log_path, ROOT)}")
        ok, summary = run_tests(version, files, extra, log, daemon_python)
        return Outcome(version, interpreter, "passed" if ok else "FAILED", time.monotonic() - started, summary)
    finally:
        os.makedirs(MATRIX_DIR, exist_ok=True)
        with open(log_path, "w") as f:
            f.write("\n".join(log) + "\n")


def render(outcomes: List[Outcome], missing: List[str]) -> str:
    rows = [("version", "result", "seconds", "interpreter", "detail")]
    for o in outcomes:
        rows.append((o.version, o.result, f"{o.seconds:.1f}", o.interpreter, o.detail))
    for version in missing:
        rows.append((version, "missing", "-", "-", "no interpreter found"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row[:4], widths))]
        lines.append("  ".join(cells + [row[4]]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths + [len("detail")]))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", default=",".join(VERSIONS), help="comma-separated, e.g. 3.8,3.13")
    parser.add_argument("--recreate", action="store_true", help="rebuild the venvs from scratch")
    args = parser.parse_args(argv)
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]

    files = [f for f in TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
    skipped = [f for f in TEST_FILES if f not in files]
    if not files:
        print("test-matrix: none of the test files exist: " + ", ".join(TEST_FILES), file=sys.stderr)
        return 2
    found: Dict[str, str] = {}
    missing: List[str] = []
    for version in versions:
        exe = find_interpreter(version)
        if exe:
            found[version] = exe
        else:
            missing.append(version)
    print("found:   " + (", ".join(f"{v} ({exe})" for v, exe in found.items()) or "none"))
    print("missing: " + (", ".join(missing) or "none"))
    print("tests:   " + " ".join(files) + (f"  (not there yet, skipped: {' '.join(skipped)})" if skipped else ""))
    sys.stdout.flush()

    outcomes = []
    # Full versions first: the newest one that passes builds the wheel and runs
    # the daemons of the client-only versions.
    daemon_python: Optional[str] = None
    order = [v for v in found if v not in CLIENT_ONLY] + [v for v in found if v in CLIENT_ONLY]
    if order and order[0] in CLIENT_ONLY:
        # Client-only versions alone (--versions 3.6,3.7): their daemons still
        # need a full version, the newest one here.
        full = [v for v in VERSIONS if v not in CLIENT_ONLY and find_interpreter(v)]
        if full:
            print(f"(adding {full[-1]} to run the daemons of {', '.join(order)})")
            found[full[-1]] = find_interpreter(full[-1]) or ""
            order.insert(0, full[-1])
    for version in order:
        exe = found[version]
        print(f"--- {version}: ", end="", flush=True)
        if version in CLIENT_ONLY:
            if daemon_python is None:
                outcome = Outcome(version, exe, "SETUP FAILED", 0.0, "no full version (3.8+) passed to run its daemon")
            else:
                client_files = [f for f in CLIENT_TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
                outcome = run_version(version, exe, client_files, extra, args.recreate, daemon_python)
        else:
            outcome = run_version(version, exe, files, extra, args.recreate)
            if outcome.result == "passed":
                daemon_python = venv_python(version)
        outcomes.append(outcome)
        print(f"{outcome.result} in {outcome.seconds:.1f}s ({outcome.detail})", flush=True)
        if outcome.result != "passed" and os.path.exists(os.path.join(MATRIX_DIR, f"{version}.log")):
            with open(os.path.join(MATRIX_DIR, f"{version}.log")) as f:
                tail = f.read().splitlines()[-40:]
            print("\n".join("    " + line for line in tail), flush=True)

    print()
    print(render(outcomes, missing))
    failed = [o.version for o in outcomes if o.result != "passed"]
    if failed:
        print(f"\nfailed on: {', '.join(failed)}")
        return 1
    if not outcomes:
        print("\nno interpreter found: nothing was tested")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
