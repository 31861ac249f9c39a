"""A rolling redeploy changes a file's rotation: the new processes declare
other maxBytes/backupCount than the old ones. While an old process runs, the
daemon keeps the old options and the new process writes through its
fallback, warned with both sets; once every old process has exited, the next
declaration wins (before: the new processes ran in the fallback until the
daemon restarted or the file idled for 300 s)."""

import json
import os
import subprocess
import sys


from support import check_sequences, read_lines, wait_for

from .shapes import app_env, run_script, write_app

# Logs RECORDS records as WRITER with maxBytes MAX, then (if told) waits for
# a line on stdin before closing; prints its stats.
APP = '''
PATH, WRITER, MAX, WAIT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "wait"
from clh_writerd import create_nonblocking_handler
handler = create_nonblocking_handler(PATH, maxBytes=MAX, backupCount=20, connect_timeout=5.0)
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("app")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False
for n in range(200):
    log.info(seq_record(WRITER, n))
handler.flush()
print(json.dumps(handler.get_stats()), flush=True)
if WAIT:
    sys.stdin.readline()
handler.close()
'''


def test_the_next_declaration_wins_once_every_old_process_has_exited(tmp_path, daemon):
    path = os.path.join(daemon.log_dir, "app.log")
    script = write_app(str(tmp_path), APP)
    old = subprocess.Popen([sys.executable, script, path, "old", "100000", "wait"], env=app_env(daemon.endpoint),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        old_stats = json.loads(old.stdout.readline())
        assert old_stats["acked"] == 200, old_stats
        # A new process while the old one runs: refused, warned with both sets, written by its fallback.
        new = run_script(str(tmp_path), APP, path, "new1", "200000", "no", endpoint=daemon.endpoint, name="new.py")
        assert new.returncode == 0, new.stderr
        stats = json.loads(new.stdout.splitlines()[-1])
        assert stats["fallback_written"] == 200 and stats["acked"] == 0, stats
        assert "option conflict" in new.stderr and "'maxBytes': 100000" in new.stderr, new.stderr
        assert "'maxBytes': 200000" in new.stderr and f"processes still running ({old.pid})" in new.stderr
    finally:
        old.communicate("\n", timeout=30)
    assert old.returncode == 0
    # Every old process has exited: the next declaration is served, with its options.
    later = run_script(str(tmp_path), APP, path, "new2", "200000", "no", endpoint=daemon.endpoint, name="new.py")
    assert later.returncode == 0, later.stderr
    stats = json.loads(later.stdout.splitlines()[-1])
    assert stats["acked"] == 200 and stats["fallback_written"] == 0, (stats, later.stderr)
    wait_for(lambda: daemon.file_stats(path)["options"]["maxBytes"] == 200000, what="the new options to be served")
    assert daemon.stats()["daemon"]["counters"]["option_changes"] == 1
    check_sequences(read_lines(path), {"old": 200, "new1": 200, "new2": 200}).assert_complete()
