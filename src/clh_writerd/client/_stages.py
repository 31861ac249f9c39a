"""The stages both handlers share, in pipeline order.

- ``Renderer``: ``prepare``/``freeze`` (caller's thread: freeze the message;
  for queued records the values the daemon renders, not the LogRecord) and
  ``render`` (sender: the values for the daemon, or the wrapped CLH
  handler's formatter makes the line).
- ``Batcher``: collects rendered lines into batches capped by count and bytes.
- ``Window``: the bounded set of sent, unacknowledged batches.
"""

import locale
import logging
import operator
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import msgpack

from .. import protocol
from .._batchwrite import CLHHandler
from .._render import _ASCII_CHECK, TIME_FIELD, FieldFormat, text_size
from ._stats import RECORD_LIMIT

DROP_WARNING_EVERY = 1000

_STYLES = {logging.PercentStyle: "%", logging.StrFormatStyle: "{", logging.StringTemplateStyle: "$"}
# Formatter methods an instance may override by assignment: then it is not stock.
_STOCK_METHODS = ("format", "formatTime", "formatMessage", "usesTime", "formatException", "formatStack")
_MISSING = object()
# Values a record may carry into a frozen item: the cyclic GC untracks a
# tuple of them, and the daemon renders them exactly.
_PLAIN = frozenset((str, int, float, bool, type(None)))


