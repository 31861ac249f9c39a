"""Field plans: what a queued record keeps so that the daemon renders its
line (a stock formatter's format, the record's values), and the helpers
that turn kept items back into records and lines.

An item is a rendered line (``str``) or a tuple whose first element is its
``FieldPlan`` (``plan_of``) and whose second is its packed values.
"""

import locale
import logging
import operator
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import msgpack

from .. import protocol
from .._fieldformat import TIME_FIELD, FieldFormat

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
        self.number = number  # its index in PLANS: what an Item names it by
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
PLANS: List[FieldPlan] = []
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
            number = _PLAN_NUMBERS[key] = len(PLANS)
            PLANS.append(FieldPlan(fmt, converter, number))
        return PLANS[number]


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
    return PLANS[item[0]]


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
        return PLANS[prepared[0]].record(prepared[4:], prepared[1], prepared[2], prepared[3])
    return prepared[0]  # type: ignore[no-any-return]


def to_lines(items: Sequence[Item]) -> List[str]:
    if all(type(i) is str for i in items):
        return items  # type: ignore[return-value]
    return [to_line(i) for i in items]


