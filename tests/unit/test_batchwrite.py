"""The seam that writes many lines under one CLH lock (``clh_writerd._batchwrite``).

Every test writes real files through real concurrent-log-handler handlers and
reads them back. A failure provoked in a child process (a file size limit) and
a second writer process: tests/e2e/test_batchwrite.py.
"""

import fcntl
import grp
import gzip
import logging
import os
import pwd
import threading

import pytest
from concurrent_log_handler import ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler

from clh_writerd import protocol
from clh_writerd._batchwrite import BatchWriter, build_handler, describe_handler
from support import (
    check_sequences,
    family_files,
    ordered_family,
    per_writer_order,
    read_lines,
    seq_record,
    wait_for,
)

MIXED_LINES = [
    "plain ascii",
    "naïve café ✓ 日本語 🙂",
    "",
    "  leading spaces\tand a tab",
    "percent %s %d kept as is",
    "€ not in latin-1",
]


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_all(path, options, lines, chunk_chars=None):
    extra = {"chunk_chars": chunk_chars} if chunk_chars else {}
    writer = BatchWriter(build_handler(str(path), options), **extra)
    try:
        return writer.write(lines)
    finally:
        writer.close()


# -- lines land ----------------------------------------------------------------
def test_lines_land_with_the_terminator(tmp_path):
    path = tmp_path / "app.log"
    result = write_all(path, {}, ["first", "second", ""])
    assert read_bytes(path) == b"first\nsecond\n\n"
    assert result.bytes == len(b"first\nsecond\n\n")
    assert result.rotations == 0


def test_write_now_writes_only_when_nothing_has_to_wait(tmp_path):
    """The daemon's inline sync write: done when the lock is free and no
    rotation is due; None (nothing written, nothing held) when another
    process holds the lock, when a rotation is due, or before the files are
    open; the lock is free again after it."""
    path = tmp_path / "app.log"
    writer = BatchWriter(build_handler(str(path), {"maxBytes": 64, "backupCount": 2}))
    try:
        assert writer.write_now(["before open"]) is None  # log and lock files not open yet
        writer.write(["opened"])
        assert writer.write_now(["now"]).bytes == len(b"now\n")
        lock_file = writer._clh.lockFilename
        with open(lock_file) as other:  # another open file description: another process's lock
            fcntl.flock(other, fcntl.LOCK_EX)
            assert writer.write_now(["held"]) is None
            fcntl.flock(other, fcntl.LOCK_UN)
            writer.write(["x" * 80])  # past maxBytes: the next write rotates
            assert writer.write_now(["due"]) is None
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # write_now left the lock free
            fcntl.flock(other, fcntl.LOCK_UN)
        assert writer.write(["rotated"]).rotations == 1
        assert read_bytes(str(path) + ".1") == b"opened\nnow\n" + b"x" * 80 + b"\n"
        assert read_bytes(path) == b"rotated\n"
    finally:
        writer.close()


def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "app.log"
    path.write_bytes(b"already here\n")
    write_all(path, {}, ["a"])
    write_all(path, {}, ["b", "c"])
    assert read_bytes(path) == b"already here\na\nb\nc\n"


def test_empty_batch_writes_nothing(tmp_path):
    path = tmp_path / "app.log"
    assert tuple(write_all(path, {}, [])) == (0, 0, 0)
    assert not path.exists()


@pytest.mark.parametrize("options, expected", [
    ({"terminator": "\r\n"}, "a\r\nb\r\n".encode()),
    ({"terminator": "\r\n", "newline": ""}, "a\r\nb\r\n".encode()),
    ({"terminator": "|"}, b"a|b|"),
    ({"newline": "\r\n"}, b"a\r\nb\r\n"),  # newline translates the default "\n" terminator
    ({"encoding": "latin-1"}, "a\nb\n".encode("latin-1")),
    ({"encoding": "utf-16-le", "terminator": "\r\n"}, "a\r\nb\r\n".encode("utf-16-le")),
])
def test_custom_terminator_and_encoding(tmp_path, options, expected):
    path = tmp_path / "app.log"
    write_all(path, options, ["a", "b"])
    assert read_bytes(path) == expected


