"""NonBlockingConcurrentHandler as a user sees it: counters, lifecycle, flush,
queue overflow policies, sync records, identical bytes whichever path a record
took, and what the daemon learns about the client.

Every test runs a real ``clh-writerd`` subprocess where a daemon is involved;
the handler runs in the test process, and the file is checked with the
sequence oracle. Embedded mode alone: tests/unit/client/test_nonblocking.py.
"""

import logging
import os
import signal
import sys
from typing import Any, Dict, List, Optional

import pytest
from concurrent_log_handler import ConcurrentRotatingFileHandler
from support import check_sequences, read_lines, seq_record, short_socket_dir, wait_for
from support.handlers import GATE, sender_held
from support.handlers import quiet_logger as _logger
from support.handlers import wait_state as _wait_state

from clh_writerd import NonBlockingConcurrentHandler

STATS_KEYS = {
    "queue_depth", "capacity", "enqueued", "sent", "acked", "dropped_count", "fallback_count",
    "sync_count", "sync_timeouts", "resent", "state", "last_error",
}
DROP_WARNING = "records dropped so far"


def _dead_endpoint() -> str:
    """An ipc endpoint nobody listens on."""
    return f"ipc://{short_socket_dir()}/nobody.sock"


# -- get_stats -----------------------------------------------------------------
def test_get_stats_has_every_key_and_counts_a_run_through_the_daemon(start_daemon, make_handler):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "stats.log")
    handler = make_handler(path, daemon.endpoint, queue_size=5000)
    stats = handler.get_stats()
    assert STATS_KEYS <= set(stats), STATS_KEYS - set(stats)
    _wait_state(handler, "daemon")

    logger = _logger(handler)
    for n in range(2000):
        logger.info(seq_record("w", n))
    logger.error(seq_record("sync", 0))
    handler.flush()

    stats = handler.get_stats()
    assert stats["capacity"] == 5000
    assert stats["queue_depth"] == 0
    assert stats["enqueued"] == 2000
    # 2001 when the sync record travelled behind records still queued (sync_order).
    assert stats["sent"] == stats["acked"] in (2000, 2001)
    assert stats["sync_count"] == 1
    assert stats["dropped_count"] == stats["fallback_count"] == stats["resent"] == 0
    assert stats["sync_timeouts"] == 0
    assert stats["state"] == "daemon"
    assert stats["last_error"] == ""
    report = check_sequences(read_lines(path), {"w": 2000, "sync": 1})
    report.assert_complete()


# -- flush -------------------------------------------------------------------
@pytest.mark.parametrize("with_daemon", [True, False], ids=["daemon", "embedded"])
def test_flush_returns_when_everything_queued_before_it_is_in_the_file(
        start_daemon, tmp_path, make_handler, with_daemon):
    if with_daemon:
        daemon = start_daemon()
        path, endpoint = os.path.join(daemon.log_dir, "flush.log"), daemon.endpoint
    else:
        path, endpoint = str(tmp_path / "flush.log"), None
    # A long linger: without flush() a partial batch would sit for 10 s.
    handler = make_handler(path, endpoint, linger=10.0, batch_size=100000)
    if with_daemon:
        _wait_state(handler, "daemon")
    logger = _logger(handler)
    total = 0
    for round_ in range(3):
        for _ in range(1000 + round_ * 7):
            logger.info(seq_record("w", total))
            total += 1
        handler.flush()
        # Checked straight away: no waiting after flush().
        check_sequences(read_lines(path), {"w": total}).assert_complete()
    assert handler.get_stats()["state"] == ("daemon" if with_daemon else "embedded")


# -- queue overflow ----------------------------------------------------------
def _unique(lines: List[str], writer: str) -> int:
    return len({line for line in lines if line.startswith(f"SEQ {writer} ")})


@pytest.fixture(params=["daemon", "embedded"])
def target(request, start_daemon, tmp_path):
    """(path, endpoint) of a file written through a daemon or embedded."""
    if request.param == "daemon":
        daemon = start_daemon()
        return os.path.join(daemon.log_dir, "t.log"), daemon.endpoint
    return str(tmp_path / "t.log"), None


def _started(handler: NonBlockingConcurrentHandler) -> logging.Logger:
    if handler.endpoint is not None:
        _wait_state(handler, "daemon")
    return _logger(handler)


def test_queue_full_with_fallback_writes_the_record_synchronously(target, make_handler):
    path, endpoint = target
    handler = make_handler(path, endpoint, queue_size=10, fallback_on_full=True)
    logger = _started(handler)
    total = 3000
    with sender_held(handler, logger):
        for n in range(total):
            logger.info(seq_record("w", n))
        # Written before emit() returned, while the sender is still held.
        assert _unique(read_lines(path), "w") == total - 10
    handler.flush()
    stats = handler.get_stats()
    assert stats["fallback_count"] == total - 10
    assert stats["dropped_count"] == 0
    assert stats["enqueued"] == 10 + 1  # the gate record and the ten that fit
    lines = read_lines(path)
    check_sequences(lines, {"w": total, "gate": 1}).assert_complete()
    assert _unique(lines, "w") == stats["enqueued"] - 1 + stats["fallback_count"]
    assert not [line for line in lines if DROP_WARNING in line]


