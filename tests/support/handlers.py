"""Helpers for tests of NonBlockingConcurrentHandler in the test process."""

import contextlib
import logging
import threading
import uuid
from typing import Iterator

from clh_writerd import NonBlockingConcurrentHandler

from .oracle import seq_record
from .processes import wait_for


def quiet_logger(handler: logging.Handler) -> logging.Logger:
    """A fresh DEBUG logger that sends only to ``handler``."""
    logger = logging.getLogger(f"test.handler.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger


def wait_state(handler: NonBlockingConcurrentHandler, state: str) -> None:
    """Wait until the handler reports ``state`` (daemon, fallback, ...)."""
    wait_for(lambda: handler.get_stats()["state"] == state, what=f"handler state {state!r}")


@contextlib.contextmanager
def sender_held(handler: NonBlockingConcurrentHandler, logger: logging.Logger) -> Iterator[None]:
    """Hold the sender thread while it formats a "gate" record: records
    emitted inside the block stay queued (a slow path the test controls)."""
    entered, release = threading.Event(), threading.Event()
    inner = handler.formatter or logging.Formatter()

    class GateFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            if record.getMessage() == GATE:
                entered.set()
                release.wait(60)
            return inner.format(record)

    handler.setFormatter(GateFormatter())
    logger.info(GATE)
    assert entered.wait(30), "the sender never formatted the gate record"
    try:
        yield
    finally:
        release.set()


GATE = seq_record("gate", 0)