class FieldPlan:
    """What the daemon needs to render records of one stock formatter:
    its FieldFormat, and per record the values of the fields it uses.
    Decided once per formatter (``for_formatter``)."""

    def __init__(self, fmt: FieldFormat, converter: Callable[..., time.struct_time], number: int = -1) -> None:
        self.number = number  # its index in _PLANS: what an Item names it by
        self.format = fmt
        self.fields = fmt.fields
        self.converter = converter
        self._tz: Optional[Tuple[int, int, int, str]] = None  # (sec, gmtoff, isdst, zone), swapped whole
        own = [n for n in fmt.fields if n not in ("message", TIME_FIELD)]
        # The record's own attributes in one C call (a tuple for 2+ names).
        self._own: Optional[Callable[[Dict[str, Any]], Any]] = operator.itemgetter(*own) if own else None
        self._own_names = own
        self._single = len(own) == 1
        self._message = "message" in fmt.fields
        self._uses_time = fmt.uses_time

    @classmethod
    def for_formatter(cls, formatter: logging.Formatter, handler: logging.Handler) -> Optional["FieldPlan"]:
        """A plan when the daemon can reproduce ``formatter`` byte for byte, else None."""
        if type(formatter) is not logging.Formatter or type(handler).format is not logging.Handler.format:
            return None
        style = getattr(formatter, "_style", None)
        kind = _STYLES.get(type(style))  # type: ignore[arg-type]
        if kind is None or getattr(style, "_defaults", None) or any(m in vars(formatter) for m in _STOCK_METHODS):
            return None
        converter = formatter.converter
        if converter is not time.localtime and converter is not time.gmtime:
            return None
        mfmt = formatter.default_msec_format
        if not mfmt and sys.version_info < (3, 9):
            return None  # 3.8's formatTime applies it unconditionally
        try:
            fmt = FieldFormat(kind, style._fmt, formatter.datefmt, formatter.default_time_format, mfmt)  # type: ignore[union-attr]
        except (ValueError, TypeError):
            return None
        if fmt.uses_time and locale.setlocale(locale.LC_TIME) not in ("C", "POSIX"):
            return None  # month and day names: the daemon's locale is C
        return _registered(fmt, converter)

    def flight_of(self, record: logging.LogRecord, message: str, limit: int) -> Optional[Tuple[int, bytes]]:
        """``flight()`` of a record not frozen (a sync record, say), or None
        when the daemon could not reproduce its line exactly (traceback,
        stack, an exotic value, too large): the client renders it itself."""
        d = record.__dict__
        if d.get("exc_text") or d.get("stack_info") or d.get("exc_info"):
            return None
        own = self.own_values(d)
        if own is None:
            return None
        return self.flight((self.number, message, d.get("created"), d.get("msecs"), *own), limit)

    def own_values(self, d: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
        """The record's own attributes the format uses, if all are plain
        values (str, int, float, bool, None); else None."""
        own = self._own
        try:
            if own is None:
                values: Tuple[Any, ...] = ()
            elif self._single:
                values = (own(d),)
            else:
                values = own(d)
        except KeyError:
            return None  # the formatter's own KeyError, raised client-side
        plain = _PLAIN
        for value in values:
            if type(value) not in plain:
                return None
        return values

    def flight(self, item: Tuple[Any, ...], limit: int) -> Optional[Tuple[int, bytes]]:
        """A frozen item's in-flight item (see ``Item``), or None as for
        ``flight_of()``. The sender's hot path, once per queued record while
        the daemon renders: one msgpack call, whose size bounds the line
        (``quick_bound``); a record too large for that bound is measured
        value by value."""
        message = item[1]
        own = item[4:]
        if self._uses_time:
            created = item[2]
            if type(created) is not float or not created >= 0:
                return None
            sec = int(created)
            tz = self._tz
            if tz is None or tz[0] != sec:
                tz = self._zone(sec)
                if tz is None:
                    return None
            when = (sec, item[3], tz[1], tz[2], tz[3])
            values = (*own, message, when) if self._message else (*own, when)
        else:
            values = (*own, message) if self._message else own
        try:
            packed = pack(values)
        except (UnicodeEncodeError, OverflowError):  # not UTF-8 (lone surrogates); an int over 64 bits
            return None
        fmt = self.format
        if fmt.quick_bound(len(packed), len(own) + self._message) > limit:
            try:
                if fmt.bound_values(own, message if self._message else None) > limit:
                    return None
            except ValueError:
                return None
        return (self.number, packed)

    def record(self, own: Tuple[Any, ...], message: str, created: Any, msecs: Any) -> logging.LogRecord:
        """A LogRecord holding what the stock formatter reads: enough to render
        a frozen record client-side, or to name it in handleError."""
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.__dict__.update(zip(self._own_names, own))
        record.__dict__.update(msg=message, args=None, exc_info=None, exc_text=None, stack_info=None,
                               created=created, msecs=msecs)
        return record

    def _zone(self, sec: int) -> Optional[Tuple[int, int, int, str]]:
        """(sec, gmtoff, isdst, zone) of the converter at ``sec``, cached for the
        next records of the same second; None if the daemon could not
        reproduce that local time from them."""
        st = self.converter(sec)
        gmtoff, zone = getattr(st, "tm_gmtoff", None), getattr(st, "tm_zone", None)
        if type(gmtoff) is not int or type(zone) is not str or tuple(time.gmtime(sec + gmtoff))[:6] != tuple(st)[:6]:
            return None
        tz = self._tz = (sec, gmtoff, st.tm_isdst, zone)
        return tz


# Every plan made in this process, one per (format, converter, time zone): a handful.
_PLANS: List[FieldPlan] = []
_PLAN_NUMBERS: Dict[Tuple[Any, ...], int] = {}


# Held across fork() (_process), so a child finds it free.
PLANS_LOCK = threading.Lock()


def _registered(fmt: FieldFormat, converter: Callable[..., time.struct_time]) -> FieldPlan:
    # The zone is part of the key: a plan caches the offset of the current
    # second, and a formatter made after time.tzset() must not inherit it.
    key = (fmt.key(), converter, time.tzname, time.timezone, time.altzone)
    with PLANS_LOCK:  # once per formatter and handler: callers' threads and senders may race here
        number = _PLAN_NUMBERS.get(key)
        if number is None:
            number = _PLAN_NUMBERS[key] = len(_PLANS)
            _PLANS.append(FieldPlan(fmt, converter, number))
        return _PLANS[number]


# A record on its way: a line, or for the daemon to render a pair (plan
# number, its field values packed by msgpack: the bytes the batch frame
# carries). Plain: the cyclic GC untracks such a tuple the first time it
# sees it, so the thousands of records in flight in a burst never make the
# app's full collections longer or more frequent (holding the FieldPlan,
# lists or nested tuples made records survive into the oldest generation:
# 5-6 full collections of 20-70 ms each per 200,000 records). Packed once,
# a record is never built again to encode a batch: building each batch's
# records as tuples cost a young collection per batch and 1.5 µs per record.
Item = Union[str, Tuple[Any, ...]]

_PACKERS = threading.local()  # a msgpack Packer per thread: one is not thread-safe, a new one per call is slow


def pack(value: Any) -> bytes:
    """msgpack.packb(value), with this thread's Packer."""
    try:
        packer = _PACKERS.packer
    except AttributeError:
        packer = _PACKERS.packer = msgpack.Packer()
    return packer.pack(value)  # type: ignore[no-any-return]


def plan_of(item: Tuple[Any, ...]) -> FieldPlan:
    return _PLANS[item[0]]


def values_of(item: Tuple[Any, ...]) -> List[Any]:
    """An item's field values as the daemon decodes them (lists; the time as one list)."""
    return msgpack.unpackb(item[1])  # type: ignore[no-any-return]


def packed_records(plan: FieldPlan, items: Sequence[Item]) -> List[bytes]:
    """A batch's records, packed, for a daemon rendering ``plan``'s format:
    items in flight as they are; lines, and items of another plan, rendered
    here."""
    number = plan.number
    return [i[1] if type(i) is not str and i[0] == number else pack(to_line(i)) for i in items]  # type: ignore[misc]


def to_line(item: Item) -> str:
    """The line of an item, rendered here when the daemon will not (fallback,
    a daemon speaking protocol 1): the same text the daemon would write."""
    if type(item) is str:
        return item  # type: ignore[return-value]
    # As lists, as the daemon decodes them: a render error line shows them.
    return protocol.render_records(plan_of(item).format, [values_of(item)])[0]  # type: ignore[arg-type]


def record_of(prepared: Any) -> logging.LogRecord:
    """The LogRecord of a prepared or frozen record (for handleError and dating warnings)."""
    if type(prepared[0]) is int:
        return _PLANS[prepared[0]].record(prepared[4:], prepared[1], prepared[2], prepared[3])
    return prepared[0]  # type: ignore[no-any-return]


def to_lines(items: Sequence[Item]) -> List[str]:
    if all(type(i) is str for i in items):
        return items  # type: ignore[return-value]
    return [to_line(i) for i in items]


class Renderer:
    """Turns LogRecords into the lines written to the file, or, for a
    daemon that renders (``fields`` on), into the values it renders from."""

    def __init__(self, handler: CLHHandler) -> None:
        self.handler = handler
        self.fields = False  # set while a daemon speaking protocol 2 is in use
        self.limit = RECORD_LIMIT
        self._plan: Tuple[Any, Optional[FieldPlan]] = (None, None)  # (formatter, its plan)

    def prepare(self, record: logging.LogRecord) -> Tuple[logging.LogRecord, str]:
        """Caller's thread: freeze what may change later, nothing more.

        The message is merged with its arguments now (they may be mutated after
        the call) and an exception is rendered now (tracebacks do not travel);
        the rest of formatting happens on the sender.
        """
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter().formatException(record.exc_info)
        return record, record.getMessage()

    def freeze(self, record: logging.LogRecord) -> Any:
        """Caller's thread, for queued records: ``prepare``, and while the
        daemon renders, a tuple of the record's values instead:
        ``(plan number, message, created, msecs, *own values)``.

        The LogRecord is then freed at once: records waiting in a queue of
        thousands would otherwise survive into the GC's oldest generation and
        make the app's full collections run (6 per 200,000 records in a
        flood, each one over the whole heap of the app). The tuple is flat
        on purpose: the collector untracks a tuple of plain values the first
        time it sees one, but a tuple holding another tuple only if it sees
        the inner one first, and for a queued item it sees the outer one
        first; nested, the queued items went on into the oldest generation.
        """
        d = record.__dict__
        if d.get("exc_info") or d.get("exc_text") or d.get("stack_info"):
            return self.prepare(record)
        message = record.getMessage()
        if self.fields:
            known, plan = self._plan  # the hot path: _current_plan() inlined
            if known is not (self.handler.formatter or logging._defaultFormatter):  # type: ignore[attr-defined]
                plan = self._current_plan()
            if plan is not None and type(d.get("created")) is float:
                own = plan.own_values(d)
                if own is not None:
                    return (plan.number, message, d["created"], d.get("msecs"), *own)
        return record, message

    def _current_plan(self) -> Optional[FieldPlan]:
        formatter = self.handler.formatter or logging._defaultFormatter  # type: ignore[attr-defined]
        known, plan = self._plan
        if known is not formatter:
            plan = FieldPlan.for_formatter(formatter, self.handler)
            self._plan = (formatter, plan)
        return plan

    def render(self, item: Any) -> Item:
        """Sender: the field values for the daemon, when it renders this
        formatter's lines; else the wrapped handler's formatter on a frozen copy."""
        if type(item[0]) is int:  # frozen by freeze()
            frozen_plan = _PLANS[item[0]]
            if self.fields:
                flight = frozen_plan.flight(item, self.limit)
                if flight is not None:
                    return flight
            return self.handler.format(frozen_plan.record(item[4:], item[1], item[2], item[3]))
        record, message = item
        if self.fields:
            plan = self._current_plan()
            if plan is not None:
                flight = plan.flight_of(record, message, self.limit)
                if flight is not None:
                    return flight
        # A copy whose message is frozen. exc_info stays: a custom formatter
        # may read it (a JSON one, say); the stock one uses the exc_text
        # prepare() made, as it would have made it itself.
        frozen = logging.LogRecord.__new__(logging.LogRecord)
        frozen.__dict__.update(record.__dict__)
        frozen.msg, frozen.args = message, None
        return self.handler.format(frozen)

    def render_line(self, item: Tuple[logging.LogRecord, str]) -> str:
        """Always a line (rendered here)."""
        return to_line(self.render(item))

    def render_now(self, record: logging.LogRecord) -> Item:
        """Both stages at once, for records written before emit() returns."""
        return self.render(self.prepare(record))

    def _formatter(self) -> logging.Formatter:
        return self.handler.formatter or logging.Formatter()


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
