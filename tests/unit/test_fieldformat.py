"""Daemon-side rendering (issue 16): the daemon's line is byte for byte the
client formatter's line.

The property test builds a stock ``logging.Formatter`` from generated format
strings (all three styles, widths, conversions, unicode literals), a
``datefmt`` or the default time/msec formats, a localtime or gmtime
converter, and a record created near a DST change with unicode messages and
``extra=`` fields. The client side runs under one ``TZ``: the formatter's
own line, and the field values through the real wire (``encode_batch`` ->
``decode_request``). The daemon side renders under another ``TZ``.
"""

import gc
import logging
import os
import sys
import threading
import time
import weakref

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clh_writerd import protocol
from clh_writerd._fieldformat import FieldFormat
from clh_writerd.client._plans import FieldPlan
from clh_writerd.client._items import ItemMaker
from clh_writerd.client._plans import plan_of as plan_of_item
from clh_writerd.client._plans import to_line, values_of

ZONES = ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "UTC")
# DST changes (UTC epochs): Berlin 2026-03-29 01:00 and 2026-10-25 01:00,
# New York 2026-03-08 07:00 and 2026-11-01 06:00, Lord Howe 2026-04-04 15:00.
TRANSITIONS = (1774746000, 1792890000, 1772953200, 1793512800, 1775314800)
CLIENT = protocol.ClientId("host", 1, "prog", "s" * 32)

STR_FIELDS = ("levelname", "name", "message", "funcName", "module", "user", "threadName")
NUM_FIELDS = ("process", "lineno", "levelno", "msecs", "created", "relativeCreated", "count", "ratio")
PERCENT_STR = ("s", "r", "a", "-8s", "10s", ".3s", "-12.5s")
PERCENT_NUM = ("s", "d", "5d", "-6d", ".3f", "010.2f", "r", "e", "x")
BRACE_STR = ("", "!r", "!a", ":>10", ":<5", ":^7", ":*^9", ":.4")
BRACE_NUM = ("", ":>8", ":.3f", ":+.2e", "!s", ":010.3f", ":,")
DATEFMTS = (None, "%Y-%m-%d %H:%M:%S", "%d/%b/%Y:%H:%M:%S %z", "%H:%M:%S %Z", "%c", "%j %U %w %a %A %B %p",
            "%Y-%m-%dT%H:%M:%S%z", "%x %X", "Zeit: %H\u00e4%M \u65e5")
MSEC_FORMATS = ("%s,%03d", "%s.%03d", None)
literal = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="%{}$\x00"), max_size=6)


@st.composite
def formats(draw):
    style = draw(st.sampled_from(("%", "{", "$")))
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        parts.append(draw(literal))
        name = draw(st.sampled_from(("asctime",) + STR_FIELDS + NUM_FIELDS))
        numeric = name in NUM_FIELDS
        if style == "%":
            spec = draw(st.sampled_from(PERCENT_NUM if numeric else PERCENT_STR))
            if spec in ("d", "5d", "-6d", "x") and name in ("msecs", "created", "relativeCreated", "ratio"):
                spec = "d" if spec != "x" else "s"  # %d of a float is fine; %x is not
            parts.append(f"%({name}){spec}")
        elif style == "{":
            spec = draw(st.sampled_from(BRACE_NUM if numeric else BRACE_STR))
            parts.append("{" + name + spec + "}")
        else:
            parts.append(draw(st.sampled_from(("${%s}" % name, "$%s " % name))))
    parts.append(draw(literal))
    return style, "".join(parts)


def set_tz(zone):
    os.environ["TZ"] = zone
    time.tzset()


@pytest.fixture
def restore_tz():
    before = os.environ.get("TZ")
    yield
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


def make_record(created, message, user, count, ratio):
    record = logging.LogRecord("app.\u00fcser", logging.INFO, "/x/mod.py", 42, "%s", (message,), None,
                               func="handle")
    record.created = created
    # What LogRecord.__init__ derives from created (3.8-3.12: float ms).
    record.msecs = int((created - int(created)) * 1000) + 0.0
    record.relativeCreated = (created - logging._startTime) * 1000
    record.user, record.count, record.ratio = user, count, ratio
    return record


