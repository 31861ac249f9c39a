"""The wire contract: round trips, limits, option validation, hostile input.

Everything here runs ``protocol`` on real bytes; nothing is mocked. The fuzz
tests assert the one promise the daemon relies on: decoding untrusted bytes
raises ProtocolError with a stable code, and nothing else.
"""

import copy
import os
import socket
import types

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clh_writerd import protocol
from clh_writerd.protocol import (
    E_BAD_OPTIONS,
    E_MALFORMED,
    E_TOO_LARGE,
    E_UNKNOWN_TYPE,
    E_VERSION,
    ERROR_CODES,
    MAX_COUNTERS,
    MAX_FRAME_BYTES,
    MAX_INT,
    MAX_MAP_ENTRIES,
    MAX_NAME_CHARS,
    MAX_PATH_BYTES,
    MAX_RECORD_BYTES,
    MAX_RECORDS_PER_BATCH,
    ProtocolError,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies -------------------------------------------------------------
# st.text() never yields lone surrogates, so every string is valid UTF-8 on the wire.
names = st.text(max_size=40)
counter_ints = st.integers(min_value=0, max_value=MAX_INT)
client_ids = st.builds(
    protocol.ClientId,
    host=names,
    pid=counter_ints,
    program=names,
    session=names,
)
records = st.text(max_size=200)
paths = st.text(min_size=1, max_size=100).map(lambda s: "/var/log/" + s)

# Options a client may really send: every value inside the accepted range.
_rotating_options = {
    "maxBytes": st.integers(0, 1 << 44),
    "backupCount": st.integers(0, 1000),
    "use_gzip": st.booleans(),
    "encoding": st.sampled_from(["utf-8", "latin-1", "ascii", "utf-16"]),
    "chmod": st.integers(0, 0o7777),
    "umask": st.integers(0, 0o777),
    "newline": st.sampled_from(["", "\n", "\r", "\r\n"]),
    "terminator": st.text(min_size=1, max_size=4).filter(lambda s: "\x00" not in s),
    "unicode_error_policy": st.sampled_from(["ignore", "replace", "strict"]),
    "lock_file_directory": st.text(min_size=1, max_size=50).filter(lambda s: "\x00" not in s),
    "owner": st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=2),
}
_timed_options = {
    "when": st.sampled_from(protocol.WHEN_VALUES + ("midnight", "s", "w0")),
    "interval": st.integers(1, 10**7),
    "utc": st.booleans(),
}
valid_options = st.one_of(
    st.fixed_dictionaries({}, optional=_rotating_options),
    st.fixed_dictionaries({"when": _timed_options["when"]},
                          optional={**_rotating_options, "interval": _timed_options["interval"],
                                    "utc": _timed_options["utc"]}),
)
ids = counter_ints
counters = st.dictionaries(st.text(max_size=MAX_NAME_CHARS), counter_ints, max_size=MAX_COUNTERS)
# What a stats document may hold: msgpack scalars (no bin: the decoder refuses
# it), lists and string-keyed maps. NaN is left out only because NaN != NaN.
json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
ok_data = st.dictionaries(st.text(max_size=10), json_like, max_size=8)


def client() -> protocol.ClientId:
    return protocol.ClientId("host", 1234, "prog", "0123456789abcdef")


def code_of(fn, data) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(data)
    assert info.value.code in ERROR_CODES
    return info.value.code


def request_code(data: bytes) -> str:
    return code_of(protocol.decode_request, data)


def reply_code(data: bytes) -> str:
    return code_of(protocol.decode_reply, data)


# -- round trips ---------------------------------------------------------------
@FAST
@given(client_ids, ids, paths, valid_options, st.lists(records, max_size=20))
def test_batch_round_trip(cid, seq, path, options, recs):
    frame = protocol.encode_batch(cid, seq, path, options, recs)
    assert protocol.decode_request(frame) == protocol.Batch(cid, seq, path, options, "lines", recs)


@FAST
@given(client_ids, ids, paths, valid_options, records)
def test_sync_round_trip(cid, rid, path, options, record):
    frame = protocol.encode_sync(cid, rid, path, options, record)
    expected = protocol.SyncRecord(cid, rid, path, options, "lines", record)
    assert protocol.decode_request(frame) == expected


