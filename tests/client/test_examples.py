"""The integrator's kit (client/) runs: each example as a subprocess, against
a real daemon and without one, then the file is checked with the oracle.
"""

import os
import re
import subprocess
import sys
from typing import Dict, List, Optional

import pytest
from support import check_sequences, read_lines, short_socket_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT = os.path.join(ROOT, "client")
RECORDS = 2000
# The examples' format puts the record after "name: "; the oracle wants it alone.
MESSAGE = re.compile(r"^\S+ \S+ INFO \[\d+\] example\.\w+: (.*)$")


def _records(path: str) -> List[str]:
    out = []
    for line in read_lines(path):
        m = MESSAGE.match(line)
        out.append(m.group(1) if m else line)  # a line that does not match shows up as torn
    return out


def _run(example: str, *args: str, env: Optional[Dict[str, str]] = None) -> str:
    done = subprocess.run([sys.executable, os.path.join(CLIENT, example), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


@pytest.fixture(params=["daemon", "no-daemon"])
def where(request, start_daemon, tmp_path):
    """(log path, --endpoint value, daemon or None)."""
    if request.param == "daemon":
        daemon = start_daemon()
        return os.path.join(daemon.log_dir, "example.log"), daemon.endpoint, daemon
    return str(tmp_path / "logs" / "example.log"), "none", None


def _check_daemon_wrote(daemon, path: str, at_least: int) -> None:
    if daemon is not None:
        assert daemon.file_stats(path)["records_written"] >= at_least


@pytest.mark.parametrize("example,writer", [
    ("dictconfig_example.py", "dictconfig"),
    ("yaml_example.py", "yaml"),
    ("fileconfig_example.py", "fileconfig"),
])
def test_config_examples_write_every_record(where, example, writer):
    if example == "yaml_example.py":
        pytest.importorskip("yaml")
    path, endpoint, daemon = where
    _run(example, path, "--endpoint", endpoint, "--records", str(RECORDS))
    check_sequences(_records(path), {writer: RECORDS}).assert_complete()
    _check_daemon_wrote(daemon, path, RECORDS)


def test_config_example_takes_the_log_and_endpoint_from_the_environment(start_daemon):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "from-env.log")
    env = dict(os.environ, CLH_EXAMPLE_LOG=path, CLH_WRITERD_ENDPOINT=daemon.endpoint)
    _run("fileconfig_example.py", "--records", str(RECORDS), env=env)
    check_sequences(_records(path), {"fileconfig": RECORDS}).assert_complete()
    _check_daemon_wrote(daemon, path, RECORDS)


def test_config_example_with_the_daemon_unreachable_uses_the_fallback(tmp_path):
    path = str(tmp_path / "logs" / "fallback.log")
    env = dict(os.environ, CLH_WRITERD_ENDPOINT=f"ipc://{short_socket_dir()}/nobody.sock")
    _run("dictconfig_example.py", path, "--records", str(RECORDS), env=env)
    check_sequences(_records(path), {"dictconfig": RECORDS}).assert_complete()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_example_writes_every_task_record(where, method):
    path, endpoint, daemon = where
    tasks = 6
    out = _run("pool_example.py", path, "--endpoint", endpoint, "--start-method", method,
               "--tasks", str(tasks), "--records", str(RECORDS))
    assert f"{tasks} tasks ran in" in out
    expected = {f"task{i}": RECORDS for i in range(tasks)}
    expected["parent"] = 1
    check_sequences(_records(path), expected).assert_complete()
    _check_daemon_wrote(daemon, path, tasks * RECORDS)