def test_non_ascii_lines_in_the_file_encoding(tmp_path):
    path = tmp_path / "app.log"
    options = {"encoding": "latin-1", "unicode_error_policy": "replace"}
    result = write_all(path, options, ["café", "€uro"])
    # latin-1 has é but no €: the replace policy writes '?', as CLH would.
    assert read_bytes(path) == b"caf\xe9\n?uro\n"
    assert result.bytes == len(b"caf\xe9\n?uro\n")  # bytes, not characters


def test_reported_bytes_are_the_file_growth_in_utf8(tmp_path):
    path = tmp_path / "app.log"
    result = write_all(path, {"encoding": "utf-8"}, MIXED_LINES)
    assert result.bytes == os.path.getsize(path) == len("\n".join(MIXED_LINES).encode() + b"\n")


def test_fsync_write_lands(tmp_path):
    path = tmp_path / "app.log"
    writer = BatchWriter(build_handler(str(path), {}))
    writer.write(["durable"], fsync=True)
    assert writer.fsync() is True
    writer.close()
    assert read_bytes(path) == b"durable\n"


# -- same bytes as CLH's own emit() ---------------------------------------------
def clh_emit(handler, lines):
    for line in lines:
        handler.emit(logging.makeLogRecord({"msg": line}))
    handler.close()


@pytest.mark.parametrize("options", [
    {},
    {"terminator": "\r\n"},
    {"terminator": "\r\n", "newline": ""},
    {"terminator": " ;\n"},
    {"encoding": "latin-1", "unicode_error_policy": "replace"},
    {"encoding": "latin-1", "unicode_error_policy": "ignore"},
    {"encoding": "utf-16"},
    {"when": "H", "terminator": "\r\n"},
    {"when": "MIDNIGHT", "encoding": "utf-8"},
], ids=repr)
@pytest.mark.parametrize("chunk_chars", [None, 16], ids=["one-chunk", "many-chunks"])
def test_same_bytes_as_clh_emit(tmp_path, options, chunk_chars):
    lines = MIXED_LINES * 3
    ours, theirs = tmp_path / "ours.log", tmp_path / "theirs.log"
    write_all(ours, options, lines, chunk_chars)
    clh_emit(build_handler(str(theirs), options), lines)
    expected = read_bytes(theirs)
    assert len(expected) > 0
    assert read_bytes(ours) == expected


def test_same_bytes_as_clh_emit_across_several_writes(tmp_path):
    ours, theirs = tmp_path / "ours.log", tmp_path / "theirs.log"
    options = {"encoding": "utf-16", "terminator": "\r\n"}
    writer = BatchWriter(build_handler(str(ours), options))
    for line in MIXED_LINES:
        writer.write([line, line])  # a byte-order mark must appear once, at the start
    writer.close()
    clh_emit(build_handler(str(theirs), options), [line for line in MIXED_LINES for _ in (0, 1)])
    assert read_bytes(ours) == read_bytes(theirs)


# -- rotation ---------------------------------------------------------------------
def test_chunking_keeps_rotated_files_close_to_max_bytes(tmp_path):
    path = str(tmp_path / "app.log")
    max_bytes = 4096
    writer = BatchWriter(build_handler(path, {"maxBytes": max_bytes, "backupCount": 200}))
    lines = [seq_record("w", n) for n in range(3000)]
    longest = max(len(line) + 1 for line in lines)
    rotations = 0
    # Batches of ~30 KB each: without chunking every rotated file would be that large.
    for start in range(0, len(lines), 1000):
        rotations += writer.write(lines[start:start + 1000]).rotations
    writer.close()
    rotated = [name for name in family_files(path) if name != path]
    assert rotations == len(rotated) >= 10
    for name in rotated:
        assert os.path.getsize(name) <= max_bytes + writer.chunk_chars + longest, name
    check_sequences(read_lines(path), {"w": len(lines)}).assert_complete()
    assert per_writer_order(ordered_family(path)) == {"w": True}


def test_gzip_rotation_keeps_every_line_exactly_once(tmp_path):
    path = str(tmp_path / "app.log")
    options = {"maxBytes": 2048, "backupCount": 500, "use_gzip": True}
    writer = BatchWriter(build_handler(path, options))
    total = 2000
    for start in range(0, total, 100):
        writer.write([seq_record("w", n) for n in range(start, start + 100)])
    writer.close()
    compressed = [name for name in family_files(path) if name.endswith(".gz")]
    assert len(compressed) >= 5
    assert set(family_files(path)) == set(compressed) | {path}  # nothing left uncompressed
    for name in compressed:
        with gzip.open(name, "rb") as f:
            assert f.read().endswith(b"\n")  # rotated on a line boundary
    report = check_sequences(read_lines(path), {"w": total})
    report.assert_complete()
    assert report.found == total  # exactly once: no duplicates, nothing foreign


