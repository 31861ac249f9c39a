"""Batching: which lines may travel to the daemon (``cannot_travel``), the
``Batcher`` that collects them into batches capped by count and bytes, and
the ``Window`` of sent, unacknowledged batches."""

import time
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple


from .._fieldformat import _ASCII_CHECK, text_size
from ._stats import RECORD_LIMIT
from ._plans import Item


def utf8_size(line: Item) -> int:
    """The size of ``line`` on the wire (msgpack strings are UTF-8)."""
    if type(line) is not str:
        return len(line[1])  # type: ignore[arg-type]
    return text_size(line)  # type: ignore[arg-type]


OVERSIZE = "oversize"
UNENCODABLE = "unencodable"


def cannot_travel(line: Item, limit: int = RECORD_LIMIT) -> str:
    """Why a rendered item cannot travel to the daemon, as the counter that
    says so, or "": ``OVERSIZE`` (over ``limit`` bytes: not one frame) or
    ``UNENCODABLE`` (text that is not UTF-8, such as the lone surrogates
    os.fsdecode() makes of undecodable bytes: msgpack refuses them, and the
    whole batch with them). The fallback writes it instead, under the
    file's unicode_error_policy, as CLH would."""
    if type(line) is not str:
        return ""  # field values: their plan checked the bound and the encoding
    # At most 4 bytes per character: short lines need no encoding to tell.
    if len(line) * 4 > limit and utf8_size(line) > limit:
        return OVERSIZE
    if not (_ASCII_CHECK and line.isascii()):
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            return UNENCODABLE
    return ""


class Batcher:
    """Collects lines until a batch is full by count or bytes (UTF-8, as
    on the wire: a daemon's max_message_bytes counts bytes, not characters)."""

    def __init__(self, max_records: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.lines: List[Item] = []
        self.size = 0
        self.first_at = 0.0

    def add(self, line: Item) -> None:
        if not self.lines:
            self.first_at = self.clock()
        self.lines.append(line)
        self.size += utf8_size(line) + 16

    @property
    def full(self) -> bool:
        return len(self.lines) >= self.max_records or self.size >= self.max_bytes

    def take(self) -> List[Item]:
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

    def take_all(self) -> List[Item]:
        lines, self.lines, self.size = self.lines, [], 0
        return lines

    def put_back(self, lines: List[Item]) -> None:
        """Return lines taken but not sent, ahead of the rest (order kept)."""
        if lines:
            self.first_at = self.clock() if not self.lines else self.first_at
            self.lines = lines + self.lines
            self.size += sum(utf8_size(line) + 16 for line in lines)


class InFlight(NamedTuple):
    lines: Sequence[Item]
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

    def add(self, lines: Sequence[Item], payload: bytes) -> None:
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

    def take_all(self) -> List[Item]:
        """Every unacknowledged line, in sequence order, for the fallback."""
        batches = sorted(list(self.batches.items()) + list(self.refused.items()))
        self.batches.clear()
        self.refused.clear()
        return [line for _, batch in batches for line in batch.lines]

