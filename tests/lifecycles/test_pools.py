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

import pytest

from support import check_sequences, read_lines, wait_for

from .shapes import run_script

pytestmark = [pytest.mark.e2e]

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


def test_an_app_sigterm_handler_in_the_worker_is_left_alone(tmp_path, daemon):
    """Ours drains only where the app has none: a worker whose app handles
    SIGTERM itself keeps that handler (and its consequences)."""
    path = os.path.join(daemon.log_dir, "own.log")
    done = run_script(str(tmp_path), '''
import multiprocessing, signal
from clh_writerd import create_nonblocking_handler
PATH = sys.argv[1]

def own(signum, frame):
    raise SystemExit(3)

def probe(_):
    return signal.getsignal(signal.SIGTERM).__name__

if __name__ == "__main__":
    handler = create_nonblocking_handler(PATH)
    logging.getLogger().addHandler(handler)
    logging.getLogger().info("parent")
    signal.signal(signal.SIGTERM, own)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        print(pool.map(probe, [0])[0])
''', path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "own"


def test_the_sigterm_of_a_forked_child_still_ends_it_as_sigterm(tmp_path, daemon):
    """After draining, the child ends as SIGTERM would have ended it: its
    parent sees -SIGTERM, and its records are in the file."""
    path = os.path.join(daemon.log_dir, "term.log")
    done = run_script(str(tmp_path), '''
import signal
from clh_writerd import create_nonblocking_handler
PATH = sys.argv[1]
handler = create_nonblocking_handler(PATH)
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("child")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.info(seq_record("parent", 0))
pid = os.fork()
if pid == 0:
    for n in range(500):
        log.info(seq_record("child", n))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
    os._exit(0)
_, status = os.waitpid(pid, 0)
handler.close()
print(os.waitstatus_to_exitcode(status))
''', path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == -15
    check_sequences(read_lines(path), {"parent": 1, "child": 500}).assert_complete()


def test_the_workers_of_a_finished_pool_leave_the_daemons_stats(tmp_path, daemon):
    """Pool workers that are gone are no longer listed as clients (they
    stayed "connected" for clients_gone_after, 300 s): within a few seconds
    their entries fold into clients_gone, totals kept."""
    path = os.path.join(daemon.log_dir, "pool.log")
    done = run_script(str(tmp_path), POOL_APP, "fork", "pool", path, endpoint=daemon.endpoint)
    assert done.returncode == 0, done.stderr

    def listed() -> list:
        return [c for c in daemon.stats()["clients"] if c["file"] == path or c["records_received"]]

    wait_for(lambda: not listed(), timeout=10.0, what="the pool's clients to leave the stats")
    gone = [g for g in daemon.stats()["clients_gone"] if g["file"] == path]
    assert sum(g["records_received"] for g in gone) >= TASKS, gone
