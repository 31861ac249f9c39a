"""Monitoring tells the truth about the process in trouble (issue 15, data half).

A real daemon and real handlers in an application subprocess
(monitoring_app.py) whose stderr is captured: for each blind spot (forbidden
path, a frozen daemon that leaves duplicates, a daemon restart under load,
an option conflict, three handlers in one process), the daemon's per-client
view equals what the clients' get_stats() say, and the application's stderr
carries exactly one warning per transition, with what to do. The notices
observed in the test process: tests/unit/client/test_notices.py.
"""

import json
import logging
import os
import select
import signal
import subprocess
import sys
from typing import Any, Dict, List

import pytest

from clh_writerd.client._notices import LOGGER_NAME

from support import check_sequences, read_lines, wait_for

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "monitoring_app.py")
FALLBACK = "writing through the fallback"
BACK = "back on the daemon"
# How each get_stats() key travels in a report (protocol.REPORT_COUNTERS).
REPORTED = {"dropped": "dropped_count", "fallback": "fallback_written", "resent": "resent",
            "queue_full": "fallback_count", "sync_timeouts": "sync_timeouts", "oversize": "oversize",
            "sent": "sent", "acked": "acked", "write_errors": "write_errors", "unencodable": "unencodable",
            "lost": "lost"}
# Fast reports and a fast verdict on a silent daemon keep the suite short.
FAST = {"report_interval": 0.2, "ack_timeout": 0.5, "liveness_timeout": 0.3, "max_probe_interval": 0.2}


