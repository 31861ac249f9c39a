"""BatchWriter in other processes: a write that fails for real (a file size
limit in a child process) and a batch writer sharing a file with CLH's own
emit() in another process. The in-process tests of ``clh_writerd._batchwrite``:
tests/unit/test_batchwrite.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

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

from tests.unit.test_batchwrite import read_bytes

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where support is


# -- a failure in a child process ---------------------------------------------------
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
