"""The client's notices (``clh_writerd.client._notices``), observed in the test
process: the drop warning, where a notice goes, the monitor_interval summary.
The notices of an application process: tests/e2e/client/test_monitoring.py.
"""

import logging
from typing import List

from support import read_lines, wait_for

from clh_writerd.client._notices import LOGGER_NAME
from clh_writerd.client.nonblocking import create_nonblocking_handler


def test_drops_warn_once_below_a_thousand_with_the_fix(tmp_path, caplog):
    from support import hold_clh_lock

    caplog.set_level(logging.WARNING, logger=LOGGER_NAME)
    path = str(tmp_path / "dropping.log")
    handler = create_nonblocking_handler(path, endpoint=None, queue_size=10, fallback_on_full=False)
    logger = logging.getLogger("dropping-app")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        with hold_clh_lock(path):  # the sender's write waits for the lock: the queue fills up
            for n in range(300):
                logger.warning("record %d", n)
            dropped = handler.get_stats()["dropped_count"]
        assert 0 < dropped < 1000
        handler.flush()
        warned = wait_for(lambda: [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME], 5,
                          "the drop warning")
        assert len(warned) == 1 and "queue full, 1 records dropped so far" in warned[0], warned
        assert "fallback_on_full=True" in warned[0]
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_notices_skip_our_handlers_and_use_last_resort_only_when_nothing_else_would_show_them(
        tmp_path, monkeypatch):
    import io

    from clh_writerd.client import _notices

    stream = io.StringIO()
    monkeypatch.setattr(logging, "lastResort", logging.StreamHandler(stream))
    root = logging.getLogger()
    ours = create_nonblocking_handler(str(tmp_path / "root.log"), endpoint=None)
    saved = root.handlers[:]
    root.handlers[:] = [ours]  # pytest's own capture handlers aside, for this test
    try:
        _notices.emit(logging.WARNING, "clh-writerd: first")
        ours.flush()
        assert stream.getvalue() == "clh-writerd: first\n"  # only our handler: stderr via lastResort
        other = io.StringIO()
        root.addHandler(logging.StreamHandler(other))
        _notices.emit(logging.WARNING, "clh-writerd: second")
        assert other.getvalue() == "clh-writerd: second\n" and "second" not in stream.getvalue()
    finally:
        root.handlers[:] = saved
        ours.close()
    assert read_lines(str(tmp_path / "root.log")) == []  # never through the handler itself


# -- monitor_interval (in-process: the logger is the thing to observe) ----------------------
def test_monitor_interval_logs_the_summary_louder_when_fallback_writes_grew(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    handler = create_nonblocking_handler(str(tmp_path / "m.log"), endpoint=None, monitor_interval=0.05)
    try:
        logger = logging.getLogger("monitored-app")
        logger.propagate = False
        logger.addHandler(handler)
        logger.warning("one record, written directly (embedded)")
        handler.flush()

        def summaries(level: int) -> List[str]:
            return [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME and r.levelno == level]

        loud = wait_for(lambda: summaries(logging.WARNING), 5, "a WARNING summary")
        assert "fallback 1 dropped 0" in loud[0] and "embedded" in loud[0]
        quiet = wait_for(lambda: summaries(logging.INFO), 5, "an INFO summary once nothing grew")
        assert "fallback 1" in quiet[0]
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_monitor_interval_is_off_by_default(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    handler = create_nonblocking_handler(str(tmp_path / "quiet.log"), endpoint=None)
    try:
        assert handler.opts.monitor_interval == 0
        assert handler._core is not None and handler._core.monitor_at is None
    finally:
        handler.close()
    assert [r for r in caplog.records if r.name == LOGGER_NAME] == []