class AppProcess:
    """monitoring_app.py as a subprocess; ``cmd`` sends one command, returns its reply."""

    def __init__(self, tmp_path, endpoint: str, handlers: List[Dict[str, Any]], root: bool = True) -> None:
        self.stderr_path = str(tmp_path / f"app-{len(os.listdir(tmp_path))}.stderr")
        spec = {"endpoint": endpoint, "root": root, "handlers": handlers}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, APP, json.dumps(spec)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        self._read(10.0)

    def _read(self, timeout: float) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"no reply from the app within {timeout}s; stderr:\n{self.stderr()}"
        return json.loads(line)

    def cmd(self, line: str, timeout: float = 20.0) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> Dict[str, Any]:
        reply = self.cmd("close")
        assert self.proc.wait(10) == 0, self.stderr()
        return reply

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def warnings(self) -> List[str]:
        """Every line the app wrote on stderr (each notice is one line)."""
        return [line for line in self.stderr().splitlines() if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def app_process(tmp_path):
    apps: List[AppProcess] = []

    def start(*args: Any, **kwargs: Any) -> AppProcess:
        app = AppProcess(tmp_path, *args, **kwargs)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.kill()


def reported(stats: Dict[str, Any]) -> Dict[str, int]:
    """What a client with these get_stats() reports about itself."""
    return {name: stats[key] for name, key in REPORTED.items()}


def daemon_entries(daemon, sessions: List[str]) -> List[Dict[str, Any]]:
    by_session = {c["session"]: c for c in daemon.stats()["clients"]}
    return [by_session.get(s) for s in sessions]


def wait_until_reported(daemon, reply: Dict[str, Any], closed: bool = True) -> List[Dict[str, Any]]:
    """The daemon's entries for the app's handlers, once they equal the
    handlers' own get_stats() (the final report arrived, if ``closed``)."""
    want = [reported(s) for s in reply["stats"]]

    def matches() -> Any:
        entries = daemon_entries(daemon, reply["sessions"])
        if all(e is not None and e["reported"] == w and (e["closed"] or not closed) for e, w in zip(entries, want)):
            return entries
        return None

    try:
        return wait_for(matches, 10.0, "the daemon's view to equal the clients' get_stats()")
    except AssertionError:
        raise AssertionError(f"daemon {daemon_entries(daemon, reply['sessions'])} != clients {want}") from None


def written(daemon, path: str) -> int:
    """Records the daemon wrote to ``path`` (0 before it opened the file)."""
    try:
        return daemon.file_stats(path)["records_written"]
    except KeyError:
        return 0


def count(lines: List[str], needle: str) -> int:
    return sum(needle in line for line in lines)


# -- the blind spots -------------------------------------------------------------------
def test_forbidden_path_is_reported_in_fallback_and_warned_once_with_the_fix(start_daemon, app_process, tmp_path):
    daemon = start_daemon()
    path = str(tmp_path / "elsewhere" / "app.log")
    os.makedirs(os.path.dirname(path))
    app = app_process(daemon.endpoint, [{"path": path, "kwargs": FAST}], root=True)
    app.cmd("log 300")
    reply = app.cmd("flush")
    [client] = reply["stats"]
    assert client["state"] == "fallback" and client["fallback_written"] == 300
    # While it runs: the periodic report in the fallback state reaches the daemon.
    [entry] = wait_until_reported(daemon, app.cmd("stats"), closed=False)
    assert entry["state"] == "fallback" and entry["file"] == path
    assert "forbidden_path" in entry["last_error"]
    app.cmd("log 200")
    final = app.close()
    [entry] = wait_until_reported(daemon, final)
    assert entry["reported"]["fallback"] == 500 and entry["state"] == "stopped"
    lines = app.warnings()
    assert len(lines) == 1 and count(lines, FALLBACK) == 1, lines
    assert "forbidden path" in lines[0] and f"add {os.path.dirname(path)} to allowed_dirs" in lines[0]
    # The handler on the root logger did not write its own warning into the file.
    check_sequences(read_lines(path), {"w0": 500}).assert_complete()


def test_refused_sync_records_alone_warn_once_too(start_daemon, app_process, tmp_path):
    """An app that logs only sync records (ERROR and above) gets the same one warning."""
    daemon = start_daemon()
    path = str(tmp_path / "elsewhere" / "errors.log")
    os.makedirs(os.path.dirname(path))
    app = app_process(daemon.endpoint, [{"path": path, "kwargs": FAST}])
    # Connected first: a sync record logged while the handler is still
    # connecting is written directly and never reaches the daemon to be refused.
    wait_for(lambda: app.cmd("stats")["stats"][0]["state"] == "daemon", 10, "the client to connect")
    app.cmd("log 5 ERROR")
    wait_for(lambda: app.cmd("stats")["stats"][0]["state"] == "fallback", 5, "the fallback after a refused sync")
    app.cmd("log 20 ERROR")
    final = app.close()
    [entry] = wait_until_reported(daemon, final)
    assert entry["reported"]["fallback"] == 25 and "forbidden_path" in entry["last_error"]
    lines = app.warnings()
    assert len(lines) == 1 and "forbidden path" in lines[0] and "allowed_dirs" in lines[0], lines
    check_sequences(read_lines(path), {"w0": 25}).assert_complete()


def test_frozen_daemon_duplicates_show_as_resent_in_the_daemon_view(start_daemon, app_process):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "frozen.log")
    app = app_process(daemon.endpoint, [{"path": path, "kwargs": FAST}])
    app.cmd("log 200")
    assert app.cmd("flush")["stats"][0]["acked"] == 200
    daemon.send_signal(signal.SIGSTOP)
    try:
        app.cmd("log 300")
        frozen = app.cmd("flush")["stats"][0]
    finally:
        daemon.send_signal(signal.SIGCONT)
    assert frozen["state"] == "fallback" and frozen["resent"] > 0
    wait_for(lambda: app.cmd("stats")["stats"][0]["state"] == "daemon", 10, "the client to find the daemon again")
    app.cmd("log 100")
    app.cmd("flush")
    final = app.close()
    [client] = final["stats"]
    [entry] = wait_until_reported(daemon, final)
    assert entry["reported"]["resent"] == client["resent"] == frozen["resent"]
    report = check_sequences(read_lines(path), {"w0": 600})
    report.assert_complete(allow_duplicates=True)
    assert 0 < report.duplicates <= client["resent"]
    lines = app.warnings()
    assert len(lines) == 2 and count(lines, FALLBACK) == 1 and count(lines, BACK) == 1, lines
    assert "daemon not answering" in lines[0]
    assert "records were written directly meanwhile" in lines[1]


def test_daemon_restart_under_load_keeps_the_totals_and_warns_twice(start_daemon, app_process):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "restart.log")
    app = app_process(daemon.endpoint, [{"path": path, "kwargs": FAST}])
    app.cmd("load")
    wait_for(lambda: written(daemon, path) > 200, 10, "records through the first daemon")
    daemon.stop()
    daemon.start()
    wait_for(lambda: written(daemon, path) > 200, 15, "records through the new daemon")
    reply = app.cmd("stopload")
    app.cmd("flush")
    final = app.close()
    [client] = final["stats"]
    # The new daemon never saw what the old one was told: the reports carry
    # the client's totals, so its view is the client's whole life.
    [entry] = wait_until_reported(daemon, final)
    assert entry["reported"]["sent"] == client["sent"] > daemon.file_stats(path)["records_received"]
    assert client["fallback_written"] > 0
    check_sequences(read_lines(path), reply["counts"]).assert_complete(allow_duplicates=True)
    lines = app.warnings()
    assert len(lines) == 2 and count(lines, FALLBACK) == 1 and count(lines, BACK) == 1, lines


