"""What the daemon writes: completeness, rotation, sync records, options,
fsync, backpressure and failed writes, checked in the files themselves."""

import gzip
import os
import re
import resource
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import zmq
from support import (
    check_sequences,
    family_files,
    hold_clh_lock,
    ordered_family,
    per_writer_order,
    read_lines,
    seq_record,
    wait_for,
)

from clh_writerd import protocol

MAX_BYTES = 20000


def _pipelined(client, path: str, writer: str, batches: int, per_batch: int, options: dict,
               window: int = 8) -> int:
    """Send ``batches`` batches of ``writer``'s records keeping up to ``window``
    unacknowledged (as the real client does); returns how many were acked."""
    acked = sent = n = 0
    while acked < batches:
        while sent < batches and sent - acked < window:
            client.send_batch(path, [seq_record(writer, n + i) for i in range(per_batch)], options)
            n += per_batch
            sent += 1
        reply = client.recv()
        assert isinstance(reply, protocol.Ack), reply
        acked += 1
    return acked


def test_many_clients_into_one_gzip_rotated_file_lose_nothing(start_daemon, raw_client):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "app.log")
    options = {"maxBytes": MAX_BYTES, "backupCount": 200, "use_gzip": True}
    writers, batches, per_batch = ["w0", "w1", "w2", "w3"], 40, 50
    clients = {w: raw_client(daemon.endpoint, program=w) for w in writers}
    # One thread per client, so batches from all writers interleave in the file.
    with ThreadPoolExecutor(len(writers)) as pool:
        futures = [pool.submit(_pipelined, clients[w], path, w, batches, per_batch, options) for w in writers]
        assert [f.result() for f in futures] == [batches] * len(writers)

    expected = {w: batches * per_batch for w in writers}
    report = check_sequences(read_lines(path), expected)
    report.assert_complete()
    assert report.found == sum(expected.values())
    assert per_writer_order(ordered_family(path)) == {w: True for w in writers}
    # The family really was rotated and gzipped, so the oracle read .gz files.
    gz = [f for f in family_files(path) if f.endswith(".gz")]
    assert len(gz) >= 5, family_files(path)
    stats = daemon.file_stats(path)
    assert stats["records_written"] == sum(expected.values())
    assert stats["rotations"] >= len(gz)


