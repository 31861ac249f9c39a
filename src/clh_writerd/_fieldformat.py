"""Daemon-side rendering: a stock ``logging.Formatter`` as plain data.

``FieldFormat`` holds what a stock formatter's output depends on (style,
format string, ``datefmt``, ``default_time_format``,
``default_msec_format``) and renders a record sent as a list of field
values to the same line the formatter would have made. Both sides use it:
the daemon to render what clients send, a client to render the same values
itself when they go through its fallback instead.

Only what cannot run client-chosen code is accepted (``check_*`` below):
plain field names (no attribute access or indexing in ``{}`` formats),
bounded widths and precisions, no nested replacement fields, and
``strftime`` directives without a width or ``%s`` (which reads the daemon's
own time zone). Anything else is refused with ``ValueError``; the client
then renders with its own formatter, the way it always did.

The time of a record travels as ``[sec, msecs, gmtoff, isdst, zone]``: the
whole seconds of ``created``, ``record.msecs``, and the client's
``converter(sec)`` offset, DST flag and zone name, so the daemon reproduces
the client's local time whatever its own time zone is.
"""

import operator
import re
import string
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_ASCII_CHECK = hasattr(str, "isascii")  # Python 3.6 (thread client) has no str.isascii: encode there.


def text_size(value: str) -> int:
    """The UTF-8 size of ``value`` on the wire (ASCII needs no encoding to tell)."""
    if _ASCII_CHECK and value.isascii():
        return len(value)
    return len(value.encode("utf-8", "surrogatepass"))

STYLES = ("%", "{", "$")
MAX_FORMAT_CHARS = 4096
MAX_DATEFMT_CHARS = 256
MAX_FIELDS = 64
MAX_ZONE_CHARS = 32
# Per field occurrence, what a number (or None/bool) may expand to with a
# width and precision of at most 999, and how much a string may grow
# (repr escapes, UTF-8).
NUMBER_BOUND = 2100
STRING_FACTOR = 10
PAD_BOUND = 1000
# Values the daemon can reproduce exactly: msgpack keeps their type.
VALUE_TYPES = (str, int, float, bool, type(None))
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
TIME_FIELD = "asctime"

_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_NAME_RE = re.compile(_NAME + r"\Z")
# Every '%' of a %-style format: '%%' or '%(name)<flags><width><.prec><type>'.
# A '%' that matches only the last alternative makes the format refused.
_PERCENT = re.compile(r"%(?:%|\((" + _NAME + r")\)[#0\- +]*\d{0,3}(?:\.\d{0,3})?([diouxXeEfFgGcrsa])|)")
# A {}-style format spec without nested fields, locale ('n') or a width > 999.
_SPEC = re.compile(r"(?:[^{}]?[<>=^])?[+\- ]?#?0?\d{0,3}[,_]?(?:\.\d{0,3})?[bcdeEfFgGosxX%]?\Z")
# strftime directives: optional glibc flag, no width, no %s / %+.
_STRFTIME = re.compile(r"%(?:[_\-0^#]?[EO]?[aAbBcCdDeFgGhHIjmMnpPrRStTuUVwWxXyYzZ%]|)")
# default_msec_format: exactly '%s' then one integer conversion, e.g. '%s,%03d'.
_MSEC = re.compile(r"(?:[^%]|%%){0,16}%s(?:[^%]|%%){0,16}%0?\d?d(?:[^%]|%%){0,16}\Z")


class RecordTooLarge(ValueError):
    """A record whose rendered line may exceed the limit."""


def _check_str(value: Any, what: str, limit: int) -> str:
    if type(value) is not str or len(value) > limit or "\x00" in value:
        raise ValueError(f"{what} must be a string of at most {limit} characters without NUL")
    return value


def fields_of(style: str, fmt: str) -> List[str]:
    """Every field ``fmt`` refers to, one entry per occurrence, in order.
    Raises ValueError for anything but plain names and safe specs."""
    _check_str(fmt, "the format", MAX_FORMAT_CHARS)
    names: List[str] = []
    if style == "%":
        for m in _PERCENT.finditer(fmt):
            if m.group(0) == "%%":
                continue
            if m.group(1) is None:
                raise ValueError(f"unsupported %-conversion at {m.start()}")
            names.append(m.group(1))
    elif style == "{":
        for _, name, spec, conversion in string.Formatter().parse(fmt):
            if name is None:
                continue
            if not _NAME_RE.match(name):
                raise ValueError(f"field {name!r} is not a plain name")
            if conversion not in (None, "r", "s", "a") or not _SPEC.match(spec or ""):
                raise ValueError(f"unsupported conversion or format spec for {name!r}")
            names.append(name)
    elif style == "$":
        for m in string.Template.pattern.finditer(fmt):
            if m.group("invalid") is not None:
                raise ValueError(f"invalid placeholder at {m.start()}")
            name = m.group("named") or m.group("braced")
            if name is not None:
                if not _NAME_RE.match(name):
                    raise ValueError(f"field {name!r} is not a plain name")
                names.append(name)
    else:
        raise ValueError(f"style must be one of {STYLES}")
    if len(names) > MAX_FIELDS:
        raise ValueError(f"more than {MAX_FIELDS} fields")
    return names