def test_backup_count_zero_truncates(tmp_path):
    # CLH's documented behaviour: no backups means the file starts over.
    path = str(tmp_path / "app.log")
    writer = BatchWriter(build_handler(path, {"maxBytes": 1024, "backupCount": 0}))
    rotations = sum(writer.write([seq_record("w", n) for n in range(i, i + 50)]).rotations
                    for i in range(0, 500, 50))
    writer.close()
    assert rotations > 0
    assert family_files(path) == [path]
    assert os.path.getsize(path) < 1024 + writer.chunk_chars + 100


# -- timed handlers ---------------------------------------------------------------
def test_timed_hourly_handler_writes(tmp_path):
    path = str(tmp_path / "app.log")
    handler = build_handler(path, {"when": "H", "backupCount": 3})
    assert isinstance(handler, ConcurrentTimedRotatingFileHandler)
    writer = BatchWriter(handler)
    result = writer.write([seq_record("w", n) for n in range(100)])
    writer.close()
    assert result.rotations == 0
    check_sequences(read_lines(path), {"w": 100}).assert_complete()
    assert per_writer_order(read_lines(path)) == {"w": True}


def test_timed_rotation_each_second_keeps_every_line(tmp_path):
    path = str(tmp_path / "app.log")
    writer = BatchWriter(build_handler(path, {"when": "S", "interval": 1}))
    written = 0

    def rotated() -> bool:
        nonlocal written
        result = writer.write([seq_record("w", n) for n in range(written, written + 20)])
        written += 20
        return result.rotations > 0

    wait_for(rotated, timeout=10, what="a time-based rotation")
    writer.close()
    rotated_files = [name for name in family_files(path) if name != path]
    assert rotated_files, family_files(path)
    check_sequences(read_lines(path), {"w": written}).assert_complete()


# -- describe_handler ---------------------------------------------------------------
BASE = {"maxBytes": 0, "backupCount": 0, "use_gzip": False, "encoding": "utf-8", "terminator": "\n",
        "unicode_error_policy": "ignore"}


def my_owner():
    return [pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name]


@pytest.mark.parametrize("options", [
    {},
    {"maxBytes": 1 << 20, "backupCount": 7, "use_gzip": True, "encoding": "iso8859-1",
     "terminator": "\r\n", "newline": "", "unicode_error_policy": "strict", "chmod": 0o640,
     "umask": 0o027},
    {"owner": "mine", "chmod": 0o600},
    {"lock_file_directory": "locks"},
    {"when": "H", "interval": 1, "utc": False},
    {"when": "S", "interval": 30, "utc": True, "maxBytes": 4096, "backupCount": 2},
    {"when": "M", "interval": 5, "utc": False},
    {"when": "D", "interval": 3, "utc": True, "use_gzip": True},
    {"when": "MIDNIGHT", "interval": 1, "utc": False, "terminator": "\r\n"},
    {"when": "W0", "interval": 2, "utc": False},
    {"when": "W6", "interval": 1, "utc": True},
], ids=repr)
def test_describe_handler_round_trips_options(tmp_path, options):
    options = dict(BASE, **options)
    if options.get("owner") == "mine":
        options["owner"] = my_owner()
    if "lock_file_directory" in options:
        options["lock_file_directory"] = str(tmp_path / options["lock_file_directory"])
    path = str(tmp_path / "app.log")
    handler = build_handler(path, options)
    try:
        assert describe_handler(handler) == (path, options)
        assert protocol.check_file_options(options) == options
    finally:
        handler.close()


def test_describe_handler_gives_an_absolute_path_and_canonical_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    handler = build_handler("rel.log", {"encoding": "Latin-1", "when": "midnight"})
    path, options = describe_handler(handler)
    handler.close()
    assert path == os.path.join(os.getcwd(), "rel.log")
    assert options["encoding"] == "iso8859-1"
    assert options["when"] == "MIDNIGHT"