def test_queue_full_without_fallback_drops_counts_and_warns_every_1000(target, make_handler):
    path, endpoint = target
    handler = make_handler(path, endpoint, queue_size=10, fallback_on_full=False)
    logger = _started(handler)
    total = 2600
    with sender_held(handler, logger):
        for n in range(total):
            logger.info(seq_record("w", n))
    handler.flush()
    stats = handler.get_stats()
    lines = read_lines(path)
    written = _unique(lines, "w")
    assert written == stats["enqueued"] - 1 == 10  # minus the gate record
    assert stats["dropped_count"] == total - written
    assert stats["fallback_count"] == 0
    warnings = [line for line in lines if DROP_WARNING in line]
    assert len(warnings) == stats["dropped_count"] // 1000 == 2, warnings
    assert "queue full, 1000 records dropped" in warnings[0]
    assert "queue full, 2000 records dropped" in warnings[1]
    report = check_sequences(lines, {"w": total, "gate": 1})
    assert report.missing_count == stats["dropped_count"]
    assert report.missing["w"] == list(range(10, total))  # the first ten fit, the rest did not
    assert len(report.torn) == 2  # the two warning lines, nothing else


@pytest.mark.parametrize("stopped", [False, True], ids=["daemon-up", "daemon-stopped"])
def test_sync_level_records_are_never_dropped_and_are_in_the_file_on_return(
        start_daemon, make_handler, stopped):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "sync.log")
    handler = make_handler(path, daemon.endpoint, queue_size=10, fallback_on_full=False,
                           connect_timeout=0.2, sync_timeout=0.5)
    logger = _started(handler)
    errors = 5
    with sender_held(handler, logger):
        if stopped:
            daemon.send_signal(signal.SIGSTOP)
        try:
            for n in range(1000):
                logger.info(seq_record("w", n))
                if n % 200 == 199:
                    k = n // 200
                    (logger.error if k % 2 else logger.critical)(seq_record("err", k))
                    # In the file when emit() returns, whether the daemon answers or not.
                    assert check_sequences(read_lines(path), {"err": k + 1}).missing_count == 0
        finally:
            daemon.send_signal(signal.SIGCONT)
    handler.flush()
    stats = handler.get_stats()
    assert stats["dropped_count"] == 1000 - 10  # the queue really was full
    assert stats["sync_count"] == errors
    check_sequences(read_lines(path), {"err": errors, "w": 10, "gate": 1}).assert_complete()


# -- identical output ---------------------------------------------------------
FMT = "%(asctime)s %(levelname)-8s %(name)s [%(process)d:%(threadName)s] %(module)s:%(lineno)d %(message)s"