def check_time_format(fmt: str, what: str) -> str:
    _check_str(fmt, what, MAX_DATEFMT_CHARS)
    for m in _STRFTIME.finditer(fmt):
        if len(m.group(0)) == 1:
            raise ValueError(f"{what}: unsupported strftime directive at {m.start()}")
    return fmt


class FieldFormat:
    """A validated stock-formatter description; renders field lists."""

    __slots__ = ("style", "fmt", "datefmt", "tfmt", "mfmt", "fields", "occurrences", "uses_time", "_base", "_most",
                 "_time", "_wire", "_template", "_positional", "_timed", "_timed_mfmt")

    def __init__(self, style: str, fmt: str, datefmt: Optional[str], tfmt: str, mfmt: Optional[str]) -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}")
        names = fields_of(style, fmt)
        self.style, self.fmt = style, fmt
        self.datefmt = None if datefmt in (None, "") else check_time_format(datefmt, "datefmt")
        self.tfmt = check_time_format(tfmt, "default_time_format")
        if mfmt in (None, ""):
            self.mfmt: Optional[str] = None
        else:
            _check_str(mfmt, "default_msec_format", 64)
            if not _MSEC.match(mfmt):
                raise ValueError("default_msec_format must be '%s' then one %d conversion")
            self.mfmt = mfmt
        # The values travel once per distinct field: the record's own
        # attributes in first-use order, then message, then asctime (the
        # client appends the two it computes).
        distinct = list(dict.fromkeys(names))
        tail = [n for n in ("message", TIME_FIELD) if n in distinct]
        self.fields: Tuple[str, ...] = tuple([n for n in distinct if n not in tail] + tail)
        self.occurrences: Dict[str, int] = {n: names.count(n) for n in self.fields}
        self.uses_time = TIME_FIELD in self.fields
        # The bound (check_records, bound_values): every value counted as if it occurred as often as the most
        # frequent field (one multiplier: one cheap loop per record).
        self._most = max(self.occurrences.values(), default=0)
        self._base = len(fmt) * 4 + sum(self.occurrences.values()) * PAD_BOUND
        if self.uses_time:
            self._base += self.occurrences[TIME_FIELD] * STRING_FACTOR * MAX_DATEFMT_CHARS * 8
        self._time: Tuple[Any, str] = (None, "")  # (key, text): one attribute, swapped whole (threads)
        self._template = string.Template(fmt) if style == "$" else None
        self._positional = _positional(fmt, self.fields) if style == "%" else None
        # What ``lines`` renders a %-style format with the time by: with the
        # stock msecs (no datefmt, a default_msec_format) the msecs format
        # inlined into the line's format where it can be (one ``%`` per
        # record), else the positional format and the msecs applied apart.
        self._timed = self._positional if style == "%" and self.uses_time else None
        self._timed_mfmt = self.mfmt if self.datefmt is None else None
        if self._timed is not None and self._timed_mfmt is not None:
            inlined = _positional(fmt, self.fields, self._timed_mfmt)
            if inlined is not None:
                self._timed, self._timed_mfmt = inlined, None
        self._wire = {"style": style, "fmt": fmt, "datefmt": self.datefmt, "tfmt": tfmt, "mfmt": self.mfmt}

    @classmethod
    def from_wire(cls, spec: Any) -> "FieldFormat":
        if type(spec) is not dict or set(spec) != {"style", "fmt", "datefmt", "tfmt", "mfmt"}:
            raise ValueError("a format is a map of style, fmt, datefmt, tfmt, mfmt")
        return cls(spec["style"], spec["fmt"], spec["datefmt"], spec["tfmt"], spec["mfmt"])

    def wire(self) -> Dict[str, Any]:
        return self._wire

    def key(self) -> Tuple[Any, ...]:
        return (self.style, self.fmt, self.datefmt, self.tfmt, self.mfmt)

    # -- checks both sides make ----------------------------------------------
    def check_records(self, records: Sequence[Any], limit: int) -> None:
        """Check every record of a batch the way the daemon must before it
        renders any: a record is a line (``str``, rendered by the client) or
        one value per field, each of a type the daemon reproduces exactly,
        the time as ``check_time`` wants it, and a bound of the rendered
        line's UTF-8 size within ``limit``. Raises ValueError, or
        RecordTooLarge for the bound.

        One loop for the batch, no call per record: this is the daemon's
        per-record cost on the fields path. The time is checked whole once
        per distinct (sec, gmtoff, isdst, zone), as ``_asctime`` caches it:
        a batch's records mostly share their second."""
        n = len(self.fields)
        uses_time = self.uses_time
        base, most = self._base, self._most
        seen: Any = None  # the time last checked whole
        for record in records:
            if type(record) is not list:
                if type(record) is str:
                    continue
                raise ValueError("a record must be a string or a list")
            if len(record) != n:
                raise ValueError(f"a record has {len(record)} values, the format {n} fields")
            chars = others = lists = 0
            # bound_values' per-value check, inlined (and taking the time
            # list): this loop runs for every value the daemon receives.
            for value in record:
                kind = type(value)
                if kind is str:
                    chars += len(value)
                elif kind is int:
                    if not MIN_INT <= value <= MAX_INT:
                        raise ValueError("an int value is out of range")
                    others += 1
                elif kind is float or kind is bool or value is None:
                    others += 1
                elif kind is list:
                    lists += 1
                else:
                    raise ValueError(f"a value of type {kind.__name__}")
            if uses_time:
                t = record[-1]
                if type(t) is not list or len(t) != 5:
                    raise ValueError("asctime travels as [sec, msecs, gmtoff, isdst, zone]")
                msecs = t[1]
                if (type(msecs) is not float and type(msecs) is not int) or not 0 <= msecs < 1000:
                    raise ValueError("msecs out of range")
                if (seen is None or t[0] != seen[0] or t[2] != seen[2] or t[3] != seen[3] or t[4] != seen[4]
                        or type(t[0]) is not int or type(t[2]) is not int or type(t[3]) is not int):
                    check_time(t)
                    seen = t
                lists -= 1
            if lists:
                raise ValueError("a value of type list")
            if base + most * (STRING_FACTOR * chars + NUMBER_BOUND * others) > limit:
                raise RecordTooLarge(f"a record may render to more than {limit} bytes")

    def quick_bound(self, packed_size: int, count: int) -> int:
        """At least the bound (``bound_values``) of ``count`` values (no time value) whose msgpack
        takes ``packed_size`` bytes: no string has more characters than the
        packing has bytes, and no more than ``count`` are numbers. One sum
        instead of a loop; far from tight, so a record over the limit by this
        bound is measured exactly."""
        return self._base + self._most * (STRING_FACTOR * packed_size + NUMBER_BOUND * count)

    def bound_values(self, values: Sequence[Any], text: Optional[str] = None) -> int:
        """The bound of ``values`` (no time value), and of the str ``text``
        as one more value if given: a client's frozen record is measured from
        its own values and message without copying them."""
        chars = others = 0
        for value in values:
            kind = type(value)
            if kind is str:
                chars += len(value)
            elif kind is int:
                if not MIN_INT <= value <= MAX_INT:
                    raise ValueError("an int value is out of range")
                others += 1
            elif kind is float or kind is bool or value is None:
                others += 1
            else:
                raise ValueError(f"a value of type {kind.__name__}")
        if text is not None:
            if type(text) is not str:
                raise ValueError(f"a value of type {type(text).__name__}")
            chars += len(text)
        return self._base + self._most * (STRING_FACTOR * chars + NUMBER_BOUND * others)

    # -- rendering -------------------------------------------------------------
    def render(self, values: Sequence[Any]) -> str:
        """The line the client's formatter would have made (exceptions as it would raise them)."""
        if self._positional is not None:  # %-style without a dict per record
            fmt, pick = self._positional
            if self.uses_time:
                values = [*values[:-1], self._asctime(values[-1])]
            return fmt % pick(values)  # type: ignore[no-any-return]
        d = dict(zip(self.fields, values))
        if self.uses_time:
            d[TIME_FIELD] = self._asctime(values[-1])
        if self.style == "{":
            return self.fmt.format(**d)
        assert self._template is not None
        return self._template.substitute(**d)

    def lines(self, records: Sequence[Any], failed: Callable[[Exception, Any], str]) -> List[str]:
        """Every record of a batch as its line: a ``str`` as it is (the
        client rendered it), values as ``render`` renders them (the same
        text and errors; a %-style format with the time in one loop of its
        own); a record the format cannot render becomes what
        ``failed(exc, values)`` returns."""
        out: List[str] = []
        append = out.append
        if self._timed is None:
            render = self.render
            for record in records:
                if type(record) is str:
                    append(record)
                    continue
                try:
                    append(render(record))
                except Exception as exc:
                    append(failed(exc, record))
            return out
        # %-style with the time, the commonest stock format, inlined: this
        # loop is the daemon's per-record cost of rendering. The stamp of a
        # second is made once (``_stamp``); the time is the last value, and
        # its msecs go one past it, where an inlined msecs format reads them.
        fmt, pick = self._timed
        mfmt = self._timed_mfmt
        last: Any = None
        text = ""
        for record in records:
            if type(record) is str:
                append(record)
                continue
            try:
                t = record[-1]
                if last is None or t[0] != last[0] or t[2] != last[2] or t[3] != last[3] or t[4] != last[4]:
                    text = self._stamp(t)
                    last = t
                values = list(record)  # a client may render a tuple
                values[-1] = text if mfmt is None else mfmt % (text, t[1])
                values.append(t[1])
                append(fmt % pick(values))
            except Exception as exc:
                append(failed(exc, record))
        return out

    def _asctime(self, t: Sequence[Any]) -> str:
        text = self._stamp(t)
        if self.datefmt is None and self.mfmt is not None:
            return self.mfmt % (text, t[1])
        return text

    def _stamp(self, t: Sequence[Any]) -> str:
        """``datefmt`` (or ``default_time_format``) of the time's second."""
        sec, _, gmtoff, isdst, zone = t
        key = (sec, gmtoff, isdst, zone)
        cached_key, text = self._time
        if key != cached_key:
            tm = time.gmtime(sec + gmtoff)
            st = time.struct_time(tuple(tm)[:8] + (isdst, zone, gmtoff))  # type: ignore[arg-type]
            text = time.strftime(self.datefmt or self.tfmt, st)
            self._time = (key, text)  # one strftime per second
        return text


