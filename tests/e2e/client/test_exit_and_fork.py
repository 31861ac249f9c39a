"""Interpreter exit and fork, in real child processes.

Each test writes a small script to tmp_path and runs it with this
interpreter. The script logs sequence records through
NonBlockingConcurrentHandler (to a real daemon, to a stopped daemon, or with
endpoint=None); the test then checks the file with the oracle.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Dict, List, Optional, Tuple

import pytest
from support import check_sequences, read_lines

RECORDS = 10000
# With the daemon stopped, exit waits for acks until drain_timeout, then writes
# through the fallback. Elsewhere the drain gets a generous limit: it only
# takes as long as the writing does.
DRAIN_TIMEOUT = 3.0
# Interpreter teardown after the drain, on a loaded 2-core machine.
EXIT_MARGIN = 4.0
CHILD_TIMEOUT = 60.0

COMMON = '''
import json, logging, os, sys, threading, time
from clh_writerd import create_nonblocking_handler

PATH, ENDPOINT = sys.argv[1], (None if sys.argv[2] == "none" else sys.argv[2])
MODE = sys.argv[3] if len(sys.argv) > 3 else ""


def seq_record(writer, n, payload=""):
    return f"SEQ {writer} {n} {payload or 'x' * (n % 37)}"


def setup_logging():
    """Builds this process's handler (also a Pool initializer)."""
    drain = float(os.environ.get("TEST_DRAIN_TIMEOUT", "30"))
    handler = create_nonblocking_handler(PATH, endpoint=ENDPOINT, drain_timeout=drain, connect_timeout=5.0)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    if ENDPOINT is not None:
        deadline = time.monotonic() + 30
        while handler.get_stats()["state"] != "daemon":
            assert time.monotonic() < deadline, handler.get_stats()
            time.sleep(0.01)
    return handler
'''

EXIT_SCRIPT = COMMON + '''
handler = setup_logging()
log = logging.getLogger("exit")
print("ready", flush=True)
sys.stdin.readline()  # the test may stop the daemon before saying go


def emit_all(writer):
    for n in range(@RECORDS@):
        log.info(seq_record(writer, n))


if MODE == "normal":
    emit_all("main")
elif MODE == "exception":
    emit_all("main")
    raise RuntimeError("unhandled in the main thread")
elif MODE == "thread-exit":
    def worker():
        emit_all("worker")
        sys.exit(3)  # ends only this thread; the interpreter exits when main is done

    threading.Thread(target=worker).start()
    # main returns at once, while the worker is still logging
else:
    raise SystemExit(f"unknown mode {MODE}")
'''.replace("@RECORDS@", str(RECORDS))


def _write_script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _target(kind: str, start_daemon, tmp_path) -> Tuple[str, str, Optional[object]]:
    """(log path, endpoint argument, daemon or None): a daemon's file, or embedded."""
    if kind == "embedded":
        path = tmp_path / "logs" / "app.log"
        path.parent.mkdir(exist_ok=True)
        return str(path), "none", None
    daemon = start_daemon()
    os.makedirs(daemon.log_dir, exist_ok=True)
    return os.path.join(daemon.log_dir, "app.log"), daemon.endpoint, daemon


@pytest.fixture(params=["daemon", "stopped-daemon", "embedded"])
def exit_target(request, start_daemon, tmp_path):
    path, endpoint, daemon = _target(request.param, start_daemon, tmp_path)
    return request.param, path, endpoint, daemon


@pytest.mark.parametrize("mode", ["normal", "exception", "thread-exit"])
def test_every_queued_record_is_written_at_interpreter_exit(tmp_path, exit_target, mode):
    kind, path, endpoint, daemon = exit_target
    script = _write_script(tmp_path, "exit_child.py", EXIT_SCRIPT)
    env = dict(os.environ, TEST_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT if kind == "stopped-daemon" else 30.0))
    child = subprocess.Popen([sys.executable, script, path, endpoint, mode], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready", child.communicate(timeout=CHILD_TIMEOUT)
        if kind == "stopped-daemon":
            daemon.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        _, stderr = child.communicate("go\n", timeout=CHILD_TIMEOUT)
        took = time.monotonic() - started
        # Read before the daemon may run again: the child alone put them there.
        lines = read_lines(path)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGCONT)
        if child.poll() is None:
            child.kill()
            child.wait()

    expected_rc = {"normal": 0, "exception": 1, "thread-exit": 0}[mode]
    assert child.returncode == expected_rc, stderr
    if mode == "exception":
        assert "RuntimeError: unhandled in the main thread" in stderr
    else:
        assert "Traceback" not in stderr, stderr
    writer = "worker" if mode == "thread-exit" else "main"
    check_sequences(lines, {writer: RECORDS}).assert_complete()
    if kind == "stopped-daemon":
        # The drain waited for acks at most until drain_timeout, then wrote
        # everything through the fallback: exit is bounded.
        assert took < DRAIN_TIMEOUT + EXIT_MARGIN, f"exit took {took:.1f}s"


# -- fork ----------------------------------------------------------------------
FORK_SCRIPT = COMMON + '''
handler = setup_logging()
log = logging.getLogger("fork")
for n in range(1000):
    log.info(seq_record("parent", n))