def test_option_conflict_is_warned_with_the_fix_and_reported(start_daemon, app_process, raw_client):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "shared.log")
    other = raw_client(daemon.endpoint, program="other-app")
    reply = other.write(path, ["declared by another process"], {"maxBytes": 10 * 1024 * 1024, "backupCount": 3})
    assert reply.__class__.__name__ == "Ack", reply
    app = app_process(daemon.endpoint, [{"path": path, "kwargs": {**FAST, "maxBytes": 65536, "backupCount": 3}}])
    app.cmd("log 100")
    assert app.cmd("flush")["stats"][0]["state"] == "fallback"
    final = app.close()
    [entry] = wait_until_reported(daemon, final)
    assert entry["reported"]["fallback"] == 100 and "options_conflict" in entry["last_error"]
    lines = app.warnings()
    assert len(lines) == 1 and count(lines, FALLBACK) == 1, lines
    assert "option conflict" in lines[0] and "same maxBytes" in lines[0]


def test_three_handlers_in_one_process_are_three_clients_summing_to_the_daemon_view(start_daemon, app_process):
    daemon = start_daemon()
    paths = [os.path.join(daemon.log_dir, f"part{i}.log") for i in range(3)]
    app = app_process(daemon.endpoint, [{"path": p, "kwargs": FAST} for p in paths], root=False)
    app.cmd("log 150")
    final = app.close()
    entries = wait_until_reported(daemon, final)
    assert [e["file"] for e in entries] == paths
    assert all(e["state"] == "stopped" and e["closed"] for e in entries)
    # The same through the command line an operator uses.
    out = subprocess.run([sys.executable, "-m", "clh_writerd", "stats", "--json", "--endpoint", daemon.endpoint],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    mine = [c for c in doc["clients"] if c["session"] in final["sessions"]]
    daemon_sent = sum(c["reported"]["sent"] for c in mine)
    assert daemon_sent == sum(s["sent"] for s in final["stats"]) == 450
    assert sum(f["records_written"] for f in doc["files"] if f["path"] in paths) == 450
    assert app.warnings() == []  # nothing went wrong: nothing said


def test_async_handler_reports_its_fallback_and_warns_once(start_daemon, tmp_path, caplog):
    """The asyncio handler drives the same core: the same reports and warnings."""
    import asyncio

    from clh_writerd.client.aio import create_async_concurrent_handler

    caplog.set_level(logging.WARNING, logger=LOGGER_NAME)
    daemon = start_daemon()
    path = str(tmp_path / "outside" / "async.log")
    os.makedirs(os.path.dirname(path))

    async def app() -> Dict[str, Any]:
        handler = create_async_concurrent_handler(path, endpoint=daemon.endpoint, **FAST)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("async-app")
        logger.propagate = False
        logger.addHandler(handler)
        try:
            async with handler:
                for n in range(120):
                    logger.warning("SEQ a %d %s", n, "x" * (n % 37))
                await handler.aflush()
        finally:
            logger.removeHandler(handler)
        return {"stats": [handler.get_stats()], "sessions": [handler._client_id.session]}

    final = asyncio.run(app())
    [entry] = wait_until_reported(daemon, final)
    assert entry["reported"]["fallback"] == 120 and entry["state"] == "stopped" and entry["file"] == path
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
    assert len(warned) == 1 and "forbidden path" in warned[0], warned
    check_sequences(read_lines(path), {"a": 120}).assert_complete()


def test_closed_clients_fold_into_clients_gone_and_their_totals_stay(start_daemon, app_process):
    daemon = start_daemon(daemon={"clients_gone_after": 1.0})
    path = os.path.join(daemon.log_dir, "short-lived.log")
    app = app_process(daemon.endpoint, [{"path": path, "kwargs": FAST}])
    app.cmd("log 40")
    final = app.close()
    [session] = final["sessions"]

    def folded() -> Any:
        doc = daemon.stats()
        return None if any(c["session"] == session for c in doc["clients"]) else doc["clients_gone"]

    [group] = wait_for(folded, 10, "the closed client to be folded into clients_gone")
    assert group["program"] == "monitoring_app.py" and group["file"] == path and group["clients"] == 1
    assert group["reported"] == reported(final["stats"][0]) and group["records_received"] == 40


# -- start-up tells the truth --------------------------------------------------------------
def test_start_line_prints_a_relative_allowed_dir_resolved_against_the_working_directory(start_daemon, tmp_path):
    daemon = start_daemon(daemon={"allowed_dirs": ["logs"]})
    start_line = next(line for line in daemon.stderr().splitlines() if "allowed dirs:" in line)
    assert start_line.endswith(f"allowed dirs: {os.path.realpath(str(tmp_path / 'logs'))}")