Positional = Tuple[str, Callable[[Sequence[Any]], Tuple[Any, ...]]]


def _positional(fmt: str, fields: Sequence[str], mfmt: Optional[str] = None) -> Optional[Positional]:
    """A validated %-format as positional conversions, and what picks their
    values in order: ``"%(b)s %(a)5d" % {...}`` is ``"%s %5d" % (b, a)``,
    the same text and the same errors, without a dict per record.

    With ``mfmt`` (a checked default_msec_format such as ``'%s,%03d'``),
    every ``%(asctime)s`` becomes ``mfmt`` itself, reading the stamp where
    the time is and the msecs one position past the fields: ``%s`` of
    ``mfmt % (stamp, msecs)`` is that text, made by the line's own ``%``.
    None then if an asctime conversion has flags, a width or a precision."""
    index = {name: i for i, name in enumerate(fields)}
    order: List[int] = []
    plain = True

    def positional(m: "re.Match[str]") -> str:
        nonlocal plain
        if m.group(0) == "%%":
            return "%%"
        name = m.group(1)
        if mfmt is not None and name == TIME_FIELD:
            plain = plain and m.group(0) == "%(asctime)s"
            order.extend((index[name], len(fields)))
            return mfmt
        order.append(index[name])
        return "%" + m.group(0)[len(name) + 3:]  # drop "(name)"

    text = _PERCENT.sub(positional, fmt)
    if not plain:
        return None
    if len(order) == 1:
        only = order[0]
        return text, lambda values: (values[only],)
    if not order:
        return text, lambda values: ()
    return text, operator.itemgetter(*order)


def check_time(t: Any) -> None:
    """``[sec, msecs, gmtoff, isdst, zone]`` as a client sends it."""
    if type(t) is not list or len(t) != 5:
        raise ValueError("asctime travels as [sec, msecs, gmtoff, isdst, zone]")
    sec, msecs, gmtoff, isdst, zone = t
    if type(sec) is not int or not 0 <= sec <= 2**37:
        raise ValueError("sec out of range")
    if type(msecs) not in (int, float) or not 0 <= msecs < 1000:
        raise ValueError("msecs out of range")
    if type(gmtoff) is not int or not -86400 < gmtoff < 86400:
        raise ValueError("gmtoff out of range")
    if type(isdst) is not int or isdst not in (-1, 0, 1):
        raise ValueError("isdst out of range")
    _check_str(zone, "zone", MAX_ZONE_CHARS)
