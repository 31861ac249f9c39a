"""The fallback in the shapes where it lost records silently: a log
directory that does not exist yet, one that cannot be created, dictConfig's
default that disabled our logger, a lock another process holds.

Every record is in the file, or counted as lost (``get_stats()['lost']``)
and said on stderr, and the process exits within its drain bound.
"""

import json
import os
import threading
import time

import pytest

from support import check_sequences, hold_clh_lock, read_lines

from .shapes import run_script

RECORDS = 100

# Logs RECORDS records through a handler on PATH, closes it, prints its
# stats and how long close() took. ENDPOINT "none" = no daemon.
LOGGER_APP = '''
PATH, ENDPOINT = sys.argv[1], sys.argv[2]
from clh_writerd import create_nonblocking_handler
handler = create_nonblocking_handler(PATH, endpoint=None if ENDPOINT == "none" else ENDPOINT, drain_timeout=2.0,
                                     connect_timeout=0.2)
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("app")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False
for n in range(RECORDS):
    log.info(seq_record("app", n))
    if n % 10 == 0:
        time.sleep(0.01)
started = time.monotonic()
handler.close()
print(json.dumps({"close": time.monotonic() - started, **handler.get_stats()}))
'''.replace("RECORDS", str(RECORDS))


def unreachable(tmp_path) -> str:
    """An endpoint no daemon listens on (its socket directory does not exist)."""
    return f"ipc://{tmp_path}/no-daemon/w.sock"


@pytest.mark.parametrize("endpoint", ["none", "unreachable"])
def test_a_missing_log_directory_is_created_by_the_fallback(tmp_path, endpoint):
    path = str(tmp_path / "new" / "deeper" / "app.log")
    target = "none" if endpoint == "none" else unreachable(tmp_path)
    done = run_script(str(tmp_path), LOGGER_APP, path, target)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    check_sequences(read_lines(path), {"app": RECORDS}).assert_complete()
    assert stats["lost"] == 0 and stats["fallback_written"] == RECORDS, stats
    assert "could not be written" not in done.stderr


@pytest.mark.parametrize("endpoint", ["none", "unreachable"])
def test_a_directory_that_cannot_be_created_is_a_counted_loud_loss_and_exit_is_prompt(tmp_path, endpoint):
    """A file stands where a directory should: nothing can be written.
    Every record is counted as lost, stderr says so with the reason (the
    error, what to do, and one line at exit), and close() does not wait for
    the drain bound retrying what cannot work."""
    (tmp_path / "blocker").write_text("a file, not a directory")
    path = str(tmp_path / "blocker" / "logs" / "app.log")
    target = "none" if endpoint == "none" else unreachable(tmp_path)
    done = run_script(str(tmp_path), LOGGER_APP, path, target)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["lost"] == RECORDS and stats["dropped_count"] == 0, stats
    assert stats["close"] < 1.5, stats
    err = done.stderr
    assert "records could not be written" in err and "NotADirectoryError" in err, err
    assert f"exits with records not written: {path}: {RECORDS} lost" in err, err


def test_dictconfig_defaults_do_not_hide_the_handlers_warnings(tmp_path):
    """dictConfig's default (disable_existing_loggers) disables our
    ``clh_writerd.client`` logger; its fallback warning still reaches stderr."""
    path = str(tmp_path / "logs" / "app.log")
    done = run_script(str(tmp_path), '''
import logging.config
import clh_writerd  # the client logger exists before dictConfig runs, as in an app that imported it
from clh_writerd.client import _notices
PATH, ENDPOINT = sys.argv[1], sys.argv[2]
logging.config.dictConfig({
    "version": 1,
    "formatters": {"plain": {"format": "%(message)s"}},
    "handlers": {"file": {"()": "clh_writerd.create_nonblocking_handler", "filename": PATH,
                          "endpoint": ENDPOINT, "connect_timeout": 0.2, "formatter": "plain"}},
    "root": {"handlers": ["file"], "level": "INFO"},
})
assert logging.getLogger("clh_writerd.client").disabled
for n in range(20):
    logging.getLogger("app").info(seq_record("app", n))
logging.shutdown()
''', path, unreachable(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "writing through the fallback" in done.stderr and "no daemon" in done.stderr, done.stderr
    check_sequences(read_lines(path), {"app": 20}).assert_complete()


def test_a_lock_held_for_a_while_costs_nothing(tmp_path):
    """Another process holds the file's lock for 2 s while the app logs and
    closes: the records wait and are all written when it lets go."""
    path = str(tmp_path / "app.log")
    open(path, "a").close()
    released = threading.Event()

    def hold() -> None:
        with hold_clh_lock(path):
            released.wait(2.0)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        done = run_script(str(tmp_path), LOGGER_APP.replace("drain_timeout=2.0", "drain_timeout=10.0"), path, "none")
    finally:
        released.set()
        holder.join()
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["lost"] == 0, stats
    check_sequences(read_lines(path), {"app": RECORDS}).assert_complete()


def test_a_lock_held_for_good_is_a_counted_loud_loss_and_close_keeps_its_deadline(tmp_path):
    """Another process never lets go of the lock: close() returns within
    drain_timeout (2 s) and a margin; every record not in the file is
    counted as lost and said on stderr (the lock's holder named)."""
    path = str(tmp_path / "app.log")
    open(path, "a").close()
    released = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with hold_clh_lock(path):
            held.set()
            released.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    started = time.monotonic()
    try:
        done = run_script(str(tmp_path), LOGGER_APP, path, "none")
    finally:
        released.set()
        holder.join()
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    written = check_sequences(read_lines(path), {"app": RECORDS}).found
    assert written + stats["lost"] == RECORDS and stats["lost"] > 0, stats
    assert stats["close"] < 2.0 + 1.5, stats
    assert time.monotonic() - started < 15
    assert "was held by another process" in done.stderr and "fuser" in done.stderr, done.stderr


class_json_formatter = '''
class JsonFormatter(logging.Formatter):
    """A formatter of the kind apps write: it reads exc_info itself."""

    def format(self, record):
        out = {"msg": record.getMessage()}
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__
            out["trace"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out)
'''


@pytest.mark.parametrize("where", ["daemon", "embedded"])
def test_a_custom_formatter_gets_the_records_exc_info(tmp_path, start_daemon, where):
    endpoint = "none"
    log_dir = str(tmp_path / "logs")
    if where == "daemon":
        daemon = start_daemon()
        endpoint, log_dir = daemon.endpoint, daemon.log_dir
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "json.log")
    done = run_script(str(tmp_path), class_json_formatter + '''
PATH, ENDPOINT = sys.argv[1], sys.argv[2]
from clh_writerd import create_nonblocking_handler
handler = create_nonblocking_handler(PATH, endpoint=None if ENDPOINT == "none" else ENDPOINT)
handler.setFormatter(JsonFormatter())
log = logging.getLogger("app")
log.addHandler(handler)
try:
    {}["missing"]
except KeyError:
    log.warning("queued with a traceback", exc_info=True)
    log.error("sync with a traceback", exc_info=True)
handler.close()
''', path, endpoint)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in read_lines(path)]
    assert [line["msg"] for line in lines] == ["queued with a traceback", "sync with a traceback"]
    assert all(line["exc_type"] == "KeyError" and "missing" in line["trace"] for line in lines), lines