@pytest.mark.parametrize("make", [
    lambda p: ConcurrentRotatingFileHandler(p),
    lambda p: ConcurrentTimedRotatingFileHandler(p),
    lambda p: ConcurrentRotatingFileHandler(p, maxBytes=1000, backupCount=5, use_gzip=True),
    lambda p: ConcurrentTimedRotatingFileHandler(p, when="midnight", backupCount=5, utc=True),
], ids=["rotating", "timed", "rotating-gzip", "timed-midnight"])
def test_describe_handler_of_a_plain_clh_handler_is_accepted_by_the_protocol(tmp_path, make):
    original = make(str(tmp_path / "app.log"))
    path, options = describe_handler(original)
    assert protocol.check_file_options(options) == options
    # The daemon's handler, built from that description, writes the same bytes.
    rebuilt = build_handler(str(tmp_path / "rebuilt.log"), options)
    assert describe_handler(rebuilt)[1] == options
    clh_emit(original, MIXED_LINES)
    clh_emit(rebuilt, MIXED_LINES)
    assert read_bytes(tmp_path / "rebuilt.log") == read_bytes(path)


def test_describe_handler_refuses_what_it_cannot_describe(tmp_path):
    import datetime

    plain = logging.FileHandler(str(tmp_path / "plain.log"), delay=True)
    with pytest.raises(TypeError):
        describe_handler(plain)
    at_time = ConcurrentTimedRotatingFileHandler(str(tmp_path / "t.log"), when="midnight",
                                                 atTime=datetime.time(3, 0))
    with pytest.raises(ValueError):
        describe_handler(at_time)
    at_time.close()


# -- failures ---------------------------------------------------------------------
def test_the_batch_is_written_under_the_clh_lock_which_a_failure_releases(tmp_path):
    # The log file is a FIFO: opening it for writing blocks until a reader
    # comes, so the writer stops inside write() and the test can look at the
    # lock from outside. A FIFO cannot seek, so the write then fails.
    path = str(tmp_path / "app.log")
    os.mkfifo(path)
    handler = build_handler(path, {})
    writer = BatchWriter(handler)
    outcome = []

    def write():
        try:
            writer.write(["a line"])
            outcome.append("written")
        except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
            outcome.append(exc)

    def lock_taken() -> bool:
        try:
            f = open(handler.lockFilename, "a")
        except FileNotFoundError:
            return False
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: a rival
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    reader = None
    try:
        wait_for(lock_taken, 10, "the writer to hold the CLH lock while it writes")
    finally:
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer go on
        thread.join(10)
        os.close(reader)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], OSError), outcome
    assert not lock_taken()  # the failed write gave the lock back
    writer.close()


def test_strict_encoding_drops_only_the_unencodable_lines(tmp_path):
    # CLH's emit() loses only the record its encoding refuses; a batch must
    # not fail whole (the daemon would refuse to ack it, forever).
    path = tmp_path / "app.log"
    result = write_all(path, {"encoding": "ascii", "unicode_error_policy": "strict"},
                       ["plain 1", "caf\u00e9 2", "plain 3"])
    assert result.skipped == 1
    assert path.read_bytes() == b"plain 1\nplain 3\n"


def test_close_waits_for_a_write_in_progress_and_later_writes_still_go_through(tmp_path):
    """CLH's close() under another thread's write made that write skip
    releasing CLH's thread lock: every later write of the process hung."""
    entered, gate = threading.Event(), threading.Event()

    class StuckCLH(ConcurrentRotatingFileHandler):
        def do_write(self, msg):
            entered.set()
            gate.wait(10)
            super().do_write(msg)

    path = str(tmp_path / "app.log")
    writer = BatchWriter(StuckCLH(path))
    first = threading.Thread(target=writer.write, args=(["first"],), daemon=True)
    first.start()
    assert entered.wait(10)
    assert writer.close(timeout=0.05) is False  # the write holds the file: left open
    gate.set()
    first.join(10)
    assert writer.close(timeout=5) is True
    later = threading.Thread(target=writer.write, args=(["later"],), daemon=True)
    later.start()
    later.join(10)  # hung forever with an unguarded close
    assert not later.is_alive()
    writer.close()
    assert read_lines(path) == ["first", "later"]