def _records() -> List[logging.LogRecord]:
    logger = logging.getLogger("app.identical")
    records = []

    def make(level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        records.append(logger.makeRecord(logger.name, level, __file__, 42, msg, args, exc_info))

    make(logging.INFO, "plain ascii %d", 1)
    make(logging.INFO, "non-ASCII: Grüße, 東京, emoji \U0001F600, %s", "ünïcödé")
    try:
        raise ValueError("boom with ü")
    except ValueError:
        make(logging.WARNING, "an exception at a queued level", exc_info=sys.exc_info())
        make(logging.ERROR, "an exception at the sync level", exc_info=sys.exc_info())
    make(logging.DEBUG, "multi\nline %r", {"k": [1, 2]})
    # Not UTF-8: os.fsdecode() of undecodable bytes leaves lone surrogates,
    # which msgpack cannot carry. CLH writes them under unicode_error_policy.
    make(logging.INFO, "a file name os.fsdecode() made: %s", "caf\udce9.txt")
    make(logging.ERROR, "the same at the sync level: %s", "caf\udce9.txt")
    records.append(logging.getLogger("app.\udcff").makeRecord("app.\udcff", logging.INFO, __file__, 42,
                                                                 "a logger name that is not UTF-8", (), None))
    make(logging.CRITICAL, "critical %s", "last")
    for n in range(50):
        make(logging.INFO, "SEQ w %d %s", n, "x" * (n % 37))
    return records


def test_same_bytes_via_daemon_fallback_embedded_and_plain_clh(start_daemon, tmp_path, make_handler):
    daemon = start_daemon()
    terminator = "|\r\n"  # the daemon only writes terminators ending in a newline (docs/security.md)
    records = _records()
    paths = {name: os.path.join(daemon.log_dir, f"{name}.log") for name in ("daemon", "fallback", "embedded", "plain")}
    endpoints = {"daemon": daemon.endpoint, "fallback": _dead_endpoint(), "embedded": None}
    handlers = {}
    for name, endpoint in endpoints.items():
        handler = make_handler(paths[name], endpoint, fmt=FMT, encoding="utf-8", terminator=terminator,
                               connect_timeout=0.3 if name == "fallback" else 5.0)
        handlers[name] = handler
    plain = ConcurrentRotatingFileHandler(paths["plain"], encoding="utf-8", terminator=terminator)
    plain.setFormatter(logging.Formatter(FMT))
    _wait_state(handlers["daemon"], "daemon")
    _wait_state(handlers["fallback"], "fallback")

    try:
        for record in records:
            for handler in handlers.values():
                if record.levelno >= handler.sync_level:
                    handler.flush()  # sync records may overtake queued ones: keep the order
                handler.handle(record)
            plain.handle(record)
        for handler in handlers.values():
            handler.flush()
    finally:
        plain.close()

    contents = {}
    for name, path in paths.items():
        with open(path, "rb") as f:
            contents[name] = f.read()
    expected = contents["plain"]
    assert "Grüße, 東京".encode() in expected
    assert b"Traceback (most recent call last)" in expected and b"ValueError: boom" in expected
    assert expected.count(terminator.encode()) == len(records)
    for name in ("daemon", "fallback", "embedded"):
        assert contents[name] == expected, name
    assert handlers["daemon"].get_stats()["acked"] > 0
    assert handlers["fallback"].get_stats()["acked"] == 0
    # The three records that are not UTF-8 went through the fallback, counted;
    # the sender went on with the daemon (it used to crash on such a batch).
    stats = handlers["daemon"].get_stats()
    assert stats["unencodable"] == 3 and stats["state"] == "daemon" and stats["last_error"] == "", stats


def test_a_path_that_is_not_utf8_is_written_by_the_fallback_with_a_warning(start_daemon, make_handler):
    """The protocol carries only UTF-8 text: a file name os.fsdecode() made of
    undecodable bytes cannot be named to the daemon (it crashed the sender,
    and nothing reached the file)."""
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, os.fsdecode(b"caf\xe9.log"))
    with pytest.warns(RuntimeWarning, match="not UTF-8"):
        handler = make_handler(path, daemon.endpoint)
    logger = _logger(handler)
    for n in range(50):
        logger.info(seq_record("w", n))
    logger.error(seq_record("sync", 0))
    handler.flush()
    check_sequences(read_lines(path), {"w": 50, "sync": 1}).assert_complete()
    stats = handler.get_stats()
    assert stats["state"] == "embedded" and "not UTF-8" in stats["last_error"], stats


def test_message_is_frozen_at_emit(target, make_handler):
    path, endpoint = target
    handler = make_handler(path, endpoint)
    logger = _started(handler)
    items = [1, 2]
    mapping = {"k": "before"}
    # The sender is held, so these are formatted only after the mutation.
    with sender_held(handler, logger):
        logger.info("list %s", items)
        logger.info("dict %(k)s", mapping)
        items.append(3)
        mapping["k"] = "after"
    handler.flush()
    assert read_lines(path) == [GATE, "list [1, 2]", "dict before"]


# -- what the daemon learns about the client ----------------------------------
def _client_entry(daemon, handler: NonBlockingConcurrentHandler) -> Optional[Dict[str, Any]]:
    session = handler._client_id.session
    for entry in daemon.stats()["clients"]:
        if entry["session"] == session:
            return entry
    return None


def test_client_counters_appear_in_the_daemons_stats(start_daemon, make_handler):
    daemon = start_daemon()
    dropping = make_handler(os.path.join(daemon.log_dir, "r1.log"), daemon.endpoint, queue_size=10,
                            fallback_on_full=False, report_interval=0.1)
    falling = make_handler(os.path.join(daemon.log_dir, "r2.log"), daemon.endpoint, queue_size=10,
                           fallback_on_full=True, report_interval=0.1)
    for handler in (dropping, falling):
        logger = _started(handler)
        with sender_held(handler, logger):
            for n in range(1500):
                logger.info(seq_record("w", n))
        handler.flush()
    d, f = dropping.get_stats(), falling.get_stats()
    assert d["dropped_count"] == f["fallback_count"] == 1490

    def reported(handler: NonBlockingConcurrentHandler) -> Optional[Dict[str, int]]:
        entry = _client_entry(daemon, handler)
        want = handler.stats.report()
        if entry is None or entry["reported"] != want:
            return None
        return entry

    got_d = wait_for(lambda: reported(dropping), what="the dropping client's report")
    got_f = wait_for(lambda: reported(falling), what="the falling-back client's report")
    assert got_d["reported"]["dropped"] == 1490 and got_d["reported"]["queue_full"] == 0
    assert got_f["reported"]["queue_full"] == 1490 and got_f["reported"]["dropped"] == 0
    assert got_f["reported"]["fallback"] == f["fallback_written"]
    assert got_d["reported"]["resent"] == got_f["reported"]["resent"] == 0
    for entry, stats in ((got_d, d), (got_f, f)):
        assert entry["pid"] == os.getpid()
        assert entry["records_received"] >= stats["acked"] > 0
