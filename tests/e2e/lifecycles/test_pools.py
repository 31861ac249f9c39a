"""``with multiprocessing.Pool() as pool`` and ProcessPoolExecutor, as apps
write them: the handler is configured when the main module is imported (so
spawned and forkserver workers build their own), each task logs one line.

``Pool.__exit__`` is ``terminate()``: it SIGTERMs the workers, whose queues
still hold records. Without a SIGTERM handler of ours in the workers, 472 and
712 of 3,000 records were lost in two runs of three (plain CLH loses none:
it writes on the caller's thread).
"""

import json
import os
import signal
import textwrap

import pytest

from support import check_sequences, read_lines, wait_for

from clh_writerd.client import _process

from .shapes import run_script

TASKS = 3000

POOL_APP = '''
import concurrent.futures, logging.config, multiprocessing
METHOD, SHAPE, PATH = sys.argv[1], sys.argv[2], sys.argv[3]
# At import: the parent and every spawned or forkserver worker configure
# logging the same way (dictConfig's defaults: existing loggers disabled).
logging.config.dictConfig({
    "version": 1,
    "formatters": {"plain": {"format": "%(message)s"}},
    "handlers": {"file": {"()": "clh_writerd.create_nonblocking_handler", "filename": PATH,
                          "maxBytes": 100000, "backupCount": 100, "formatter": "plain"}},
    "root": {"handlers": ["file"], "level": "INFO"},
})


def task(n):
    logging.getLogger("task").info(seq_record("task", n))
    return os.getpid()


if __name__ == "__main__":
    context = multiprocessing.get_context(METHOD)
    if SHAPE == "pool":
        with context.Pool(4) as pool:
            pids = pool.map(task, range(TASKS), chunksize=10)
    else:
        with concurrent.futures.ProcessPoolExecutor(4, mp_context=context) as executor:
            pids = list(executor.map(task, range(TASKS), chunksize=10))
    print(json.dumps({"workers": len(set(pids))}))
'''.replace("TASKS", str(TASKS))

SHAPES = [("pool", "fork"), ("pool", "spawn"), ("pool", "forkserver"), ("executor", "fork"), ("executor", "spawn")]