def test_oracle_reports_a_line_removed_from_a_rotated_gz_file(start_daemon, raw_client):
    """Negative control: the oracle above must be able to fail."""
    daemon = start_daemon()
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "app.log")
    options = {"maxBytes": 4000, "backupCount": 50, "use_gzip": True}
    total = 0
    for _ in range(10):
        reply = client.write(path, [seq_record("w", total + i) for i in range(100)], options)
        assert isinstance(reply, protocol.Ack), reply
        total += 100
    check_sequences(read_lines(path), {"w": total}).assert_complete()

    # Drop one line from the middle of a rotated, gzipped file.
    victim = next(f for f in family_files(path) if f.endswith(".gz"))
    with gzip.open(victim, "rt") as f:
        lines = f.read().splitlines(keepends=True)
    removed = lines.pop(len(lines) // 2)
    with gzip.open(victim, "wt") as f:
        f.writelines(lines)
    dropped = int(removed.split()[2])

    report = check_sequences(read_lines(path), {"w": total})
    assert report.missing == {"w": [dropped]}
    try:
        report.assert_complete()
    except AssertionError as exc:
        assert "1 missing" in str(exc)
    else:
        raise AssertionError("assert_complete() accepted a family with a missing line")

    # A writer that skips one record is caught the same way, and so is a
    # torn (unterminated) last line.
    skipped = check_sequences([seq_record("v", n) for n in range(50) if n != 17], {"v": 50})
    assert skipped.missing == {"v": [17]}
    with open(path, "a") as f:
        f.write("SEQ w 99999")
    assert check_sequences(read_lines(path), {"w": total}).torn


def test_rotated_files_stay_near_max_bytes(start_daemon, raw_client):
    max_write_chars = 1024
    daemon = start_daemon(limits={"max_write_chars": max_write_chars})
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "sized.log")
    options = {"maxBytes": MAX_BYTES, "backupCount": 100}
    # Each batch (about 12 kB) is larger than a chunk, so only the per-chunk
    # rollover check can keep rotated files this close to maxBytes.
    total = 0
    for _ in range(12):
        records = [seq_record("w", total + i, "p" * 50) for i in range(200)]
        reply = client.write(path, records, options)
        assert isinstance(reply, protocol.Ack), reply
        total += len(records)
    check_sequences(read_lines(path), {"w": total}, payloads=False).assert_complete()

    # BatchWriter's rule: chunks of min(max_write_chars, max(256, maxBytes // 8))
    # characters, plus the line that crosses the limit.
    chunk = min(max_write_chars, max(256, MAX_BYTES // 8))
    longest = len(seq_record("w", total, "p" * 50)) + 1
    rotated = [f for f in family_files(path) if f != path]
    assert len(rotated) >= 5
    for name in rotated:
        size = os.path.getsize(name)
        # A rollover happens once the file reached maxBytes, never before.
        assert MAX_BYTES <= size <= MAX_BYTES + chunk + longest, (name, size)


def test_timed_rotation_every_second_loses_nothing(start_daemon, raw_client):
    daemon = start_daemon()
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "timed.log")
    options = {"when": "S", "interval": 1, "backupCount": 0}
    sent = [0]

    def write_and_check_rotated() -> bool:
        records = [seq_record("w", sent[0] + i) for i in range(20)]
        reply = client.write(path, records, options)
        assert isinstance(reply, protocol.Ack), reply
        sent[0] += len(records)
        return len(family_files(path)) >= 3

    # Keep writing until two second-boundaries have rotated the file.
    wait_for(write_and_check_rotated, timeout=30, what="two timed rotations", interval=0.05)
    check_sequences(read_lines(path), {"w": sent[0]}).assert_complete()
    # Timestamp suffixes sort oldest first; the base file holds the newest.
    rotated = sorted(f for f in family_files(path) if f != path)
    assert all(re.search(r"\.\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d$", f) for f in rotated), rotated
    lines: List[str] = []
    for name in rotated + [path]:
        with open(name) as f:
            lines += f.read().splitlines()
    assert per_writer_order(lines) == {"w": True}
    assert daemon.file_stats(path)["rotations"] >= 2


def test_sync_record_is_in_the_file_when_ok_arrives(start_daemon, raw_client):
    daemon = start_daemon()
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "sync.log")
    for n in range(20):
        # A queued batch of lower-level records must not delay the sync record.
        client.send_batch(path, [seq_record("b", n * 10 + i) for i in range(10)])
        record = seq_record("s", n)
        reply = client.sync(path, record)
        assert isinstance(reply, protocol.Ok), reply
        with open(path) as f:
            assert record + "\n" in f.read()
    for _ in range(20):
        assert isinstance(client.recv(), protocol.Ack)
    check_sequences(read_lines(path), {"s": 20, "b": 200}).assert_complete()


def test_a_second_declaration_with_other_options_is_refused(start_daemon, raw_client):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "shared.log")
    first = {"maxBytes": 100000, "backupCount": 3}
    second = {"maxBytes": 5000, "backupCount": 7, "use_gzip": True}
    a, b = raw_client(daemon.endpoint, "a"), raw_client(daemon.endpoint, "b")
    # The first client's 300 records (about 9 kB) pass the second one's
    # maxBytes, so the second declaration would rotate the file if it applied.
    assert isinstance(a.write(path, [seq_record("a", i) for i in range(300)], first), protocol.Ack)
    reply = b.write(path, [seq_record("b", i) for i in range(100)], second)
    assert isinstance(reply, protocol.Error) and reply.code == protocol.E_OPTIONS_CONFLICT, reply
    assert "maxBytes" in reply.message and "use_gzip" in reply.message
    assert not reply.retryable  # the client writes it through its fallback
    # Nothing of the refused batch was written; the first client goes on.
    assert isinstance(a.write(path, [seq_record("a", 300 + i) for i in range(10)], first), protocol.Ack)
    check_sequences(read_lines(path), {"a": 310}).assert_complete()
    stats = daemon.file_stats(path)
    assert stats["option_conflicts"] == 1
    assert daemon.stats()["daemon"]["counters"]["options_conflict"] == 1
    assert stats["options"] == first
    assert family_files(path) == [os.path.realpath(path)]