@FAST
@given(ids)
def test_stats_and_ping_round_trip(rid):
    assert protocol.decode_request(protocol.encode_stats_request(rid)) == protocol.StatsRequest(rid)
    assert protocol.decode_request(protocol.encode_ping(rid)) == protocol.Ping(rid)


def test_stats_and_ping_id_defaults_to_zero():
    assert protocol.decode_request(protocol.encode_ping()) == protocol.Ping(0)
    bare = msgpack.packb({"v": 1, "type": "stats"})
    assert protocol.decode_request(bare) == protocol.StatsRequest(0)


@FAST
@given(client_ids, counters, ids)
def test_report_round_trip(cid, counts, rid):
    frame = protocol.encode_report(cid, counts, rid)
    assert protocol.decode_request(frame) == protocol.Report(cid, rid, counts)


@FAST
@given(ids)
def test_ack_round_trip(seq):
    assert protocol.decode_reply(protocol.encode_ack(seq)) == protocol.Ack(seq)


@FAST
@given(ids, ok_data)
def test_ok_round_trip(rid, data):
    assert protocol.decode_reply(protocol.encode_ok(rid, data)) == protocol.Ok(rid, data)


def test_ok_without_data_has_an_empty_map():
    assert protocol.decode_reply(protocol.encode_ok(7)) == protocol.Ok(7, {})


@FAST
@given(st.sampled_from(ERROR_CODES), st.text(max_size=1000), st.none() | ids, st.none() | ids)
def test_error_round_trip(code, message, seq, rid):
    reply = protocol.decode_reply(protocol.encode_error(code, message, seq=seq, id=rid))
    # The message arrives with its control characters escaped (a client warns with it).
    assert reply == protocol.Error(code, protocol.printable(message), seq, rid)
    assert reply.retryable == (code in protocol.RETRYABLE_ERRORS)


def test_an_error_message_with_terminal_escapes_is_decoded_escaped():
    reply = protocol.decode_reply(protocol.encode_error("busy", "full\x1b[2J\nforged line\u202e"))
    assert reply.message == "full\\x1b[2J\\nforged line\\u202e" and "\x1b" not in reply.message


def test_a_frame_of_empty_arrays_is_refused_before_it_is_built():

    # The 8 MiB of empty arrays (626 MB and 2.5 s to decode before).
    inner = b"\xdc" + (20000).to_bytes(2, "big") + b"\x90" * 20000
    n = (protocol.MAX_FRAME_BYTES - 256) // len(inner)
    head = msgpack.packb({"v": 1, "type": "batch", "seq": 1, "render": "lines"})
    frame = bytes([head[0] + 1]) + head[1:] + msgpack.packb("records") + b"\xdc" + n.to_bytes(2, "big") + inner * n
    with pytest.raises(protocol.ProtocolError) as info:  # 0.02 s here
        protocol.decode_request(frame)
    # Stopped by the container count, after MAX_CONTAINERS arrays, not by the frame's end.
    assert info.value.code == protocol.E_TOO_LARGE and "max_containers" in info.value.message
    # A real batch of field values, 20,000 records of two arrays each, still decodes.
    records = [["m", [1, 2, 3, 4, 5]] for _ in range(protocol.MAX_RECORDS_PER_BATCH)]
    assert len(protocol._unpack(msgpack.packb({"v": 1, "records": records}), protocol.MAX_RECORDS_PER_BATCH,
                                max_containers=protocol.MAX_CONTAINERS)["records"]) == 20000


def test_error_message_is_cut_to_1000_characters():
    reply = protocol.decode_reply(protocol.encode_error(protocol.E_INTERNAL, "é" * 5000))
    assert reply.message == "é" * 1000


def test_only_busy_write_failed_and_shutting_down_are_retryable():
    retryable = {c for c in ERROR_CODES if protocol.Error(c, "").retryable}
    assert retryable == {protocol.E_BUSY, protocol.E_WRITE_FAILED, protocol.E_SHUTTING_DOWN}


def test_new_client_id_describes_this_process_and_decodes():
    a = protocol.new_client_id("p" * 1000)
    b = protocol.new_client_id("p" * 1000)
    assert a.host == socket.gethostname()[:MAX_NAME_CHARS]
    assert a.pid == os.getpid()
    assert a.program == "p" * MAX_NAME_CHARS
    assert a.session != b.session  # a fresh session each call (and so after fork)
    # The identity a client builds for itself must always pass the daemon's checks.
    frame = protocol.encode_batch(a, 1, "/x.log", {}, ["r"])
    assert protocol.decode_request(frame).client == a