before = handler.get_stats()
pid = os.fork()
if pid == 0:
    for n in range(5000):
        log.info(seq_record("child", n))
    handler.flush()
    stats = handler.get_stats()
    print(json.dumps({"who": "child", "pid": os.getpid(), "session": handler._client_id.session,
                      "state": stats["state"], "enqueued": stats["enqueued"]}), flush=True)
    for n in range(5000, 10000):
        log.info(seq_record("child", n))
    sys.exit(0)  # interpreter exit in the child: atexit drains the child's queue
for n in range(1000, 10000):
    log.info(seq_record("parent", n))
_, status = os.waitpid(pid, 0)
handler.flush()
stats = handler.get_stats()
print(json.dumps({"who": "parent", "pid": os.getpid(), "session": handler._client_id.session,
                  "state": stats["state"], "enqueued": stats["enqueued"], "before": before["enqueued"],
                  "child_status": status}), flush=True)
'''


@pytest.fixture(params=["daemon", "embedded"])
def target(request, start_daemon, tmp_path):
    return _target(request.param, start_daemon, tmp_path)


def _run(args: List[str], timeout: float = CHILD_TIMEOUT) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_handler_created_before_fork_works_in_parent_and_child(tmp_path, target):
    path, endpoint, daemon = target
    script = _write_script(tmp_path, "fork_child.py", FORK_SCRIPT)
    done = _run([sys.executable, script, path, endpoint])
    reports: Dict[str, dict] = {r["who"]: r for r in map(json.loads, done.stdout.splitlines())}
    parent, child = reports["parent"], reports["child"]

    check_sequences(read_lines(path), {"parent": 10000, "child": 10000}).assert_complete()
    assert parent["child_status"] == 0
    # The parent is unaffected: its counters hold only its own records.
    assert parent["enqueued"] == 10000 and parent["before"] == 1000
    # The child got fresh per-process state: its own counters and identity.
    assert child["enqueued"] == 5000
    assert child["pid"] != parent["pid"] and child["session"] != parent["session"]
    if daemon is not None:
        assert parent["state"] == child["state"] == "daemon"
        sessions = {c["session"]: c for c in daemon.stats()["clients"]}
        assert sessions[child["session"]]["pid"] == child["pid"]
        assert sessions[parent["session"]]["records_received"] >= 10000
        assert sessions[child["session"]]["records_received"] >= 5000
    else:
        assert parent["state"] == child["state"] == "embedded"


# -- multiprocessing ---------------------------------------------------------
MP_SCRIPT = COMMON + '''
import multiprocessing

PER_WORKER = 5000


