"""NonBlockingConcurrentHandler (``clh_writerd.client.nonblocking``) in embedded
mode, in the test process: get_stats, the lifecycle, a crashed sender, close().
Through a real daemon: tests/e2e/client/test_handler.py.
"""

import logging

import pytest
from concurrent_log_handler import ConcurrentRotatingFileHandler
from support import check_sequences, read_lines, seq_record, wait_for
from support.handlers import quiet_logger as _logger

from clh_writerd import NonBlockingConcurrentHandler


# -- get_stats -----------------------------------------------------------------
def test_get_stats_in_embedded_mode(tmp_path, make_handler):
    path = str(tmp_path / "embedded.log")
    handler = make_handler(path, None)
    logger = _logger(handler)
    for n in range(300):
        logger.info(seq_record("w", n))
    handler.flush()
    stats = handler.get_stats()
    assert stats["state"] == "embedded"
    assert stats["enqueued"] == 300
    assert stats["sent"] == stats["acked"] == 0  # no daemon involved
    assert stats["queue_depth"] == 0
    check_sequences(read_lines(path), {"w": 300}).assert_complete()


def test_after_a_sender_crash_each_record_is_written_by_emit(tmp_path, make_handler):
    """A bug that kills the sender thread must not leave records in a queue
    nobody drains (until close(), or dropped once it is full)."""
    path = str(tmp_path / "crash.log")
    handler = make_handler(path, None, fallback_on_full=False)
    logger = _logger(handler)
    logger.info(seq_record("w", 0))
    handler.flush()

    def crash() -> None:
        raise RuntimeError("a bug in the sender")

    handler._core.step = crash
    logger.info(seq_record("w", 1))  # wakes the sender, which crashes
    wait_for(lambda: not handler._thread.is_alive(), timeout=5, what="the sender to crash")
    for n in range(2, 12):
        logger.info(seq_record("w", n))
        # In the file when emit() returns: nobody else is left to write it.
        check_sequences(read_lines(path), {"w": n + 1}).assert_complete()
    stats = handler.get_stats()
    assert stats["last_error"].startswith("sender crashed: RuntimeError") and stats["dropped_count"] == 0, stats


# -- lifecycle -----------------------------------------------------------------
def test_stop_is_idempotent_and_start_twice_raises(tmp_path, make_handler):
    path = str(tmp_path / "life.log")
    handler = make_handler(path, None)
    with pytest.raises(RuntimeError):
        handler.start()
    logger = _logger(handler)
    for n in range(500):
        logger.info(seq_record("w", n))
    assert handler.stop() is True
    assert handler.stop() is True  # a second stop is a no-op, not an error
    assert handler.get_stats()["state"] == "stopped"
    check_sequences(read_lines(path), {"w": 500}).assert_complete()
    # A record emitted after stop() is not lost: it is written synchronously.
    logger.info(seq_record("late", 0))
    check_sequences(read_lines(path), {"w": 500, "late": 1}).assert_complete()
    with pytest.raises(RuntimeError):
        handler.start()


def test_start_with_autostart_false(tmp_path, make_handler):
    path = str(tmp_path / "manual.log")
    handler = make_handler(path, None, autostart=False)
    handler.start()
    with pytest.raises(RuntimeError):
        handler.start()
    logger = _logger(handler)
    logger.info(seq_record("w", 0))
    handler.flush()
    assert handler.get_stats()["enqueued"] == 1
    check_sequences(read_lines(path), {"w": 1}).assert_complete()


def test_close_drains_and_closes_the_wrapped_handler(tmp_path):
    path = str(tmp_path / "close.log")
    clh = ConcurrentRotatingFileHandler(path)
    handler = NonBlockingConcurrentHandler(clh, endpoint=None)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = _logger(handler)
    for n in range(1000):
        logger.info(seq_record("w", n))
    handler.close()
    check_sequences(read_lines(path), {"w": 1000}).assert_complete()
    assert handler.get_stats()["state"] == "stopped"
    # The wrapped CLH handler released its stream and its lock file handle.
    assert clh.stream is None
    assert clh.stream_lock is None or clh.stream_lock.closed
    handler.close()  # idempotent