def _write_acked(client, path: str, writer: str, batches: int) -> None:
    for k in range(batches):
        reply = client.write(path, [seq_record(writer, k * 10 + i) for i in range(10)])
        assert isinstance(reply, protocol.Ack), reply


def test_fsync_batch_policy_fsyncs_every_write(start_daemon, raw_client):
    daemon = start_daemon(fsync={"policy": "batch"})
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "durable.log")
    _write_acked(client, path, "w", 5)
    # Each batch was acked before the next was sent: five writes, five fsyncs.
    assert daemon.file_stats(path)["fsyncs"] == 5
    check_sequences(read_lines(path), {"w": 50}).assert_complete()


def test_fsync_interval_policy_fsyncs_after_writes(start_daemon, raw_client):
    daemon = start_daemon(fsync={"policy": "interval", "interval": 0.05})
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "lazy.log")
    _write_acked(client, path, "w", 3)
    wait_for(lambda: daemon.file_stats(path)["fsyncs"] >= 1, timeout=10, what="an interval fsync")
    before = daemon.file_stats(path)["fsyncs"]
    _write_acked(client, path, "v", 1)
    wait_for(lambda: daemon.file_stats(path)["fsyncs"] > before, timeout=10, what="a second interval fsync")


def test_fsync_policy_per_file_override(start_daemon, raw_client, tmp_path):
    log_dir = os.path.realpath(str(tmp_path / "logs"))
    daemon = start_daemon(fsync={"policy": "never"},
                          files=[{"path": os.path.join(log_dir, "audit*.log"), "fsync": "batch"}])
    client = raw_client(daemon.endpoint)
    audit, plain = os.path.join(log_dir, "audit.log"), os.path.join(log_dir, "plain.log")
    _write_acked(client, audit, "a", 4)
    _write_acked(client, plain, "p", 4)
    assert daemon.file_stats(audit)["fsyncs"] == 4
    assert daemon.file_stats(plain)["fsyncs"] == 0


def test_full_queue_answers_busy_and_writes_only_acked_batches(start_daemon, raw_client):
    daemon = start_daemon(limits={"queue_batches": 1})
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "busy.log")
    assert isinstance(client.write(path, [seq_record("warmup", 0)]), protocol.Ack)
    per_batch, flood = 20, 30
    replies: Dict[int, protocol.Reply] = {}
    # Another process holding the file's lock stalls the writer, so the queue
    # of one batch fills up whatever the machine's speed.
    with hold_clh_lock(path):
        seqs = [client.send_batch(path, [seq_record(f"b{k}", i) for i in range(per_batch)]) for k in range(flood)]

        def all_handled() -> bool:
            s = daemon.file_stats(path)
            return s["records_received"] - 1 + s["busy_refusals"] * per_batch == flood * per_batch

        wait_for(all_handled, what="the daemon to queue or refuse every batch")
        while True:
            reply = client.try_recv(0.2)
            if reply is None:
                break
            replies[reply.seq] = reply  # type: ignore[union-attr]
        # Nothing is acknowledged while the write cannot happen.
        assert all(isinstance(r, protocol.Error) and r.code == protocol.E_BUSY for r in replies.values()), replies
        assert replies, "a queue of one batch took a flood without pushing back"
    while len(replies) < flood:
        reply = client.recv()
        replies[reply.seq] = reply  # type: ignore[union-attr]
    busy = {s for s, r in replies.items() if isinstance(r, protocol.Error) and r.code == protocol.E_BUSY}
    acked = {s for s, r in replies.items() if isinstance(r, protocol.Ack)}
    assert busy | acked == set(seqs) and acked
    index = {s: k for k, s in enumerate(seqs)}
    report = check_sequences(read_lines(path), {"warmup": 1, **{f"b{index[s]}": per_batch for s in acked}})
    report.assert_complete()
    assert report.foreign == 0, "records of a busy-refused batch were written"
    assert daemon.file_stats(path)["busy_refusals"] == len(busy)


