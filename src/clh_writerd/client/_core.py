"""What both client handlers share: the stages that do not depend on threads
or the event loop.

- ``Renderer``: ``prepare`` (caller's thread: freeze the message) and
  ``render`` (sender: the wrapped CLH handler's formatter makes the line).
- ``Batcher``: collects rendered lines into batches capped by count and bytes.
- ``Window``: the bounded set of sent, unacknowledged batches.
- ``Fallback``: writes lines through the wrapped CLH handler (same file, same
  lock, same rotation) with the batch-write seam the daemon uses.
- ``ClientStats``: the counters behind ``get_stats()``.
"""

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from .. import protocol
from .._batchwrite import BatchWriter, CLHHandler, describe_handler

STATE_CONNECTING = "connecting"
STATE_DAEMON = "daemon"
STATE_FALLBACK = "fallback"
STATE_EMBEDDED = "embedded"  # endpoint=None: the in-process writer is the only path
STATE_STOPPED = "stopped"

DROP_WARNING_EVERY = 1000
# The largest record a client sends to a daemon it knows nothing about: half
# the protocol's record limit, so one record plus the batch around it always
# fits a frame. A daemon with a smaller max_message_bytes lowers it.
RECORD_LIMIT = protocol.MAX_RECORD_BYTES // 2


