"""The integrator's kit (client/) runs: each example as a subprocess, against
a real daemon and without one, then the file is checked with the oracle.
The Flask example runs under a real gunicorn with several workers and real
HTTP requests. (The FastAPI and aiohttp examples are exercised in
tests/e2e/client/test_async.py.)
"""

import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional

import pytest
from support import check_sequences, drive_web_app, free_tcp_port, read_lines, seq_record, short_socket_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CLIENT = os.path.join(ROOT, "client")
RECORDS = 2000
# The examples' format puts the record after "name: "; the oracle wants it alone.
MESSAGE = re.compile(r"^\S+ \S+ (?:INFO|ERROR) \[\d+\] example\.\w+: (.*)$")


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


# -- plain script ---------------------------------------------------------------
def test_plain_script_writes_every_record(where):
    path, endpoint, daemon = where
    stats = json.loads(_run("plain_script.py", path, "--endpoint", endpoint, "--records", str(RECORDS)))
    check_sequences(_records(path), {"plain": RECORDS, "plain-sync": 1}).assert_complete()
    assert stats["sync_count"] == 1 and stats["dropped_count"] == 0
    if daemon is None:
        assert stats["state"] == "embedded"
    else:
        # Printed right after logging: the first handshake may still be under
        # way. That the daemon wrote every record is checked just below.
        assert stats["state"] in ("connecting", "daemon"), stats
    _check_daemon_wrote(daemon, path, RECORDS + 1)


def test_plain_script_with_the_daemon_unreachable_uses_the_fallback(tmp_path):
    path = str(tmp_path / "logs" / "plain.log")
    env = dict(os.environ, CLH_EXAMPLE_LOG=path, CLH_WRITERD_ENDPOINT=f"ipc://{short_socket_dir()}/nobody.sock")
    stats = json.loads(_run("plain_script.py", "--records", str(RECORDS), env=env))
    assert stats["state"] == "fallback"
    check_sequences(_records(path), {"plain": RECORDS, "plain-sync": 1}).assert_complete()


# -- Flask under gunicorn ---------------------------------------------------------
FLASK_LINE = re.compile(r"^\S+ \S+ (INFO|WARNING) (\d+) app: (.*)$")


@pytest.mark.parametrize("mode", ["daemon", "no-daemon"])
def test_flask_under_gunicorn_every_request_is_logged(start_daemon, tmp_path, mode):
    pytest.importorskip("flask")
    pytest.importorskip("gunicorn")
    workers = 3
    daemon = start_daemon() if mode == "daemon" else None
    path = os.path.join(daemon.log_dir if daemon else str(tmp_path / "logs"), "flask.log")
    port = free_tcp_port()
    env = dict(os.environ, CLH_WRITERD_LOG=path, CLH_WRITERD_ENDPOINT=daemon.endpoint if daemon else "none")
    cmd = [sys.executable, "-m", "gunicorn", "--chdir", CLIENT, "--workers", str(workers),
           "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "30", "flask_app:app"]
    requests, payments = 600, 20
    # WARNING is the example's sync_level: a payment's line is in the file when the response comes.
    run = drive_web_app(cmd, ROOT, env, str(tmp_path / "gunicorn.stderr"), f"http://127.0.0.1:{port}", path,
                        "flask", requests, payments)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert run.not_logged == [], f"payments not in the file when the response came: {run.not_logged}"

    hello: List[str] = []
    paid: List[str] = []
    started = set()
    malformed = []
    for line in read_lines(path):
        m = FLASK_LINE.match(line)
        if m is None:
            malformed.append(line)
            continue
        message = m.group(3)
        if message.startswith("hello flask-"):
            hello.append(seq_record("flask", int(message[len("hello flask-"):])))
        elif message.startswith("payment flask-") and message.endswith(" captured"):
            paid.append(seq_record("pay", int(message.split()[1][len("flask-"):])))
        elif message.startswith("worker ") and message.endswith(" started"):
            started.add(int(m.group(2)))
        else:
            malformed.append(line)
    assert malformed == []
    check_sequences(hello, {"flask": requests}, payloads=False).assert_complete()
    check_sequences(paid, {"pay": payments}, payloads=False).assert_complete()
    # One handler per worker, each set up when gunicorn imported the app in it.
    assert len(started) == workers, started
    assert set(run.served_by) <= started and len(set(run.served_by)) >= 2, (set(run.served_by), started)
    if daemon is not None:
        # Every line went through the daemon (no fallback).
        assert daemon.file_stats(path)["records_written"] == len(read_lines(path))
