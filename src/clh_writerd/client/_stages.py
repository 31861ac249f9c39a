"""The stages both handlers share, in pipeline order.

- ``Renderer``: ``prepare`` (caller's thread: freeze the message) and
  ``render`` (sender: the wrapped CLH handler's formatter makes the line).
- ``Batcher``: collects rendered lines into batches capped by count and bytes.
- ``Window``: the bounded set of sent, unacknowledged batches.
"""

import logging
import time
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from .._batchwrite import CLHHandler
from ._stats import RECORD_LIMIT

DROP_WARNING_EVERY = 1000


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


if not hasattr(str, "isascii"):  # Python 3.6: no str.isascii, so always encode.
    def utf8_size(line: str) -> int:  # noqa: F811
        """The size of ``line`` on the wire (msgpack strings are UTF-8)."""
        return len(line.encode("utf-8", "surrogatepass"))


def too_large(line: str, limit: int = RECORD_LIMIT) -> bool:
    """Whether a rendered line is over ``limit`` bytes: it cannot travel in one frame."""
    # At most 4 bytes per character: short lines need no encoding to tell.
    return len(line) * 4 > limit and utf8_size(line) > limit


class Batcher:
    """Collects lines until a batch is full by count or bytes (UTF-8, as
    on the wire: a daemon's max_message_bytes counts bytes, not characters)."""

    def __init__(self, max_records: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.lines: List[str] = []
        self.size = 0
        self.first_at = 0.0

    def add(self, line: str) -> None:
        if not self.lines:
            self.first_at = self.clock()
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
            self.first_at = self.clock() if not self.lines else self.first_at
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