@pytest.mark.guarantee
@pytest.mark.parametrize("shape,method", SHAPES, ids=[f"{s}-{m}" for s, m in SHAPES])
def test_every_task_record_is_in_the_file_when_the_pool_exits(tmp_path, daemon, guarantee, shape, method):
    path = os.path.join(daemon.log_dir, "pool.log")
    done = run_script(str(tmp_path), POOL_APP, method, shape, path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr
    assert "exits with records not written" not in done.stderr, done.stderr
    workers = json.loads(done.stdout)["workers"]
    report = check_sequences(read_lines(path), {"task": TASKS})
    what = ("`with Pool(4)` (its exit terminates the workers: SIGTERM)" if shape == "pool"
            else "`with ProcessPoolExecutor(4)`")
    guarantee(f"I. {'Pool' if shape == 'pool' else 'ProcessPoolExecutor'} ({method})",
              f"{what}, {method} start method, handler from dictConfig at import; each of {TASKS:,} tasks logs "
              f"one record ({workers} workers)", report.expected, report.missing_count, report.duplicates)
    report.assert_complete(allow_duplicates=True)


def sigterm_child_app(child_end: str, records: int = 500, prelude: str = "", child_start: str = "") -> str:
    """An app (``prelude`` first) with a live handler that logs one record,
    then forks a child; the child runs ``child_start``, logs ``records``
    records and runs ``child_end`` (which ends it by a SIGTERM, or never).
    The parent prints the child's exit status, or "hung" after 20 s."""
    def child(code: str) -> str:
        return textwrap.indent(textwrap.dedent(code), "    ")
    return f'''
import signal, threading
from clh_writerd import create_nonblocking_handler
from clh_writerd.client import _process, _transport
PATH = sys.argv[1]
{textwrap.dedent(prelude)}
handler = create_nonblocking_handler(PATH)
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("app")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.info(seq_record("parent", 0))
pid = os.fork()
if pid == 0:
{child(child_start)}
    for n in range({records}):
        log.info(seq_record("child", n))
{child(child_end)}
    os._exit(0)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("hung")
    sys.exit(0)
handler.close()
print(os.waitstatus_to_exitcode(status))
'''


# The child sends itself SIGTERM and would sleep on without a handler that ends it.
SIGTERM_SELF = """
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""


def test_the_apps_own_sigterm_handler_still_runs_after_the_drain(tmp_path, daemon):
    """A worker whose app (or a tool: coverage does) handles SIGTERM itself:
    ours drains first, then the app's runs, with its consequences (here an
    exit code of its own), and every record is in the file."""
    path = os.path.join(daemon.log_dir, "own.log")
    done = run_script(str(tmp_path), sigterm_child_app(SIGTERM_SELF, prelude="""
        def own(signum, frame):
            os._exit(3)

        signal.signal(signal.SIGTERM, own)
    """), path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 3
    check_sequences(read_lines(path), {"parent": 1, "child": 500}).assert_complete()


def test_a_tool_handler_that_chains_back_to_ours_still_ends_the_process(tmp_path, daemon):
    """coverage's SIGTERM handler (installed in a multiprocessing child after
    ours) saves, puts back the handler it found (ours) and SIGTERMs again. When
    ours then went to the handler *it* found (coverage's again), the two
    called each other until a RecursionError, which the drain swallowed: the
    worker lived on, blocked on the pool's queue, and ``with Pool()`` waited
    for it for ever (1 run in 10 of the forkserver pool under coverage). Ours
    runs once per process; the next SIGTERM ends the process."""
    path = os.path.join(daemon.log_dir, "chain.log")
    done = run_script(str(tmp_path), sigterm_child_app(SIGTERM_SELF, records=200, child_start="""
        class Tool:  # what coverage's sigterm option does
            def on_sigterm(self, signum, frame):
                signal.signal(signal.SIGTERM, self.old)
                os.kill(os.getpid(), signal.SIGTERM)
        tool = Tool()
        tool.old = signal.signal(signal.SIGTERM, tool.on_sigterm)
        _process._drain_on_sigterm()  # multiprocessing's after-bootstrap hook asks again
    """), path, endpoint=daemon.endpoint, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == -signal.SIGTERM, done.stderr
    check_sequences(read_lines(path), {"parent": 1, "child": 200}).assert_complete()


def test_where_sigterm_is_ignored_ours_is_not_installed():
    """Draining on a SIGTERM the app ignores would stop the handlers of a
    process that goes on. (Checked in this process: under coverage, its fork
    hook installs its own SIGTERM handler in every child, over SIG_IGN.)"""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _process._drain_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_sigterm_of_a_forked_child_still_ends_it_as_sigterm(tmp_path, daemon):
    """After draining, the child ends as SIGTERM would have ended it: its
    parent sees -SIGTERM, and its records are in the file."""
    path = os.path.join(daemon.log_dir, "term.log")
    done = run_script(str(tmp_path), sigterm_child_app(SIGTERM_SELF), path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == -15
    check_sequences(read_lines(path), {"parent": 1, "child": 500}).assert_complete()


def test_a_sigterm_that_sets_only_cpythons_flag_still_drains_and_ends_the_child(tmp_path, daemon):
    """The race behind 1 ``with Pool()`` exit in ~100 hanging for ever: the
    SIGTERM reaches CPython's C handler, which only sets a flag, while the
    main thread sleeps in C (a worker waiting for its next task), so our
    Python handler never runs. Made certain here: another thread takes the
    SIGTERM once the main thread sleeps in ``Lock.acquire()``. The watch
    nudges the main thread (SIGURG): the handler runs, drains, and the child
    ends as SIGTERM ends it. Without the watch the child sleeps for ever."""
    path = os.path.join(daemon.log_dir, "flag.log")
    done = run_script(str(tmp_path), sigterm_child_app('''
        blocked = threading.Lock()
        blocked.acquire()
        main, native = threading.get_ident(), threading.get_native_id()

        def sleeping():  # the main thread is at the acquire below, asleep in the kernel
            frame = sys._current_frames().get(main)
            with open(f"/proc/self/task/{native}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            return frame is not None and frame.f_code.co_name == "<module>" and state == "S"

        def take_sigterm():
            deadline, seen = time.monotonic() + 10, 0
            while seen < 2 and time.monotonic() < deadline:  # twice, this thread sleeping between: not a GIL wait
                time.sleep(0.02)
                seen = seen + 1 if sleeping() else 0
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

        threading.Thread(target=take_sigterm).start()
        blocked.acquire()  # for ever: only a signal handler ends this process
    '''), path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(-signal.SIGTERM), "the child did not end: " + done.stdout + done.stderr
    check_sequences(read_lines(path), {"parent": 1, "child": 500}).assert_complete()


def test_a_sigterm_during_a_drain_acts_once_the_drain_is_done(tmp_path, daemon):
    """A pool worker that leaves by itself drains at its exit, and the pool's
    terminate() may SIGTERM it meanwhile: our handler ran inside that drain,
    started a second one, and waited for ever for a lock the first one held
    (seen at the 8th forkserver pool run once the watch made handlers run
    promptly). Made certain here: the SIGTERM comes while the handler's
    close() holds its sync lane's lock. It now waits for the drain, then
    ends the child as SIGTERM does; every record is in the file."""
    path = os.path.join(daemon.log_dir, "during.log")
    done = run_script(str(tmp_path), sigterm_child_app('''
        drop = _transport.SyncLane._drop

        def drop_with_sigterm(self):  # called with the sync lane's lock held
            _transport.SyncLane._drop = drop
            os.kill(os.getpid(), signal.SIGTERM)
            drop(self)

        _transport.SyncLane._drop = drop_with_sigterm
        handler.close()
    '''), path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(-signal.SIGTERM), "the child did not end as SIGTERM: " + done.stdout + done.stderr
    check_sequences(read_lines(path), {"parent": 1, "child": 500}).assert_complete()


def test_the_workers_of_a_finished_pool_leave_the_daemons_stats(tmp_path, daemon):
    """Pool workers that are gone are no longer listed as clients (they
    stayed "connected" for clients_gone_after, 300 s): 10 s after they were
    last seen their entries fold into clients_gone, totals kept."""
    path = os.path.join(daemon.log_dir, "pool.log")
    done = run_script(str(tmp_path), POOL_APP, "fork", "pool", path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr

    def listed() -> list:
        return [c for c in daemon.stats()["clients"] if c["file"] == path or c["records_received"]]

    wait_for(lambda: not listed(), timeout=20.0, what="the pool's clients to leave the stats")
    gone = [g for g in daemon.stats()["clients_gone"] if g["file"] == path]
    assert sum(g["records_received"] for g in gone) >= TASKS, gone