def test_a_program_name_that_is_not_utf8_is_escaped():
    # os.fsdecode() of a script name with undecodable bytes: msgpack refuses lone surrogates.
    client = protocol.new_client_id("caf\udce9.py")
    assert client.program == "caf\\udce9.py"
    frame = protocol.encode_batch(client, 1, "/x.log", {}, ["r"])
    assert protocol.decode_request(frame).client == client


def test_default_endpoint(monkeypatch):
    monkeypatch.setenv("CLH_WRITERD_ENDPOINT", "tcp://127.0.0.1:5555")
    assert protocol.default_endpoint() == "tcp://127.0.0.1:5555"
    monkeypatch.delenv("CLH_WRITERD_ENDPOINT")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/42")
    assert protocol.default_endpoint() == "ipc:///run/user/42/clh-writerd/writerd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert protocol.default_endpoint() == f"ipc:///tmp/clh-writerd-{os.getuid()}/writerd.sock"


def test_options_key_ignores_order_and_is_hashable():
    a = {"maxBytes": 10, "owner": ["u", "g"], "use_gzip": True}
    b = {"use_gzip": True, "owner": ["u", "g"], "maxBytes": 10}
    assert protocol.options_key(a) == protocol.options_key(b)
    assert len({protocol.options_key(a), protocol.options_key(b)}) == 1
    assert protocol.options_key(a) != protocol.options_key({**a, "maxBytes": 11})


# -- limits -------------------------------------------------------------------
def batch(recs, path="/var/log/app.log", options=None, cid=None):
    return protocol.encode_batch(cid or client(), 1, path, options or {}, recs)


def test_frame_size_limit():
    # Seven records of 1 MiB fit in a frame; nine do not.
    near = "x" * (MAX_RECORD_BYTES - 64)
    assert len(protocol.decode_request(batch([near] * 7)).records) == 7
    assert request_code(batch([near] * 9)) == E_TOO_LARGE
    oversize = protocol.encode_ok(1, {"blob": "x" * (MAX_FRAME_BYTES)})
    assert len(oversize) > MAX_FRAME_BYTES
    assert reply_code(oversize) == E_TOO_LARGE


def test_records_per_batch_limit():
    full = protocol.decode_request(batch([""] * MAX_RECORDS_PER_BATCH))
    assert len(full.records) == MAX_RECORDS_PER_BATCH
    assert request_code(batch([""] * (MAX_RECORDS_PER_BATCH + 1))) == E_TOO_LARGE