class ClientStats:
    """Counters shared by the thread and asyncio handlers (same keys)."""

    COUNTERS = (
        "enqueued",  # accepted into the queue
        "sent",  # records sent to the daemon (resends included)
        "acked",  # records the daemon acknowledged as written
        "dropped_count",  # refused by policy (queue full, drop)
        "fallback_count",  # queue full: handled synchronously instead
        "fallback_written",  # records written directly through CLH
        "sync_count",  # records at or above sync_level written before emit returned
        "sync_timeouts",  # sync records the daemon did not confirm in time
        "resent",  # records sent but not acked, then sent again or written by the fallback
        "busy",  # batches refused by the daemon's backpressure
        "write_errors",  # fallback writes that raised
        "oversize",  # records too large for one frame: written by the fallback
    )

    def __init__(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self.state = STATE_CONNECTING
        self.last_error = ""
        # Not a counter: the largest record (UTF-8 bytes) sent to the daemon,
        # lowered by its max_message_bytes (ping reply); batch and sync paths
        # both read it here.
        self.record_limit = RECORD_LIMIT

    def report(self) -> Dict[str, int]:
        """The counters a client reports to the daemon about itself."""
        return {
            "dropped": self.dropped_count,  # type: ignore[attr-defined]
            "fallback": self.fallback_written,  # type: ignore[attr-defined]
            "resent": self.resent,  # type: ignore[attr-defined]
            "queue_full": self.fallback_count,  # type: ignore[attr-defined]
            "sync_timeouts": self.sync_timeouts,  # type: ignore[attr-defined]
        }

    def snapshot(self, queue_depth: int, capacity: int, in_flight: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        out.update(queue_depth=queue_depth, capacity=capacity, in_flight=in_flight,
                   state=self.state, last_error=self.last_error)
        return out


class Renderer:
    """Turns LogRecords into the lines written to the file."""

    def __init__(self, handler: CLHHandler) -> None:
        self.handler = handler

    def prepare(self, record: logging.LogRecord) -> Tuple[logging.LogRecord, str]:
        """Caller's thread: freeze what may change later, nothing more.

        The message is merged with its arguments now (they may be mutated after
        the call) and an exception is rendered now (tracebacks do not travel);
        the rest of formatting happens on the sender.
        """
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter().formatException(record.exc_info)
        return record, record.getMessage()

    def render(self, item: Tuple[logging.LogRecord, str]) -> str:
        """Sender: the wrapped handler's formatter on a frozen copy."""
        record, message = item
        frozen = logging.LogRecord.__new__(logging.LogRecord)
        frozen.__dict__.update(record.__dict__)
        frozen.msg, frozen.args, frozen.exc_info = message, None, None
        return self.handler.format(frozen)

    def render_now(self, record: logging.LogRecord) -> str:
        """Both stages at once, for records written before emit() returns."""
        return self.render(self.prepare(record))

    def _formatter(self) -> logging.Formatter:
        return self.handler.formatter or logging.Formatter()


def utf8_size(line: str) -> int:
    """The size of ``line`` on the wire (msgpack strings are UTF-8)."""
    return len(line) if line.isascii() else len(line.encode("utf-8", "surrogatepass"))


def too_large(line: str, limit: int = RECORD_LIMIT) -> bool:
    """Whether a rendered line is over ``limit`` bytes: it cannot travel in one frame."""
    # At most 4 bytes per character: short lines need no encoding to tell.
    return len(line) * 4 > limit and utf8_size(line) > limit


class Batcher:
    """Collects lines until a batch is full by count or bytes (UTF-8, as
    on the wire: a daemon's max_message_bytes counts bytes, not characters)."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.lines: List[str] = []
        self.size = 0
        self.first_at = 0.0

    def add(self, line: str) -> None:
        if not self.lines:
            self.first_at = time.monotonic()
        self.lines.append(line)
        self.size += utf8_size(line) + 16

    @property
    def full(self) -> bool:
        return len(self.lines) >= self.max_records or self.size >= self.max_bytes

    def take(self) -> List[str]:
        """Up to one batch's worth of lines, oldest first."""
        if len(self.lines) <= self.max_records and self.size <= self.max_bytes:
            lines, self.lines, self.size = self.lines, [], 0
            return lines
        count = size = 0
        for line in self.lines:
            cost = utf8_size(line) + 16
            if count and (count >= self.max_records or size + cost > self.max_bytes):
                break
            count += 1
            size += cost
        lines, self.lines = self.lines[:count], self.lines[count:]
        self.size -= size
        return lines

    def take_all(self) -> List[str]:
        lines, self.lines, self.size = self.lines, [], 0
        return lines

    def put_back(self, lines: List[str]) -> None:
        """Return lines taken but not sent, ahead of the rest (order kept)."""
        if lines:
            self.first_at = time.monotonic() if not self.lines else self.first_at
            self.lines = lines + self.lines
            self.size += sum(utf8_size(line) + 16 for line in lines)


class InFlight(NamedTuple):
    lines: List[str]
    payload: bytes  # kept encoded: a busy refusal sends the same bytes again


class Window:
    """Sent batches awaiting their ack, in sequence order (bounded)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.batches: "OrderedDict[int, InFlight]" = OrderedDict()
        self.refused: Dict[int, InFlight] = {}  # busy: to resend, in order
        self.next_seq = 1

    def __len__(self) -> int:
        return len(self.batches) + len(self.refused)

    @property
    def has_room(self) -> bool:
        return len(self) < self.size and not self.refused

    def add(self, lines: List[str], payload: bytes) -> None:
        """A batch just sent with sequence number ``next_seq``."""
        self.batches[self.next_seq] = InFlight(lines, payload)
        self.next_seq += 1

    def ack(self, seq: int) -> Optional[InFlight]:
        return self.batches.pop(seq, None)

    def refuse(self, seq: int) -> None:
        batch = self.batches.pop(seq, None)
        if batch is not None:
            self.refused[seq] = batch

    def ready_to_resend(self) -> List[Tuple[int, InFlight]]:
        """Refused batches, once nothing else is in flight (keeps the order)."""
        if self.batches or not self.refused:
            return []
        out = sorted(self.refused.items())
        self.refused.clear()
        return out

    def resend(self, seq: int, batch: InFlight) -> None:
        self.batches[seq] = batch
        self.batches.move_to_end(seq)

    def take_all(self) -> List[str]:
        """Every unacknowledged line, in sequence order, for the fallback."""
        batches = sorted(list(self.batches.items()) + list(self.refused.items()))
        self.batches.clear()
        self.refused.clear()
        return [line for _, batch in batches for line in batch.lines]


class Fallback:
    """Direct writes through the wrapped CLH handler (thread-safe: CLH's own
    thread lock serialises the sender and callers' synchronous writes)."""

    def __init__(self, handler: CLHHandler, stats: ClientStats) -> None:
        self.writer = BatchWriter(handler)
        self.stats = stats
        self._lock = threading.Lock()

    def write(self, lines: List[str]) -> bool:
        """Write lines; on error count it, keep last_error and return False."""
        if not lines:
            return True
        try:
            self.writer.write(lines)
        except Exception as exc:
            with self._lock:
                self.stats.write_errors += 1  # type: ignore[attr-defined]
                self.stats.last_error = f"fallback write failed: {type(exc).__name__}: {exc}"
            return False
        with self._lock:
            self.stats.fallback_written += len(lines)  # type: ignore[attr-defined]
        return True


def file_spec(handler: CLHHandler) -> Tuple[str, Dict[str, Any]]:
    """(path, options) the daemon needs, validated like the daemon will."""
    path, options = describe_handler(handler)
    return path, protocol.check_file_options(options)


def build_clh(filename: Any, use_timed: bool, kwargs: Dict[str, Any]) -> CLHHandler:
    """The CLH handler a factory wraps (an absolute path: the daemon needs one)."""
    import os

    from concurrent_log_handler import ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler

    path = os.path.abspath(os.fspath(filename))
    if use_timed:
        return ConcurrentTimedRotatingFileHandler(path, **kwargs)
    return ConcurrentRotatingFileHandler(path, **kwargs)


def split_kwargs(kwargs: Dict[str, Any], own: Tuple[str, ...]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(CLH's keyword arguments, the handler's own). Level names are accepted
    as strings, as logging configuration files write them."""
    mine = {k: v for k, v in kwargs.items() if k in own}
    clh = {k: v for k, v in kwargs.items() if k not in own}
    for key in ("sync_level", "level"):
        if isinstance(mine.get(key), str):
            mine[key] = logging.getLevelName(mine[key].upper())
    return clh, mine


class _DefaultEndpoint:
    def __repr__(self) -> str:
        return "<default endpoint>"


# "Use the endpoint client and daemon agree on" (protocol.default_endpoint),
# as opposed to None, which means "no daemon".
DEFAULT_ENDPOINT: Any = _DefaultEndpoint()


class WrappingHandler(logging.Handler):
    """What both handlers are as logging handlers: a wrapper around a CLH
    handler, which describes the file and renders every line."""

    def __init__(self, handler: CLHHandler, endpoint: Any, level: int) -> None:
        super().__init__(level)
        self.handler = handler
        self.endpoint: Optional[str] = protocol.default_endpoint() if endpoint is DEFAULT_ENDPOINT else endpoint
        if handler.formatter is not None and self.formatter is None:
            super().setFormatter(handler.formatter)
        self.path, self.options = file_spec(handler)
        self._renderer = Renderer(handler)

    def setFormatter(self, fmt: Optional[logging.Formatter]) -> None:
        # The wrapped handler renders every line (daemon and fallback paths
        # alike), so it must use the same formatter.
        super().setFormatter(fmt)
        self.handler.setFormatter(fmt)

    def handle(self, record: logging.LogRecord) -> Any:
        # emit() is thread-safe without Handler.lock: skip taking it.
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):
            record = rv
        if rv:
            self.emit(record)
        return rv

    def _warning_line(self, near: logging.LogRecord, msg: str, *args: Any) -> str:
        """A WARNING line about the handler itself (drops, blocking), dated like ``near``."""
        record = logging.makeLogRecord({
            "name": "clh_writerd", "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "clh-writerd: " + msg, "args": args, "created": near.created, "msecs": near.msecs,
        })
        return self._renderer.render_now(record)