def client_and_daemon(formatter, record, client_tz, daemon_tz):
    """(the formatter's line, the daemon's line) as the handler would produce them."""
    set_tz(client_tz)
    handler = logging.Handler()
    handler.setFormatter(formatter)
    items = ItemMaker(handler, fields=True)  # type: ignore[arg-type]
    own = ItemMaker(handler)  # type: ignore[arg-type]  # no daemon: the client renders every line
    prepared = items.prepare(record)
    expected = own.finish(prepared)  # the wrapped handler's formatter on the frozen record
    item = items.finish(prepared)
    assert type(item) is tuple, "a stock formatter's record must travel as field values"
    # What the fallback and the sync lane to a daemon that does not render write.
    assert to_line(item) == expected
    plan, values = plan_of_item(item), values_of(item)
    frozen = items.freeze(record)  # the thread handler's queued path
    if type(frozen[0]) is int:
        assert items.finish(frozen) == item
        assert own.finish(frozen) == expected
    frame = protocol.encode_batch(CLIENT, 1, "/tmp/x.log", {}, [values], format=plan.format)
    set_tz(daemon_tz)
    request = protocol.decode_request(frame)
    return expected, request.lines()[0]


@settings(max_examples=int(os.environ.get("RENDER_EXAMPLES", "300")), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fmt=formats(), datefmt=st.sampled_from(DATEFMTS), mfmt=st.sampled_from(MSEC_FORMATS),
       utc=st.booleans(), client_tz=st.sampled_from(ZONES), daemon_tz=st.sampled_from(ZONES),
       base=st.sampled_from(TRANSITIONS), offset=st.floats(-7200, 7200, allow_nan=False),
       message=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
       user=st.text(max_size=10), count=st.integers(-2**40, 2**40),
       ratio=st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_daemon_line_is_the_formatters_line(restore_tz, fmt, datefmt, mfmt, utc, client_tz, daemon_tz, base,
                                            offset, message, user, count, ratio):
    style, text = fmt
    # 3.8's formatTime applies default_msec_format even when it is None: the
    # client renders such a record itself (FieldPlan.for_formatter).
    assume(mfmt or sys.version_info >= (3, 9))
    formatter = logging.Formatter(text, datefmt=datefmt, style=style)
    formatter.default_msec_format = mfmt
    if utc:
        formatter.converter = time.gmtime
    record = make_record(base + offset, message, user.replace("\x00", ""), count, ratio)
    try:
        expected, line = client_and_daemon(formatter, record, client_tz, daemon_tz)
    except (TypeError, ValueError):  # e.g. %x of a float: the formatter raises too
        assume(False)
    assert line == expected


def test_local_time_is_the_clients_across_a_dst_change(restore_tz):
    """Negative control for the property: the daemon's own localtime would differ."""
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M %Z")
    record = make_record(TRANSITIONS[0] + 1800.5, "m", "u", 1, 0.5)
    expected, line = client_and_daemon(formatter, record, "Europe/Berlin", "America/New_York")
    assert line == expected == "03:30 CEST m"
    set_tz("America/New_York")
    assert logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M %Z").format(record) != expected


# -- what keeps client-side rendering --------------------------------------------
class Custom(logging.Formatter):
    pass


def plan_of(formatter):
    handler = logging.Handler()
    handler.setFormatter(formatter)
    return FieldPlan.for_formatter(formatter, handler)


@pytest.mark.parametrize("formatter", [
    Custom("%(message)s"),
    logging.Formatter("{0.__class__}", style="{"),
    logging.Formatter("{message.__class__.__mro__}", style="{"),
    logging.Formatter("{message[0]}", style="{"),
    logging.Formatter("{message:{width}}", style="{"),
    logging.Formatter("%(message)9999s"),
    logging.Formatter("%(message)s", datefmt="%s"),
    logging.Formatter("%(asctime)s", datefmt="%9999Y"),
], ids=["subclass", "positional-attr", "attr", "index", "nested", "width", "strftime-s", "strftime-width"])
def test_formatters_the_daemon_cannot_reproduce_render_client_side(formatter):
    assert plan_of(formatter) is None


def test_custom_converter_and_instance_overrides_render_client_side():
    f = logging.Formatter("%(asctime)s %(message)s")
    f.converter = lambda t: time.localtime(t)
    assert plan_of(f) is None
    g = logging.Formatter("%(message)s")
    g.format = lambda record: "x"
    assert plan_of(g) is None
    assert plan_of(logging.Formatter("%(message)s")) is not None


def test_a_queued_record_is_frozen_into_values_and_not_kept():
    """While the daemon renders, the caller's thread keeps only the record's
    values (plain ones), not the LogRecord: thousands queued in a burst would
    otherwise survive into the app's oldest GC generation."""
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(user)s %(message)s"))
    items = ItemMaker(handler, fields=True)  # type: ignore[arg-type]
    record = make_record(time.time(), "m", "u", 1, 0.5)
    record.msg, record.args = "m %s", ("arg",)
    alive = weakref.ref(record)
    frozen = items.freeze(record)
    expected = handler.format(record)
    del record
    assert alive() is None, "the queued item must not hold the LogRecord"
    assert frozen[1] == "m arg" and frozen[4:] == ("INFO", "app.\u00fcser", "u")
    assert ItemMaker(handler).finish(frozen) == expected  # type: ignore[arg-type]
    assert to_line(items.finish(frozen)) == expected
    # Not frozen: a traceback, or a value only the client can render.
    record = make_record(time.time(), "m", "u", 1, 0.5)
    record.user = object()
    assert items.freeze(record)[0] is record
    try:
        raise ValueError("boom")
    except ValueError:
        record = make_record(time.time(), "m", "u", 1, 0.5)
        record.exc_info = sys.exc_info()
    prepared = items.freeze(record)
    assert prepared[0] is record and "ValueError: boom" in record.exc_text


def test_queued_and_in_flight_records_are_untracked_by_the_first_collection():
    """A burst keeps thousands of records queued and in flight while the
    app's collector runs. Each must be a tuple the collector untracks the
    first time it sees it, whatever order it sees them in; a record still
    tracked after a young collection is moved on toward the oldest
    generation, and enough of those make the app run full collections
    (measured before: 5 per 200,000 records, 20-70 ms each)."""
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(user)s %(message)s"))
    items = ItemMaker(handler, fields=True)  # type: ignore[arg-type]
    queued, in_flight = [], []  # as the handler's deque and window hold them
    gc.collect()
    for n in range(200):
        frozen = items.freeze(make_record(time.time(), f"m{n}", "u", n, 0.5))
        queued.append(frozen)
        in_flight.append(items.finish(frozen))
    assert all(type(item[0]) is int for item in queued + in_flight), "the daemon renders these records"
    gc.collect(0)
    tracked = [item for item in queued + in_flight if gc.is_tracked(item)]
    assert not tracked, f"{len(tracked)} of 400 records still tracked after a young collection"
    # In flight a record is its packed values: encoding a batch builds nothing per record.
    assert all(type(item[1]) is bytes and len(item) == 2 for item in in_flight)


def test_plans_made_at_once_by_many_threads_each_get_their_own_format():
    """Items name their plan by number: two threads registering different
    formats at the same moment must not end up with one number."""
    handler = logging.Handler()
    barrier = threading.Barrier(8)
    results = []

    def register(t):
        barrier.wait()
        for n in range(40):
            text = f"%(message)s thread {t} format {n} {time.monotonic_ns()}"
            plan = FieldPlan.for_formatter(logging.Formatter(text), handler)
            results.append((text, plan_of_item((plan.number, (), 0)).format.fmt))

    threads = [threading.Thread(target=register, args=(t,)) for t in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: races show
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(results) == 320 and all(text == fmt for text, fmt in results)


def test_records_the_daemon_cannot_reproduce_render_client_side():
    plan = plan_of(logging.Formatter("%(message)s %(obj)s"))
    record = make_record(time.time(), "m", "u", 1, 0.5)
    record.obj = object()  # str() of an object: only the client can do it
    assert plan.flight_of(record, "m", 10**6) is None
    record.obj = "fine"
    assert values_of(plan.flight_of(record, "m", 10**6)) == ["fine", "m"]  # own attributes first, then message
    record.exc_text = "Traceback ..."
    assert plan.flight_of(record, "m", 10**6) is None
    del record.exc_text
    record.stack_info = "Stack ..."
    assert plan.flight_of(record, "m", 10**6) is None
    del record.obj  # a missing field: the formatter's own KeyError, client-side
    record.stack_info = None
    assert plan.flight_of(record, "m", 10**6) is None
    assert plan.flight_of(make_record(1.0, "x" * 1000, "u", 1, 0.5), "x" * 1000, 5000) is None  # too large
    # Not UTF-8 (a lone surrogate, from os.fsdecode()): msgpack cannot carry it.
    record = make_record(time.time(), "caf\udce9", "u", 1, 0.5)
    record.obj = "fine"
    assert plan.flight_of(record, "caf\udce9", 10**6) is None
    frozen = (plan.number, "caf\udce9", record.created, record.msecs, "fine")  # as ItemMaker.freeze makes it
    assert plan.flight(frozen, 10**6) is None
    assert plan.flight(frozen[:1] + ("café",) + frozen[2:], 10**6) is not None
    # A large record: over the quick bound, so measured exactly against the limit.
    big = frozen[:1] + ("x" * 30000,) + frozen[2:]
    exact = plan.format.bound_values(("fine",), "x" * 30000)
    assert plan.format.quick_bound(len(msgpack.packb(("fine", "x" * 30000))), 2) > exact
    assert plan.flight(big, exact) is not None
    assert plan.flight(big, exact - 1) is None


# -- the daemon refuses hostile formats and values -------------------------------
def _frame(fmt_map, records):
    return msgpack.packb({"v": 2, "type": "batch", "client": CLIENT._asdict(), "seq": 1,
                          "file": {"path": "/tmp/x.log", "options": {}}, "render": "fields",
                          "format": fmt_map, "records": records})


def _wire(style="%", fmt="%(message)s", datefmt=None, tfmt="%Y-%m-%d %H:%M:%S", mfmt="%s,%03d"):
    return {"style": style, "fmt": fmt, "datefmt": datefmt, "tfmt": tfmt, "mfmt": mfmt}


@pytest.mark.parametrize("fmt_map,records,code", [
    (_wire(style="{", fmt="{0.__class__.__init__.__globals__}"), [["x"]], protocol.E_MALFORMED),
    (_wire(style="{", fmt="{message.__class__}"), [["x"]], protocol.E_MALFORMED),
    (_wire(style="{", fmt="{message:>{message}}"), [["x"]], protocol.E_MALFORMED),
    (_wire(fmt="%(message)999999999s"), [["x"]], protocol.E_MALFORMED),
    (_wire(fmt="%s"), [["x"]], protocol.E_MALFORMED),
    (_wire(style="$", fmt="${message.__class__}"), [["x"]], protocol.E_MALFORMED),
    (_wire(fmt="%(asctime)s", datefmt="%0999999999Y"), [[[0, 0.0, 0, 0, "UTC"]]], protocol.E_MALFORMED),
    (_wire(fmt="%(asctime)s", mfmt="%(x)s"), [[[0, 0.0, 0, 0, "UTC"]]], protocol.E_MALFORMED),
    (_wire(), [[["nested"]]], protocol.E_MALFORMED),
    (_wire(), [["a", "b"]], protocol.E_MALFORMED),
    (_wire(), [[{"k": 1}]], protocol.E_MALFORMED),
    (_wire(fmt="%(asctime)s"), [[[0, 0.0, 10**6, 0, "UTC"]]], protocol.E_MALFORMED),
    (_wire(fmt="%(message)s" * 64), [["x" * 100000]], protocol.E_TOO_LARGE),
    ({"style": "%"}, [["x"]], protocol.E_MALFORMED),
    # The daemon checks a second's time whole once: a later record of the
    # same second with a wrong type or msecs is still refused.
    (_wire(fmt="%(asctime)s"), [[[5, 0.0, 0, 1, "X"]], [[5, 0.0, 0, True, "X"]]], protocol.E_MALFORMED),
    (_wire(fmt="%(asctime)s"), [[[5, 0.0, 0, 1, "X"]], [[5.0, 0.0, 0, 1, "X"]]], protocol.E_MALFORMED),
    (_wire(fmt="%(asctime)s"), [[[5, 0.0, 0, 1, "X"]], [[5, 1000, 0, 1, "X"]]], protocol.E_MALFORMED),
    (_wire(fmt="%(message)s %(asctime)s"), [["x", [5, 0.0, 0, 1, "X"]], [["y"], [5, 0.0, 0, 1, "X"]]],
     protocol.E_MALFORMED),
    (_wire(fmt="%(message)s %(asctime)s"), [["x", "not a time"]], protocol.E_MALFORMED),
    (_wire(), [["x"], ["x" * 100], 7], protocol.E_MALFORMED),
    ("%(message)s", [["x"]], protocol.E_MALFORMED),
])
def test_hostile_formats_and_values_are_refused(fmt_map, records, code):
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_request(_frame(fmt_map, records))
    assert info.value.code == code


def test_fields_need_version_2_and_lines_still_decode_as_version_1():
    frame = msgpack.loads(_frame(_wire(), [["x"]]))
    frame["v"] = 1
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_request(msgpack.packb(frame))
    assert info.value.code == protocol.E_MALFORMED
    old = protocol.encode_batch(CLIENT, 1, "/tmp/x.log", {}, ["a line"])
    assert msgpack.loads(old)["v"] == 1
    assert protocol.decode_request(old).lines() == ["a line"]


@pytest.mark.parametrize("line_fmt, datefmt, third", [
    # the msecs inlined into the line's own % (the stock case)
    ("%(asctime)s %(levelname)-8s %(message)s", None, "1970-01-01 01:16:41 CEST.000 INFO     record 2"),
    ("%(asctime)s 100%% %(asctime)s %(message)s", None,
     "1970-01-01 01:16:41 CEST.000 100% 1970-01-01 01:16:41 CEST.000 record 2"),
    # a width on asctime: the msecs applied apart; a datefmt: no msecs
    ("%(asctime)-33s|%(levelname)s %(message)s", None, "1970-01-01 01:16:41 CEST.000     |INFO record 2"),
    ("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S", "01:16:41 INFO record 2"),
])
def test_a_batch_renders_as_its_records_one_by_one_across_seconds_and_zones(line_fmt, datefmt, third):
    fmt = FieldFormat("%", line_fmt, datefmt, "%Y-%m-%d %H:%M:%S %Z", "%s.%03d")
    times = [[1000, 1.0, 0, 0, "UTC"], [1000, 999.5, 0, 0, "UTC"], [1001, 0.0, 3600, 1, "CEST"],
             [1001, 0.0, 0, 0, "UTC"], [1000, 7.0, 0, 0, "UTC"]]
    records = []
    for n, t in enumerate(times):
        values = {"levelname": "INFO", "message": f"record {n}", "asctime": t}
        records.append([values[name] for name in fmt.fields])
    records.append("a client's line")
    lines = protocol.render_records(fmt, records)
    assert lines == [fmt.render(r) for r in records[:-1]] + ["a client's line"]
    assert lines[2] == third
    assert protocol.decode_request(_frame(fmt.wire(), records)).lines() == lines


@pytest.mark.parametrize("line_fmt, values", [("%(n)d", ["not a number"]),
                                              ("%(asctime)s %(n)d", ["not a number", [5, 0.0, 0, 0, "UTC"]])])
def test_a_record_its_format_cannot_render_becomes_a_counted_line(line_fmt, values):
    fmt = FieldFormat("%", line_fmt, None, "%Y", "%s,%03d")
    errors = []
    lines = protocol.render_records(fmt, [values, "a line"], lambda: errors.append(1))
    assert lines[0].startswith(protocol.RENDER_ERROR_PREFIX) and "not a number" in lines[0]
    assert lines[1] == "a line" and errors == [1]
