"""fork() while our threads are busy, as gunicorn --preload, multiprocessing
and hand-written pre-fork servers do.

A child inherits every lock as it was at the moment of fork(), held by
threads that do not exist in the child. Our sender thread imported a module
lazily (zmq.utils.monitor, on its first step): a child forked during that
import waited for the module lock for ever, its sender wrote nothing, and
its records were lost at exit. Two proofs: no thread of ours imports at all,
whatever happens to the daemon; and a storm of forks from a busy parent,
through a daemon restart, loses nothing.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from support import check_sequences, read_lines, wait_for

from .shapes import app_env, write_app

# The app of the import test: logs steadily, a sync record now and then,
# through a daemon SIGKILL and restart driven by the test (files say when).
IMPORTS_APP = '''
import asyncio, threading
KIND, PATH, WORKDIR = sys.argv[1], sys.argv[2], sys.argv[3]
imports, recording = [], []

def hook(event, args):
    if event != "import":
        return
    thread = threading.current_thread().name
    if thread.startswith("clh-writerd") or recording:
        imports.append(f"{args[0]} (thread {thread})")

sys.addaudithook(hook)
import clh_writerd
if KIND == "thread":
    handler = clh_writerd.create_nonblocking_handler(PATH, maxBytes=20000, backupCount=50, monitor_interval=0.2,
                                                      connect_timeout=0.2, max_probe_interval=0.2)
else:
    handler = clh_writerd.create_async_concurrent_handler(PATH, maxBytes=20000, backupCount=50, monitor_interval=0.2,
                                                          connect_timeout=0.2, max_probe_interval=0.2,
                                                          sync_level=logging.ERROR)
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("app")
log.addHandler(handler)
log.setLevel(logging.INFO)
states = []

def step(n):
    log.log(logging.ERROR if n % 50 == 0 else logging.INFO, seq_record(KIND, n))
    state = handler.get_stats()["state"]
    if not states or states[-1] != state:
        states.append(state)
        with open(os.path.join(WORKDIR, "state"), "w") as f:
            f.write(state)

def ready(n):
    if n == 200:  # warmed up: from now on any import, on any thread, is recorded
        recording.append(True)
        open(os.path.join(WORKDIR, "ready"), "w").close()
    return os.path.exists(os.path.join(WORKDIR, "done"))

async def main():
    n = 0
    while not ready(n) and n < 100000:
        step(n)
        n += 1
        await asyncio.sleep(0.002)
    await handler.aclose()
    return n

if KIND == "thread":
    n = 0
    while not ready(n) and n < 100000:
        step(n)
        n += 1
        time.sleep(0.002)
    handler.close()
else:
    n = asyncio.run(main())
print(json.dumps({"records": n, "imports": imports, "states": states}))
'''


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_no_thread_of_ours_imports_through_daemon_loss_and_return(tmp_path, daemon, kind):
    """From the first record on, no import on a thread of ours; after the
    warm-up, none on any thread: through sync records, a daemon SIGKILL
    (fallback), its restart (back on the daemon) and close()."""
    path = os.path.join(daemon.log_dir, "app.log")
    script = write_app(str(tmp_path), IMPORTS_APP)
    proc = subprocess.Popen([sys.executable, script, kind, path, str(tmp_path)],
                                          env=app_env(daemon.endpoint), stdout=-1, stderr=-1, text=True)
    try:
        state = tmp_path / "state"
        wait_for(lambda: (tmp_path / "ready").exists() and state.read_text() == "daemon", what="the app to warm up")
        daemon.kill()
        wait_for(lambda: state.read_text() == "fallback", what="the app to fall back")
        daemon.start()
        wait_for(lambda: state.read_text() == "daemon", what="the app to come back to the daemon")
        (tmp_path / "done").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["imports"] == [], result["imports"]
    assert {"daemon", "fallback"} <= set(result["states"]), result["states"]
    report = check_sequences(read_lines(path), {kind: result["records"]})
    report.assert_complete(allow_duplicates=True)


# The parent of a fork storm: forks right after building its handler (while
# its sender makes its first steps), while a thread of it logs flat out and
# the daemon goes away and comes back; each child logs CHILD_RECORDS and
# leaves through sys.exit (atexit drains its handler).
STORM_APP = '''
import threading
PATH, TAG, FORKS, PROGRESS = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
from clh_writerd import create_nonblocking_handler
handler = create_nonblocking_handler(PATH, maxBytes=200000, backupCount=500, connect_timeout=0.2,
                                     max_probe_interval=0.2, drain_timeout=10.0)
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("storm")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False
stop = threading.Event()
chatted = []

def chatter():
    n = 0
    while not stop.is_set():
        log.info(seq_record(TAG + "-parent", n))
        n += 1
        if n % 10 == 0:
            time.sleep(0.001)
    chatted.append(n)

threading.Thread(target=chatter).start()
children = []
for i in range(FORKS):
    pid = os.fork()
    if pid == 0:
        for j in range(3):
            log.info(seq_record(f"{TAG}-c{i}", j))
        sys.exit(0)
    children.append(pid)
    if i % 10 == 0:
        with open(PROGRESS, "w") as f:
            f.write(str(i))
    if i >= 20:  # the first ones at once: while the sender makes its first steps
        time.sleep(0.002)
slow, codes = [], []
for pid in children:
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
            break
        if time.monotonic() > deadline:
            slow.append(pid)
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
stop.set()
while not chatted:
    time.sleep(0.01)
handler.close()
print(json.dumps({"parent": chatted[0], "slow": slow, "codes": sorted(set(codes))}))
'''

STORM_PARENTS = 5
FORKS = 60
CHILD_RECORDS = 3


@pytest.mark.guarantee
def test_fork_storm_from_a_busy_parent_through_a_daemon_restart_loses_nothing(tmp_path, daemon, guarantee):
    """5 parents, each forking 60 children right after building its handler
    while a thread of it logs; the daemon is SIGKILLed and restarted during
    the second parent's storm. Every child exits in time and every record of
    every process is in the files. (Before the sender was parked across fork
    and stopped importing lazily, the first children of most parents wrote
    nothing: this failed 5 runs of 5.)"""
    path = os.path.join(daemon.log_dir, "storm.log")
    expected = {}
    started = time.monotonic()
    for p in range(STORM_PARENTS):
        tag = f"p{p}"
        progress = str(tmp_path / f"progress{p}")
        script = write_app(str(tmp_path), STORM_APP, name=f"storm{p}.py")
        proc = subprocess.Popen([sys.executable, script, path, tag, str(FORKS), progress],
                                              env=app_env(daemon.endpoint), stdout=-1, stderr=-1, text=True)
        try:
            if p == 1:
                wait_for(lambda at=progress: os.path.exists(at) and int(open(at).read() or 0) >= 30,
                         what="the storm to get going")
                daemon.kill()
                daemon.start()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["slow"] == [] and result["codes"] == [0], result
        expected[f"{tag}-parent"] = result["parent"]
        expected.update({f"{tag}-c{i}": CHILD_RECORDS for i in range(FORKS)})
    report = check_sequences(read_lines(path), expected)
    guarantee("H. Fork storm", f"{STORM_PARENTS} parents x {FORKS} fork()s each, right after the handler is built, "
              f"while a thread of the parent logs flat out; daemon SIGKILLed and restarted mid-storm "
              f"({time.monotonic() - started:.0f} s)", report.expected, report.missing_count, report.duplicates)
    report.assert_complete(allow_duplicates=True)