def test_record_size_limit_counts_utf8_bytes():
    at_limit = "x" * MAX_RECORD_BYTES
    assert protocol.decode_request(batch([at_limit])).records == [at_limit]
    assert request_code(batch(["x" * (MAX_RECORD_BYTES + 1)])) == E_TOO_LARGE
    # Half as many characters, but each is two bytes in UTF-8.
    assert request_code(batch(["é" * (MAX_RECORD_BYTES // 2 + 1)])) == E_TOO_LARGE
    sync = protocol.encode_sync(client(), 1, "/a.log", {}, "x" * (MAX_RECORD_BYTES + 1))
    assert request_code(sync) == E_TOO_LARGE


def test_path_limit_counts_utf8_bytes():
    ok = "/" + "a" * (MAX_PATH_BYTES - 1)
    assert protocol.decode_request(batch(["r"], path=ok)).path == ok
    assert request_code(batch(["r"], path=ok + "a")) == E_TOO_LARGE
    assert request_code(batch(["r"], path="/" + "é" * (MAX_PATH_BYTES // 2))) == E_TOO_LARGE
    sync = protocol.encode_sync(client(), 1, ok + "a", {}, "r")
    assert request_code(sync) == E_TOO_LARGE


@pytest.mark.parametrize("field", ["host", "program", "session"])
def test_name_limit_counts_characters(field):
    at_limit = client()._replace(**{field: "é" * MAX_NAME_CHARS})
    assert protocol.decode_request(batch(["r"], cid=at_limit)).client == at_limit
    over = client()._replace(**{field: "a" * (MAX_NAME_CHARS + 1)})
    assert request_code(batch(["r"], cid=over)) == E_TOO_LARGE
    assert request_code(protocol.encode_report(over, {})) == E_TOO_LARGE


def test_counters_limits():
    at_limit = {f"c{i}": i for i in range(MAX_COUNTERS)}
    assert protocol.decode_request(protocol.encode_report(client(), at_limit)).counters == at_limit
    over = {f"c{i}": i for i in range(MAX_COUNTERS + 1)}
    assert request_code(protocol.encode_report(client(), over)) == E_TOO_LARGE
    way_over = {f"c{i}": i for i in range(MAX_MAP_ENTRIES + 1)}
    assert request_code(protocol.encode_report(client(), way_over)) == E_TOO_LARGE
    for bad in (-1, MAX_INT + 1, 1.5, "3", True, None):
        assert request_code(protocol.encode_report(client(), {"dropped": bad})) == E_MALFORMED


def test_counter_name_limit_is_too_large():
    frame = protocol.encode_report(client(), {"n" * (MAX_NAME_CHARS + 1): 1})
    assert request_code(frame) == E_TOO_LARGE


def test_map_entries_limit():
    options = {f"o{i}": 1 for i in range(MAX_MAP_ENTRIES + 1)}
    assert request_code(batch(["r"], options=options)) == E_TOO_LARGE
    top = {"v": 1, "type": "ping", **{f"k{i}": 0 for i in range(MAX_MAP_ENTRIES)}}
    assert request_code(msgpack.packb(top)) == E_TOO_LARGE


def test_integer_fields_are_bounded():
    assert protocol.decode_request(protocol.encode_ping(MAX_INT)) == protocol.Ping(MAX_INT)
    assert request_code(protocol.encode_ping(MAX_INT + 1)) == E_MALFORMED
    assert reply_code(protocol.encode_ack(MAX_INT + 1)) == E_MALFORMED
    assert request_code(msgpack.packb({"v": 1, "type": "ping", "id": -1})) == E_MALFORMED


# -- check_file_options ---------------------------------------------------------
GOOD_ROTATING = {
    "maxBytes": 1 << 20, "backupCount": 5, "use_gzip": True, "encoding": "utf-8", "chmod": 0o640,
    "umask": 0o022, "newline": "", "terminator": "\r\n", "unicode_error_policy": "replace",
    "lock_file_directory": "/var/lock/app", "owner": ["www-data", "adm"],
}
GOOD_TIMED = {"when": "midnight", "interval": 2, "utc": True, "backupCount": 7, "maxBytes": 0}


@pytest.mark.parametrize("options", [{}, GOOD_ROTATING, GOOD_TIMED, {"when": "W6"}, {"when": "s"}],
                         ids=["empty", "rotating", "timed", "weekly", "seconds"])
def test_check_file_options_accepts_good_options(options):
    assert protocol.check_file_options(types.MappingProxyType(options)) == options


@FAST
@given(valid_options)
def test_check_file_options_accepts_every_valid_option(options):
    assert protocol.check_file_options(options) == options


@pytest.mark.parametrize("name, value", [
    ("maxBytes", 0), ("maxBytes", 1 << 44), ("backupCount", 1000), ("chmod", 0o7777),
    ("umask", 0o777), ("terminator", "1234"), ("newline", "\n"),
])
def test_check_file_options_accepts_the_bounds(name, value):
    assert protocol.check_file_options({name: value}) == {name: value}


@pytest.mark.parametrize("options, culprit", [
    # unknown names, including real CLH arguments the daemon does not take
    ({"maxbytes": 10}, "maxbytes"),
    ({"mode": "w"}, "mode"),
    ({"delay": True}, "delay"),
    ({"keep_file_open": False}, "keep_file_open"),
    ({"atTime": "10:00"}, "atTime"),
    # wrong types; bool is an int subclass but never an int option
    ({"maxBytes": True}, "maxBytes"),
    ({"backupCount": False}, "backupCount"),
    ({"chmod": True}, "chmod"),
    ({"when": "H", "interval": True}, "interval"),
    ({"maxBytes": 1.5}, "maxBytes"),
    ({"maxBytes": "10"}, "maxBytes"),
    ({"use_gzip": 1}, "use_gzip"),
    ({"when": "H", "utc": 0}, "utc"),
    ({"encoding": None}, "encoding"),
    ({"terminator": 10}, "terminator"),
    ({"owner": "user:group"}, "owner"),
    ({"owner": ("user", "group")}, "owner"),
    # out of range
    ({"maxBytes": -1}, "maxBytes"),
    ({"maxBytes": (1 << 44) + 1}, "maxBytes"),
    ({"backupCount": -1}, "backupCount"),
    ({"backupCount": 1001}, "backupCount"),
    ({"chmod": 0o10000}, "chmod"),
    ({"umask": 0o1000}, "umask"),
    ({"when": "S", "interval": 0}, "interval"),
    ({"when": "S", "interval": 10**7 + 1}, "interval"),
    # strings: NUL, length
    ({"lock_file_directory": "/var/lock/\x00x"}, "lock_file_directory"),
    ({"lock_file_directory": "/" + "a" * MAX_PATH_BYTES}, "lock_file_directory"),
    # bad values
    ({"encoding": "no-such-codec"}, "encoding"),
    ({"when": "X"}, "when"),
    ({"when": "W7"}, "when"),
    ({"when": ""}, "when"),
    ({"interval": 5}, "interval"),
    ({"utc": True}, "utc"),
    ({"newline": "\t"}, "newline"),
    ({"terminator": ""}, "terminator"),
    ({"terminator": "12345"}, "terminator"),
    ({"unicode_error_policy": "surrogateescape"}, "unicode_error_policy"),
    ({"owner": ["user"]}, "owner"),
    ({"owner": ["user", "group", "other"]}, "owner"),
    ({"owner": ["", "group"]}, "owner"),
    ({"owner": ["user", 0]}, "owner"),
    ({"owner": ["u" * (MAX_NAME_CHARS + 1), "group"]}, "owner"),
])
def test_check_file_options_refuses(options, culprit):
    with pytest.raises(ProtocolError) as info:
        protocol.check_file_options(options)
    assert info.value.code == E_BAD_OPTIONS
    # The message is what an operator reads in the daemon log: it names the option.
    assert culprit in info.value.message


def test_check_file_options_refuses_a_codec_that_is_not_a_text_encoding():
    with pytest.raises(ProtocolError) as info:
        protocol.check_file_options({"encoding": "rot13"})
    assert info.value.code == E_BAD_OPTIONS


# -- malformed input: a fixed corpus -------------------------------------------
PING = protocol.encode_ping(3)
BATCH = protocol.encode_batch(client(), 5, "/var/log/app.log", {"maxBytes": 10}, ["a", "b"])

CORPUS = {
    "empty": (b"", E_MALFORMED),
    "truncated ping": (PING[:-1], E_MALFORMED),
    "truncated batch": (BATCH[: len(BATCH) // 2], E_MALFORMED),
    "trailing byte": (PING + b"\x00", E_MALFORMED),
    "two messages": (PING + PING, E_MALFORMED),
    "reserved 0xc1": (b"\xc1", E_MALFORMED),
    "reserved 0xc1 inside a map": (b"\x81\xa1v\xc1", E_MALFORMED),
    "deep nesting": (b"\x91" * 100000 + b"\x00", E_MALFORMED),
    "deep map nesting": (b"\x81\xa1k" * 50000 + b"\x00", E_MALFORMED),
    "array32 of 4G entries": (b"\xdd\xff\xff\xff\xff", E_TOO_LARGE),
    "map32 of 4G entries": (b"\xdf\xff\xff\xff\xff", E_TOO_LARGE),
    # msgpack sees a string body is missing before it compares the length with
    # max_str_len; either way nothing of that size is allocated.
    "str32 of 4G bytes, no body": (b"\xdb\xff\xff\xff\xff", E_MALFORMED),
    "invalid utf-8 string": (b"\xa2\xff\xfe", E_MALFORMED),
    "invalid utf-8 key": (b"\x81\xa2\xc3\x28\x01", E_MALFORMED),
    "non-map: array": (msgpack.packb([1, "ping"]), E_MALFORMED),
    "non-map: string": (msgpack.packb("ping"), E_MALFORMED),
    "non-map: nil": (msgpack.packb(None), E_MALFORMED),
    "non-map: int": (msgpack.packb(1), E_MALFORMED),
    "integer map key": (msgpack.packb({1: 1, "v": 1, "type": "ping"}), E_MALFORMED),
    "missing v": (msgpack.packb({"type": "ping"}), E_MALFORMED),
    "v is a string": (msgpack.packb({"v": "1", "type": "ping"}), E_MALFORMED),
    "v is true": (msgpack.packb({"v": True, "type": "ping"}), E_MALFORMED),
    "v is a float": (msgpack.packb({"v": 1.0, "type": "ping"}), E_MALFORMED),
    "v is 0": (msgpack.packb({"v": 0, "type": "ping"}), E_VERSION),
    "v is 3": (msgpack.packb({"v": 3, "type": "ping"}), E_VERSION),
    "v is -1": (msgpack.packb({"v": -1, "type": "ping"}), E_VERSION),
    "v is huge": (msgpack.packb({"v": 2**64 - 1, "type": "ping"}), E_VERSION),
}


@pytest.mark.parametrize("frame, code", list(CORPUS.values()), ids=list(CORPUS))
@pytest.mark.parametrize("decode", [protocol.decode_request, protocol.decode_reply],
                         ids=["request", "reply"])
def test_malformed_corpus(decode, frame, code):
    assert code_of(decode, frame) == code


@pytest.mark.parametrize("value", ["text", None, 7, [PING]])
def test_only_bytes_are_frames(value):
    assert request_code(value) == E_MALFORMED
    assert reply_code(value) == E_MALFORMED


def test_memoryview_frames_are_decoded():
    assert protocol.decode_request(memoryview(PING)) == protocol.Ping(3)


def test_unknown_message_types():
    assert request_code(msgpack.packb({"v": 1, "type": "shutdown"})) == E_UNKNOWN_TYPE
    assert request_code(msgpack.packb({"v": 1, "type": "ack", "seq": 1})) == E_UNKNOWN_TYPE
    assert reply_code(msgpack.packb({"v": 1, "type": "ping"})) == E_UNKNOWN_TYPE
    assert reply_code(msgpack.packb({"v": 1, "type": "batch"})) == E_UNKNOWN_TYPE
    assert request_code(msgpack.packb({"v": 1})) == E_MALFORMED
    assert request_code(msgpack.packb({"v": 1, "type": 1})) == E_MALFORMED
    # A reply without a usable type is never mistaken for an ack.
    assert reply_code(msgpack.packb({"v": 1, "seq": 1})) in (E_MALFORMED, E_UNKNOWN_TYPE)


def test_bytes_where_a_string_belongs_is_malformed():
    frame = msgpack.packb({"v": 1, "type": "sync", "client": _client_map(), "id": 1,
                           "file": {"path": "/a.log", "options": {}}, "render": "lines",
                           "record": b"raw bytes"}, use_bin_type=True)
    assert request_code(frame) == E_MALFORMED


# -- wrong types in every field --------------------------------------------------
def _client_map():
    return {"host": "h", "pid": 1, "program": "p", "session": "s"}


def _file_map():
    return {"path": "/var/log/a.log", "options": {"maxBytes": 10}}


VALID = {
    "batch": {"v": 1, "type": "batch", "client": _client_map(), "seq": 1, "file": _file_map(),
              "render": "lines", "records": ["a"]},
    "sync": {"v": 1, "type": "sync", "client": _client_map(), "id": 1, "file": _file_map(),
             "render": "lines", "record": "a"},
    "stats": {"v": 1, "type": "stats", "id": 1},
    "ping": {"v": 1, "type": "ping", "id": 1},
    "report": {"v": 1, "type": "report", "client": _client_map(), "id": 1,
               "counters": {"dropped": 1}},
    "ack": {"v": 1, "type": "ack", "seq": 1},
    "ok": {"v": 1, "type": "ok", "id": 1, "data": {"x": 1}},
    "error": {"v": 1, "type": "error", "code": "busy", "message": "m", "seq": 1, "id": 1},
}
REPLIES = ("ack", "ok", "error")
# field path -> the msgpack kind it must have
KINDS = {
    ("client",): "map", ("client", "host"): "str", ("client", "pid"): "uint",
    ("client", "program"): "str", ("client", "session"): "str",
    ("seq",): "uint", ("id",): "uint", ("file",): "map", ("file", "path"): "str",
    ("file", "options"): "map", ("render",): "render", ("records",): "list[str]",
    ("record",): "str", ("counters",): "map", ("data",): "map", ("code",): "str",
    ("message",): "str",
}
OPTIONAL = {("stats", "id"), ("ping", "id"), ("report", "id"), ("ok", "id"), ("ok", "data"),
            ("error", "seq"), ("error", "id")}
WRONG_VALUES = [None, True, 1.5, -1, 2**64 - 1, "text", [], ["a", 1], {}, {"k": [1]}]


def _fits(kind, value):
    if kind == "uint":
        return type(value) is int and 0 <= value <= MAX_INT
    if kind == "str":
        return type(value) is str
    if kind == "render":
        return value == "lines"
    if kind == "map":
        return type(value) is dict
    if kind == "list[str]":
        return type(value) is list and all(type(x) is str for x in value)
    raise AssertionError(kind)


def _field_cases():
    for mtype, message in VALID.items():
        for key, value in message.items():
            paths = [(key,)]
            if isinstance(value, dict) and (key,) in KINDS and key in ("client", "file"):
                paths += [(key, sub) for sub in value]
            for path in paths:
                if path[0] in ("v", "type"):
                    continue
                yield mtype, path


def _set(message, path, value):
    out = copy.deepcopy(message)
    target = out
    for part in path[:-1]:
        target = target[part]
    if value is _MISSING:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return msgpack.packb(out)


_MISSING = object()


def test_valid_templates_decode():
    # The wrong-type test below is meaningful only if each template is accepted as is.
    for mtype, message in VALID.items():
        decode = protocol.decode_reply if mtype in REPLIES else protocol.decode_request
        decode(msgpack.packb(message))


@pytest.mark.parametrize("mtype, path", list(_field_cases()),
                         ids=lambda x: "/".join(x) if isinstance(x, tuple) else x)
def test_wrong_type_in_every_field_is_malformed(mtype, path):
    decode = protocol.decode_reply if mtype in REPLIES else protocol.decode_request
    tried = 0
    for value in WRONG_VALUES:
        if _fits(KINDS[path], value):
            continue
        tried += 1
        assert code_of(decode, _set(VALID[mtype], path, value)) == E_MALFORMED, (path, value)
    assert tried >= 5
    if (mtype, path[-1]) not in OPTIONAL or len(path) > 1:
        assert code_of(decode, _set(VALID[mtype], path, _MISSING)) == E_MALFORMED, (path, "missing")


def test_nested_file_options_are_malformed():
    for value in ({"a": 1}, [["u"], "g"], [{"u": 1}, "g"]):
        frame = _set(VALID["batch"], ("file", "options", "owner"), value)
        assert request_code(frame) == E_MALFORMED


# -- fuzz ----------------------------------------------------------------------
def _only_protocol_errors(data):
    for decode in (protocol.decode_request, protocol.decode_reply):
        try:
            decode(data)
        except ProtocolError as exc:
            assert exc.code in ERROR_CODES
            assert isinstance(exc.message, str)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data):
    _only_protocol_errors(data)


SEEDS = [msgpack.packb(m) for m in VALID.values()] + [
    BATCH, PING, protocol.encode_report(client(), {"dropped": 3}),
    protocol.encode_ok(1, {"files": [{"a": 1.5}]}),
]


SPLICES = [b"\xdd\xff\xff\xff\xff", b"\xdf\x00\x01\x00\x00", b"\xc1", b"\xdb\x00\x10\x00\x01",
           b"\xcf" + b"\xff" * 8]
FIELD_NAMES = ["v", "type", "client", "seq", "id", "file", "render", "records", "record",
               "counters", "data", "code", "message", "x"]


@st.composite
def mutated_frames(draw):
    frame = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        i = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[i] = draw(st.integers(0, 255))
        elif op == "insert":
            frame[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and frame:
            del frame[i:i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del frame[i:]
        elif op == "splice":
            # Put a (possibly huge) length header or a reserved byte where a value was.
            frame[i:i] = draw(st.sampled_from(SPLICES))
    return bytes(frame)


@FUZZ
@given(mutated_frames())
def test_fuzz_mutated_frames(data):
    _only_protocol_errors(data)


@FAST
@given(st.dictionaries(st.sampled_from(FIELD_NAMES), json_like, max_size=8))
def test_fuzz_well_formed_msgpack_with_any_fields(message):
    # Valid msgpack with the right field names and arbitrary values: the
    # decoder's schema checks, not msgpack, must refuse what is wrong.
    message.setdefault("v", 1)
    data = msgpack.packb(message)
    assume(len(data) <= MAX_FRAME_BYTES)
    _only_protocol_errors(data)
