"""The asyncio handler's shutdown with a slow or stuck disk (embedded mode).

Each scenario runs ``asyncio.run`` in a child process bounded by a deadline:
a hang is a failed test, not a stuck suite.
"""

import subprocess
import sys

from support import check_sequences, read_lines

CHILD_TIMEOUT = 20.0

COMMON = '''
import asyncio, json, logging, sys, threading, time
from concurrent_log_handler import ConcurrentRotatingFileHandler
from clh_writerd import AsyncConcurrentHandler

PATH, COUNT = sys.argv[1], int(sys.argv[2])


def seq_record(writer, n):
    return f"SEQ {writer} {n} {'x' * (n % 37)}"


def start(clh, **options):
    handler = AsyncConcurrentHandler(clh, endpoint=None, queue_size=COUNT, **options)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("shutdown")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler, log
'''

# A write hangs in the executor (a stuck disk) when aclose() gives up waiting
# for it: the handler must not close the file under that write. It did: CLH's
# close() dropped the lock file the writer held, the writer's unlock then
# skipped releasing CLH's thread lock, and every later write of the process
# (the cancelled sender's salvage, here inside asyncio.run) waited forever.
STUCK_WRITE = COMMON + '''
entered, gate = threading.Event(), threading.Event()


class StuckCLH(ConcurrentRotatingFileHandler):
    def do_write(self, msg):
        entered.set()
        gate.wait(30)  # stuck until the scenario lets it go
        super().do_write(msg)


handler, log = start(StuckCLH(PATH))


async def main():
    for n in range(COUNT):
        log.info(seq_record("loop", n))
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
    await handler.aclose(timeout=0.1)  # gives up on the stuck write, cancels the sender
    gate.set()
    return handler.get_stats()


stats = asyncio.run(main())  # cancels what is left; the sender writes the rest
print(json.dumps(stats), flush=True)
'''

# A slow disk (50 ms per write): the drain renders while a write is in the
# executor, so each write takes what was rendered meanwhile. One slice per
# write made 20,000 records need ~130 writes (6.5 s, past drain_timeout).
SLOW_DISK = COMMON + '''
class SlowCLH(ConcurrentRotatingFileHandler):
    def do_write(self, msg):
        time.sleep(0.05)
        super().do_write(msg)


handler, log = start(SlowCLH(PATH), drain_timeout=5.0)


async def main():
    for n in range(COUNT):
        log.info(seq_record("loop", n))
    started = time.monotonic()
    drained = await handler.astop()
    elapsed = time.monotonic() - started
    await handler.aclose()
    return {"drained": drained, "seconds": elapsed, **handler.get_stats()}


print(json.dumps(asyncio.run(main())), flush=True)
'''


def run_child(tmp_path, script: str, count: int) -> subprocess.CompletedProcess:
    path = str(tmp_path / "app.log")
    child = tmp_path / "child.py"
    child.write_text(script)
    done = subprocess.run([sys.executable, str(child), path, str(count)], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    check_sequences(read_lines(path), {"loop": count}).assert_complete()
    return done


def test_close_past_the_deadline_with_a_write_stuck_in_the_executor_loses_nothing_and_ends(tmp_path):
    run_child(tmp_path, STUCK_WRITE, 2000)


def test_slow_disk_drains_within_drain_timeout(tmp_path):
    import json

    done = run_child(tmp_path, SLOW_DISK, 20000)
    result = json.loads(done.stdout)
    assert result["drained"], result
    assert result["seconds"] < 5.0, result