def work(name):
    if multiprocessing.get_start_method() == "spawn":
        setup_logging()  # a spawned child starts without the parent's logging setup
    log = logging.getLogger("mp")
    for n in range(PER_WORKER):
        log.info(seq_record(name, n))
    return os.getpid()


def task(i):
    # Pool workers were set up by the initializer, whatever the start method.
    log = logging.getLogger("mp")
    for n in range(PER_WORKER):
        log.info(seq_record(f"t{i}", n))
    return os.getpid()


if __name__ == "__main__":
    method = sys.argv[4]
    multiprocessing.set_start_method(method)
    setup_logging()
    log = logging.getLogger("mp")
    for n in range(1000):
        log.info(seq_record("main", n))
    if MODE == "process":
        procs = [multiprocessing.Process(target=work, args=(f"p{i}",)) for i in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert [p.exitcode for p in procs] == [0, 0, 0], [p.exitcode for p in procs]
        pids = [p.pid for p in procs]
    else:
        pool = multiprocessing.Pool(processes=3, initializer=setup_logging)
        pids = pool.map(task, range(6), chunksize=1)
        pool.close()
        pool.join()
    print(json.dumps({"pids": sorted(set(pids)), "main": os.getpid()}))
'''


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("mode", ["process", "pool"])
def test_multiprocessing_children_write_every_record(tmp_path, target, method, mode):
    path, endpoint, daemon = target
    script = _write_script(tmp_path, "mp_child.py", MP_SCRIPT)
    done = _run([sys.executable, script, path, endpoint, mode, method])
    info = json.loads(done.stdout.splitlines()[-1])
    assert info["main"] not in info["pids"]
    if mode == "process":
        expected = {"main": 1000, "p0": 5000, "p1": 5000, "p2": 5000}
    else:
        expected = {"main": 1000, **{f"t{i}": 5000 for i in range(6)}}
    check_sequences(read_lines(path), expected).assert_complete()
    if daemon is not None:
        # Every child spoke to the daemon itself: one client each, listed, or
        # folded into clients_gone once its process has gone.
        stats = daemon.stats()
        clients = len([c for c in stats["clients"] if c["program"] == "mp_child.py"])
        clients += sum(g["clients"] for g in stats["clients_gone"] if g["program"] == "mp_child.py")
        assert clients >= len(set(info["pids"])) + 1, stats


FORK_STORM_SCRIPT = COMMON + '''
handler = setup_logging()
log = logging.getLogger("storm")
BIG = "y" * 4000  # long lines: the sender spends its time inside write()
children, n = [], 0
for i in range(int(MODE)):
    for _ in range(300):
        log.info(seq_record("parent", n, BIG))
        n += 1
    pid = os.fork()  # while the sender is busy writing what was just queued
    if pid == 0:
        for k in range(200):
            log.info(seq_record(f"c{i}", k))
        # A child whose inherited stream is broken never finishes this.
        os._exit(0 if handler.wait_flushed(10.0) else 7)
    children.append(pid)
codes = [os.waitpid(pid, 0)[1] >> 8 for pid in children]  # exit codes (3.8: no waitstatus_to_exitcode)
print(json.dumps({"codes": codes, "parent": n}), flush=True)
'''


def test_fork_in_the_middle_of_writes_leaves_the_child_a_working_handler(tmp_path):
    """Forks while the sender thread is writing: the child must not inherit a
    file object caught mid-write (its writes would fail or block forever)."""
    path = tmp_path / "logs" / "storm.log"
    path.parent.mkdir()
    forks = 40
    script = _write_script(tmp_path, "fork_storm.py", FORK_STORM_SCRIPT)
    done = _run([sys.executable, script, str(path), "none", str(forks)])
    out = {}
    for line in done.stdout.splitlines():
        out.update(json.loads(line))
    assert out["codes"] == [0] * forks
    expected = {"parent": out["parent"], **{f"c{i}": 200 for i in range(forks)}}
    check_sequences(read_lines(str(path)), expected).assert_complete()