FSIZE_LIMIT = 64 * 1024


def _limit_file_size() -> None:
    # Runs in the daemon's child process before exec: writes past the limit
    # fail with EFBIG instead of killing the daemon with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_failed_write_is_not_acked_and_leaves_whole_lines(start_daemon, raw_client):
    daemon = start_daemon(preexec_fn=_limit_file_size)
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "big.log")
    acked = 0
    failure = None
    # About 10 kB per batch: the seventh crosses the 64 kB file size limit.
    for k in range(20):
        reply = client.write(path, [seq_record(f"b{k}", i, "p" * 90) for i in range(100)])
        if isinstance(reply, protocol.Error):
            failure = reply
            break
        assert isinstance(reply, protocol.Ack), reply
        acked += 1
    assert failure is not None and failure.code == protocol.E_WRITE_FAILED, failure
    assert 3 <= acked < 20

    # The failed batch was cut back out: every line whole, nothing unacked.
    report = check_sequences(read_lines(path), {f"b{k}": 100 for k in range(acked)}, payloads=False)
    report.assert_complete()
    assert report.foreign == 0
    assert os.path.getsize(path) <= FSIZE_LIMIT

    stats = daemon.file_stats(path)
    assert stats["write_errors"] >= 1
    assert "too large" in stats["last_error"].lower() or "errno 27" in stats["last_error"].lower(), stats
    assert stats["records_written"] == acked * 100

    # The daemon still serves: another file is written and acked.
    other = os.path.join(daemon.log_dir, "small.log")
    assert isinstance(client.write(other, [seq_record("s", i) for i in range(10)]), protocol.Ack)
    check_sequences(read_lines(other), {"s": 10}).assert_complete()
    daemon.wait_ready(timeout=10)
    assert "write to" in daemon.stderr() and "failed" in daemon.stderr()


def _v1(message: dict) -> bytes:
    """A frame exactly as a version-1 client (clh-writerd before protocol 2)
    encoded it: ``v: 1`` and render mode ``lines``."""
    import msgpack

    return msgpack.packb({"v": 1, **message})


def test_a_version_1_client_is_served_by_this_daemon(start_daemon, raw_client):
    """docs/protocol.md, Versioning: a version-2 daemon accepts version-1
    batches, sync records and pings and answers them in version 1's shapes."""
    import msgpack

    daemon = start_daemon()
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "old-client.log")
    who = {"host": "h", "pid": 1, "program": "v1-client", "session": "s"}
    file = {"path": path, "options": {}}
    client.send_raw(_v1({"type": "ping", "id": 7}))
    pong = client.recv()
    assert isinstance(pong, protocol.Ok) and pong.id == 7 and pong.data["protocol"] == protocol.PROTOCOL_VERSION
    for seq in range(1, 4):
        records = [seq_record("old", (seq - 1) * 10 + i) for i in range(10)]
        client.send_raw(_v1({"type": "batch", "client": who, "seq": seq, "file": file, "render": "lines",
                             "records": records}))
        reply = client.recv()
        assert isinstance(reply, protocol.Ack) and reply.seq == seq, reply
    req = client._socket(zmq.REQ)
    try:
        req.connect(daemon.endpoint)
        req.send(_v1({"type": "sync", "client": who, "id": 9, "file": file, "render": "lines",
                      "record": seq_record("old", 30)}))
        assert req.poll(10_000)
        raw = msgpack.unpackb(req.recv())
    finally:
        req.close()
    assert raw["v"] == 1 and raw["type"] == "ok" and raw["id"] == 9, raw  # version 1's reply shape
    check_sequences(read_lines(path), {"old": 31}).assert_complete()
