"""The seam that writes many lines under one CLH lock (``clh_writerd._batchwrite``).

Every test writes real files through real concurrent-log-handler handlers and
reads them back; failures are provoked for real (a file size limit in a child
process), not simulated.
"""

import fcntl
import grp
import gzip
import json
import logging
import os
import pwd
import subprocess
import sys
import textwrap
import threading

import pytest
from concurrent_log_handler import ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler

from clh_writerd import protocol
from clh_writerd._batchwrite import BatchWriter, build_handler, describe_handler
from support import (
    RECORD_RE,
    check_sequences,
    family_files,
    ordered_family,
    per_writer_order,
    read_lines,
    seq_record,
    wait_for,
)

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where support is
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
# The child sets a file size limit with SIGXFSZ ignored, so write() fails with
# EFBIG the way a full disk fails with ENOSPC, then lifts the limit (as when
# space is freed) and writes again with the same writer.
CHILD = textwrap.dedent("""
    import errno, json, resource, signal, sys
    from clh_writerd._batchwrite import BatchWriter, build_handler

    path, limit, chunk_chars, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with open(batches) as f:
        first, second, third = json.load(f)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    writer = BatchWriter(build_handler(path, {}), chunk_chars=chunk_chars)
    writer.write(first)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    outcome = {}
    try:
        writer.write(second)
        outcome["second"] = "written"
    except OSError as exc:
        outcome["second"] = errno.errorcode.get(exc.errno, str(exc.errno))
    outcome["size_after_failure"] = __import__("os").path.getsize(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    writer.write(third)
    writer.close()
    print(json.dumps(outcome))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="RLIMIT_FSIZE/EFBIG behaviour is Linux's")
@pytest.mark.parametrize("chunk_chars", [256 * 1024, 1000], ids=["one-chunk", "many-chunks"])
def test_failed_write_raises_and_leaves_no_torn_line(tmp_path, chunk_chars):
    path = str(tmp_path / "app.log")
    first = [seq_record("w", n) for n in range(50)]
    second = [seq_record("w", n) for n in range(50, 1050)]
    third = [seq_record("w", n) for n in range(1050, 1100)]
    limit = 4096
    assert len("\n".join(first)) < limit < len("\n".join(first + second))
    batches = tmp_path / "batches.json"
    batches.write_text(json.dumps([first, second, third]))
    argv = [sys.executable, "-c", CHILD, path, str(limit), str(chunk_chars), str(batches)]
    proc = subprocess.run(argv,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["second"] == "EFBIG"  # the call raised: nothing may be acknowledged
    assert outcome["size_after_failure"] <= limit

    data = read_bytes(path).decode()
    assert data.endswith("\n")
    numbers = []
    for line in data[:-1].split("\n"):
        m = RECORD_RE.match(line)
        assert m and line == seq_record("w", int(m.group(2))), f"torn line {line!r}"
        numbers.append(int(m.group(2)))
    # What is in the file is whole lines: the first batch, the chunks of the
    # second that were written before the failing one, then the third batch.
    kept = len(numbers) - len(first) - len(third)
    assert 0 <= kept < len(second)
    assert numbers == list(range(50 + kept)) + list(range(1050, 1100))
    if chunk_chars > len("\n".join(second)):
        assert kept == 0  # one chunk: cut back to where the batch started
    else:
        assert kept > 0  # earlier chunks were complete and stay


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


# -- with a CLH writer in another process -----------------------------------------
WRITER_CHILD = textwrap.dedent("""
    import logging, os, sys, time
    sys.path.insert(0, sys.argv[5])
    from support import seq_record, wait_for
    from clh_writerd._batchwrite import BatchWriter, build_handler

    path, mode, name, go = sys.argv[1:5]
    options = {"maxBytes": 8192, "backupCount": 1000}
    handler = build_handler(path, options)
    open(go + "." + name, "w").close()  # ready
    wait_for(lambda: os.path.exists(go), 30, "the go file")
    if mode == "batch":
        writer = BatchWriter(handler)
        for start in range(0, 4000, 40):
            writer.write([seq_record(name, n) for n in range(start, start + 40)])
        writer.close()
    else:
        for n in range(4000):
            handler.emit(logging.makeLogRecord({"msg": seq_record(name, n)}))
        handler.close()
""")


def test_batch_writer_and_clh_emit_share_a_file_without_tearing(tmp_path):
    # The fallback (CLH emit in the app) and the daemon (BatchWriter) write the
    # same file at the same time: the shared lock must keep lines whole and
    # rotation single.
    path = str(tmp_path / "app.log")
    go = str(tmp_path / "go")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_CHILD, path, mode, name, go, TESTS_DIR],
                              stderr=subprocess.PIPE, universal_newlines=True)
             for mode, name in (("batch", "daemon"), ("emit", "fallback"))]
    try:
        ready = [f"{go}.daemon", f"{go}.fallback"]
        wait_for(lambda: all(os.path.exists(r) for r in ready), 60, "both writers")
        open(go, "w").close()
        for proc in procs:
            assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    report = check_sequences(read_lines(path), {"daemon": 4000, "fallback": 4000})
    report.assert_complete()
    assert report.found == 8000
    assert not [name for name in family_files(path) if ".rotate." in name]
    assert per_writer_order(ordered_family(path)) == {"daemon": True, "fallback": True}


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
