"""A sender thread that stops making progress (here: a formatter that blocks
on it, standing in for an inherited lock or a bug) must not cost records:
after STALL_SECONDS new records are written by the threads that log them,
with a warning, and close() takes over what the sender still holds."""

import json


from support import check_sequences, read_lines

from .shapes import run_script

STUCK_APP = '''
import threading
PATH = sys.argv[1]
from clh_writerd import create_nonblocking_handler
release = threading.Event()


class Blocking(logging.Formatter):
    """Blocks the sender thread on one record until released."""

    def format(self, record):
        if record.getMessage() == "BLOCK" and threading.current_thread().name.startswith("clh-writerd"):
            release.wait(60)
        return super().format(record)


handler = create_nonblocking_handler(PATH, endpoint=None, drain_timeout=1.0)
handler.setFormatter(Blocking("%(message)s"))
log = logging.getLogger("app")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False
log.info("BLOCK")
for n in range(150):
    log.info(seq_record("app", n))
    time.sleep(0.02)  # 3 s in all: the sender is stuck for all of it
started = time.monotonic()
handler.close()
took = time.monotonic() - started
release.set()
print(json.dumps({"close": took, **handler.get_stats()}))
'''


def test_a_stuck_sender_costs_no_record(tmp_path):
    path = str(tmp_path / "app.log")
    done = run_script(str(tmp_path), STUCK_APP, path)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    report = check_sequences([line for line in read_lines(path) if line != "BLOCK"], {"app": 150})
    report.assert_complete()
    assert stats["lost"] == 0, stats
    # Written by the logging thread once the sender was stuck for 2 s, and
    # the rest by close() taking over (within drain_timeout + its margins).
    assert stats["fallback_count"] > 0 and stats["close"] < 1.0 + 0.5 + 1.5, stats
    assert "the sender made no progress for 2s with records waiting" in done.stderr, done.stderr
    assert "the stopping thread wrote its records" in done.stderr, done.stderr
