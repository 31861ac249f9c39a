"""clh_writerd.migrate.setup_logging_queues in the test process: which
handlers it wraps. A real dictConfig setup in a client process, with a daemon
and without one: tests/e2e/test_migrate.py."""

import logging

from concurrent_log_handler import ConcurrentRotatingFileHandler

from clh_writerd import NonBlockingConcurrentHandler, setup_logging_queues


def test_only_exact_clh_handlers_on_the_given_loggers_are_wrapped(tmp_path):
    class Custom(ConcurrentRotatingFileHandler):
        """A subclass may override emit(): it is left alone."""

    logger = logging.getLogger("clh_writerd.tests.migrate")
    other = logging.getLogger("clh_writerd.tests.migrate.other")
    plain = ConcurrentRotatingFileHandler(str(tmp_path / "plain.log"))
    custom = Custom(str(tmp_path / "custom.log"))
    untouched = ConcurrentRotatingFileHandler(str(tmp_path / "untouched.log"))
    logger.handlers, other.handlers = [plain, custom], [untouched]
    try:
        (wrapper,) = setup_logging_queues([logger], endpoint=None)
        assert logger.handlers == [wrapper, custom] and isinstance(wrapper, NonBlockingConcurrentHandler)
        assert other.handlers == [untouched]
        logger.warning("hello")
        wrapper.flush()
        assert (tmp_path / "plain.log").read_text() == "hello\n"
    finally:
        for handler in logger.handlers + other.handlers:
            handler.close()
        logger.handlers, other.handlers = [], []
