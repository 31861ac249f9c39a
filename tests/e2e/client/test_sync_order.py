"""Sync records keep the process's order (issue 16): when ``logger.error()``
returns, it and every record logged before it to that file are in the file,
in emission order. ``sync_order=False`` keeps the old bypass (a sync record
may overtake queued ones): the negative control shows the check can fail.
Real daemon, real handler, the file read back."""

import os

from support import read_lines, seq_record

from support.handlers import quiet_logger as _logger
from support.handlers import sender_held
from support.handlers import wait_state as _wait_state


def _positions(path, prefix):
    return [i for i, line in enumerate(read_lines(path)) if line.startswith(prefix)]


def test_error_returns_after_every_record_before_it_is_in_the_file_in_order(start_daemon, make_handler):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "order.log")
    handler = make_handler(path, daemon.endpoint)
    _wait_state(handler, "daemon")
    logger = _logger(handler)
    for k in range(5):
        for n in range(400):
            logger.info(seq_record("w", k * 400 + n))
        logger.error(seq_record("err", k))
        lines = read_lines(path)
        # Everything logged so far is in the file, and the error is last.
        assert len(lines) == (k + 1) * 401, (k, len(lines))
        assert lines[-1] == seq_record("err", k)
        assert lines[-2] == seq_record("w", k * 400 + 399)
    handler.flush()
    infos = [line for line in read_lines(path) if not line.startswith(seq_record("err", 0)[:6])]
    assert infos == [seq_record("w", n) for n in range(2000)]
    assert handler.get_stats()["sync_count"] == 5 and handler.get_stats()["acked"] == 2005


def test_a_stalled_sender_still_has_the_error_in_the_file_on_return(start_daemon, make_handler):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "stalled.log")
    handler = make_handler(path, daemon.endpoint, sync_timeout=0.3)
    _wait_state(handler, "daemon")
    logger = _logger(handler)
    with sender_held(handler, logger):
        logger.info(seq_record("w", 0))
        logger.error(seq_record("err", 0))
        assert seq_record("err", 0) in read_lines(path)
    handler.flush()
    lines = read_lines(path)
    assert lines.count(seq_record("err", 0)) == 1  # the sender skipped the one the caller wrote
    assert handler.get_stats()["sync_timeouts"] == 1


def test_sync_order_false_bypasses_the_queue(start_daemon, make_handler):
    """The negative control: with the bypass, a sync record overtakes a queued one."""
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "bypass.log")
    handler = make_handler(path, daemon.endpoint, sync_order=False)
    _wait_state(handler, "daemon")
    logger = _logger(handler)
    with sender_held(handler, logger):
        logger.info(seq_record("w", 0))
        logger.error(seq_record("err", 0))
        assert read_lines(path) == [seq_record("err", 0)]
    handler.flush()
    assert read_lines(path).index(seq_record("err", 0)) < read_lines(path).index(seq_record("w", 0))
