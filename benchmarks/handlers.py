"""The handlers the caller-side scenarios compare, built the same way in every
worker process: one formatter, one message, one file layout.

``build(kind, directory, endpoint)`` returns a ``Built``: the handler to add
to the logger, how to close it (draining whatever it queued), and where its
lines end up. Kinds:

- ``noop``: ``emit`` does nothing (the floor set by logging itself).
- ``file``: stdlib ``FileHandler``.
- ``clh``: ``ConcurrentRotatingFileHandler`` used directly.
- ``queue``: stdlib ``QueueHandler`` + ``QueueListener`` writing to a FileHandler.
- ``nb-daemon`` / ``nb-embedded``: ``create_nonblocking_handler`` with the
  daemon's endpoint / ``endpoint=None``.
- ``ping``: ``emit`` formats the record and does one bare ping round trip
  to the daemon (REQ/REP, nothing written): the floor of the sync path.
- ``async-daemon`` / ``async-embedded`` / ``async-slow-nodaemon``:
  ``create_async_concurrent_handler``; the last wraps a CLH whose
  ``do_write`` sleeps 50 ms and points at an endpoint nobody serves, so the
  fallback (in the executor) writes everything, slowly.
"""

import logging
import logging.handlers
import os
import queue
import re
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import zmq
from concurrent_log_handler import ConcurrentRotatingFileHandler

from clh_writerd import create_async_concurrent_handler, create_nonblocking_handler, protocol

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
MESSAGE = "user %s did %d things"  # logger.info(MESSAGE, name, n)
NAMES = [f"user{i:02d}" for i in range(64)]
MAX_BYTES = 16 * 1024 * 1024
BACKUP_COUNT = 20
SLOW_WRITE_SECONDS = 0.05
LOG_NAME = "app.log"

SYNC_KINDS = ("noop", "file", "clh", "queue", "nb-daemon", "nb-embedded")
ASYNC_KINDS = ("noop", "file", "queue", "async-daemon", "async-embedded", "async-slow-nodaemon")
DAEMON_KINDS = ("nb-daemon", "async-daemon")


class NoopHandler(logging.Handler):
    """The floor: logging builds the record and calls emit, which does nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        pass


class PingHandler(logging.Handler):
    """The sync path's floor: the record formatted, then one ping round trip
    to the daemon over a REQ socket (what a sync record costs at least in
    this design), nothing written."""

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.context = zmq.Context()
        self.req = self.context.socket(zmq.REQ)
        self.req.setsockopt(zmq.LINGER, 0)
        self.req.setsockopt(zmq.RCVTIMEO, 5000)
        self.req.connect(endpoint)
        self.pings = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)
        self.pings += 1
        self.req.send(protocol.encode_ping(self.pings))
        self.req.recv()

    def close(self) -> None:
        self.req.close()
        self.context.term()
        super().close()


class SlowDiskCLH(ConcurrentRotatingFileHandler):
    """A CLH handler on a slow disk: every write takes 50 ms more."""

    def do_write(self, msg: str) -> None:
        time.sleep(SLOW_WRITE_SECONDS)
        super().do_write(msg)


class Built(NamedTuple):
    handler: logging.Handler
    close: Callable[[], None]  # drains what the handler queued, then closes it
    path: Optional[str]  # the file its lines end up in (None: writes nothing)
    stats: Callable[[], Dict[str, Any]]


def _formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT)


def build(kind: str, directory: str, endpoint: Optional[str]) -> Built:
    path = os.path.join(directory, LOG_NAME)
    clh_kwargs = {"maxBytes": MAX_BYTES, "backupCount": BACKUP_COUNT, "encoding": "utf-8"}
    if kind == "noop":
        noop = NoopHandler()
        return Built(noop, noop.close, None, dict)
    if kind == "ping":
        assert endpoint is not None, "pings the daemon"
        ping = PingHandler(endpoint)
        ping.setFormatter(_formatter())
        return Built(ping, ping.close, None, dict)
    if kind == "file":
        handler: Any = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(_formatter())
        return Built(handler, handler.close, path, dict)
    if kind == "clh":
        handler = ConcurrentRotatingFileHandler(path, **clh_kwargs)
        handler.setFormatter(_formatter())
        return Built(handler, handler.close, path, dict)
    if kind == "queue":
        target = logging.FileHandler(path, encoding="utf-8")
        target.setFormatter(_formatter())  # the listener's handler formats, as the docs advise
        q: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        handler = logging.handlers.QueueHandler(q)
        listener = logging.handlers.QueueListener(q, target)
        listener.start()

        def close_queue() -> None:
            listener.stop()  # drains through the sentinel
            target.close()
            handler.close()

        return Built(handler, close_queue, path, dict)
    if kind in ("nb-daemon", "nb-embedded"):
        handler = create_nonblocking_handler(path, endpoint=endpoint if kind == "nb-daemon" else None, **clh_kwargs)
        handler.setFormatter(_formatter())
        return Built(handler, handler.close, path, handler.get_stats)
    if kind in ("async-daemon", "async-embedded"):
        handler = create_async_concurrent_handler(path, endpoint=endpoint if kind == "async-daemon" else None,
                                                  **clh_kwargs)
        handler.setFormatter(_formatter())
        return Built(handler, handler.close, path, handler.get_stats)
    if kind == "async-slow-nodaemon":
        from clh_writerd import AsyncConcurrentHandler

        assert endpoint is not None, "needs an endpoint nobody serves"
        handler = AsyncConcurrentHandler(SlowDiskCLH(path, **clh_kwargs), endpoint=endpoint)
        handler.setFormatter(_formatter())
        return Built(handler, handler.close, path, handler.get_stats)
    raise ValueError(f"unknown handler kind {kind!r}")


def new_logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def percentiles(samples_ns: List[int]) -> Dict[str, float]:
    """p50, p99, p99.9 and max of nanosecond samples, in µs."""
    ordered = sorted(samples_ns)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1000.0

    return {"p50": at(0.50), "p99": at(0.99), "p99.9": at(0.999), "max": ordered[-1] / 1000.0}


_LINE = re.compile(rb"user p(\d+) did (\d+) things$")


def sequence_check(files: Iterable[str], processes: int, per_process: int) -> Tuple[int, int, int]:
    """(missing, duplicates, unparsed lines) of ``logger.info(MESSAGE, f"p{proc}", seq)`` lines."""
    seen = [bytearray(per_process) for _ in range(processes)]
    duplicates = unparsed = 0
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                m = _LINE.search(line.rstrip(b"\n"))
                if m is None:
                    unparsed += 1
                    continue
                proc, seq = int(m.group(1)), int(m.group(2))
                if proc >= processes or seq >= per_process:
                    unparsed += 1
                elif seen[proc][seq]:
                    duplicates += 1
                else:
                    seen[proc][seq] = 1
    missing = sum(per_process - sum(s) for s in seen)
    return missing, duplicates, unparsed


def log_files(path: str) -> List[str]:
    """``path`` and its rotated siblings (``path.1``, ...), lock files excluded."""
    directory, base = os.path.split(path)
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if (n == base or n.startswith(base + ".")) and not n.endswith(".lock")]
