"""The daemon's lifecycle seen from outside: signals, start-up refusals,
endpoints, reload, and hostile input that must not stop it serving."""

import os
import re
import signal

import msgpack
import pytest
from support import (
    check_sequences,
    free_tcp_port,
    hold_clh_lock,
    read_lines,
    seq_record,
    short_socket_dir,
    wait_for,
    write_config,
)

from clh_writerd import protocol

# Exit codes of `clh-writerd` (EXIT_* in clh_writerd.daemon.server); spelled
# out here because they are what a supervisor sees.
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_FORCED = 130


def _exit_code(daemon, timeout: float = 30.0) -> int:
    assert daemon.proc is not None
    return daemon.proc.wait(timeout)


def _batch_writers(lines, prefix: str = "b"):
    """The batch writers (one per batch) that have at least one line in ``lines``."""
    return {line.split()[1] for line in lines if line.startswith(f"SEQ {prefix}")}


@pytest.mark.guarantee
def test_sigterm_drains_and_every_acked_batch_is_written(start_daemon, raw_client, guarantee):
    daemon = start_daemon()
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "drain.log")
    assert isinstance(client.write(path, [seq_record("warmup", 0)]), protocol.Ack)
    # Fewer batches than limits.queue_batches (256), so none is refused as busy.
    per_batch, batches = 20, 200
    # Another writer holds the file's lock, so what the daemon has received
    # when SIGTERM arrives is still queued, unwritten: the drain must write it.
    with hold_clh_lock(path):
        for k in range(batches):
            client.send_batch(path, [seq_record(f"b{k}", i) for i in range(per_batch)])
        # Batches in the queue, not only in the writer's hands: the writer
        # takes what has arrived when it wakes (all of it, on a loaded
        # machine: "draining 0 queued" once) and waits for the lock with it.
        wait_for(lambda: daemon.file_stats(path)["queue_depth"] > 0, what="batches to be queued")
        daemon.send_signal(signal.SIGTERM)
        draining = wait_for(lambda: re.search(r"draining (\d+) queued", daemon.stderr()), what="the drain to start")
        assert daemon.proc.poll() is None
    assert _exit_code(daemon) == 0, daemon.stderr()
    # The daemon has exited: whatever it replied is already on our side.
    replies = []
    while True:
        reply = client.try_recv(1.0)
        if reply is None:
            break
        replies.append(reply)

    acked = {f"b{r.seq - 2}" for r in replies if isinstance(r, protocol.Ack)}
    refused = {f"b{r.seq - 2}" for r in replies if isinstance(r, protocol.Error)}
    assert all(r.code == protocol.E_SHUTTING_DOWN for r in replies if isinstance(r, protocol.Error)), replies
    # The batches still queued at the signal (the log does not count those
    # the writer thread already holds) were written and acknowledged.
    assert len(acked) >= int(draining.group(1)) > 0, (len(acked), draining.group(0))
    lines = read_lines(path)
    report = check_sequences(lines, {"warmup": 1, **{w: per_batch for w in acked}})
    guarantee("G. SIGTERM drain", f"SIGTERM with {batches} batches queued behind a held file lock: "
              "every acknowledged batch written, nothing unacknowledged", report.expected, report.missing_count,
              report.duplicates)
    report.assert_complete()
    # No batch is in the file without its ack, and none refused as shutting_down is.
    assert _batch_writers(lines) == acked, f"written but not acked: {_batch_writers(lines) - acked}"
    assert not refused & acked
    print(f"{len(acked)} of {batches} batches acked, {len(refused)} refused as shutting_down")


def test_second_daemon_on_the_same_endpoint_refuses_to_start(start_daemon, raw_client, tmp_path):
    first = start_daemon()
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = start_daemon(wait=False, workdir=str(second_dir), endpoint=first.endpoint)
    assert _exit_code(second) == EXIT_STARTUP
    assert f"another clh-writerd (pid {first.proc.pid}) is already serving" in second.stderr(), second.stderr()
    # The first one still owns the socket and writes.
    client = raw_client(first.endpoint)
    path = os.path.join(first.log_dir, "app.log")
    assert isinstance(client.write(path, [seq_record("w", i) for i in range(10)]), protocol.Ack)
    check_sequences(read_lines(path), {"w": 10}).assert_complete()
    assert first.stats()["daemon"]["pid"] == first.proc.pid


def test_socket_left_by_a_killed_daemon_does_not_block_a_restart(start_daemon, raw_client, tmp_path):
    first = start_daemon()
    first.kill()
    socket_path = first.endpoint[len("ipc://"):]
    assert os.path.exists(socket_path), "SIGKILL should leave the socket file behind"
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = start_daemon(workdir=str(second_dir), endpoint=first.endpoint)
    client = raw_client(second.endpoint)
    path = os.path.join(second.log_dir, "app.log")
    assert isinstance(client.write(path, [seq_record("w", i) for i in range(10)]), protocol.Ack)
    check_sequences(read_lines(path), {"w": 10}).assert_complete()
    assert second.stats()["daemon"]["pid"] == second.proc.pid


def test_ipc_path_too_long_is_a_config_error(start_daemon):
    long_path = os.path.join(short_socket_dir(), "s" * 110 + ".sock")
    daemon = start_daemon(wait=False, endpoint=f"ipc://{long_path}")
    assert _exit_code(daemon) == EXIT_CONFIG
    assert "107-byte limit" in daemon.stderr(), daemon.stderr()
    assert not os.path.exists(long_path)


def test_sighup_reloads_allowed_dirs_and_keeps_running_on_a_bad_config(start_daemon, raw_client, tmp_path):
    daemon = start_daemon()
    client = raw_client(daemon.endpoint)
    extra = str(tmp_path / "extra")
    new_path = os.path.join(extra, "new.log")
    refused = client.write(new_path, [seq_record("x", 0)])
    assert isinstance(refused, protocol.Error) and refused.code == protocol.E_FORBIDDEN_PATH, refused

    sections = {"daemon": {"endpoint": daemon.endpoint, "allowed_dirs": [daemon.log_dir, extra]}}
    write_config(daemon.config_path, sections)
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.stats()["daemon"]["counters"]["reloads"] >= 1, what="the reload")
    assert isinstance(client.write(new_path, [seq_record("n", i) for i in range(10)]), protocol.Ack)
    check_sequences(read_lines(new_path), {"n": 10}).assert_complete()
    assert daemon.stats()["daemon"]["counters"]["reloads"] == 1

    # A broken config is refused at reload; the running one stays in force.
    with open(daemon.config_path, "w") as f:
        f.write("[daemon\nallowed_dirs = 42\n")
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, keeping the running configuration" in daemon.stderr(),
             what="the reload error in the log")
    assert isinstance(client.write(new_path, [seq_record("m", i) for i in range(10)]), protocol.Ack)
    check_sequences(read_lines(new_path), {"n": 10, "m": 10}).assert_complete()
    assert daemon.stats()["daemon"]["counters"]["reloads"] == 1
    assert daemon.proc.poll() is None


def test_second_sigint_forces_exit_while_draining(start_daemon, raw_client):
    # A long drain timeout: only the second SIGINT can end this drain quickly.
    daemon = start_daemon(daemon={"drain_timeout": 120.0})
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "stuck.log")
    assert isinstance(client.write(path, [seq_record("w", 0)]), protocol.Ack)
    # Another writer holds the file's lock, so the drain cannot finish.
    with hold_clh_lock(path):
        client.send_batch(path, [seq_record("w", 1)])
        wait_for(lambda: daemon.file_stats(path)["records_received"] == 2, what="the batch to be queued")
        daemon.send_signal(signal.SIGINT)
        wait_for(lambda: "stopping: draining" in daemon.stderr(), what="the drain to start")
        assert daemon.proc.poll() is None, "the first SIGINT must drain, not exit"
        daemon.send_signal(signal.SIGINT)
        assert _exit_code(daemon, timeout=20) == EXIT_FORCED, daemon.stderr()
    # Unwritten, so never acknowledged.
    assert client.try_recv(0.5) is None
    check_sequences(read_lines(path), {"w": 1}).assert_complete()


def test_tcp_loopback_endpoint_serves(start_daemon, raw_client):
    # Plain tcp only when asked for (CURVE: tests/e2e/security/test_peers.py), and warned about.
    daemon = start_daemon(endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", daemon={"tcp_auth": "none"})
    assert 'tcp_auth = "none"' in daemon.stderr()
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "tcp.log")
    assert isinstance(client.write(path, [seq_record("w", i) for i in range(50)]), protocol.Ack)
    reply = client.sync(path, seq_record("s", 0))
    assert isinstance(reply, protocol.Ok), reply
    check_sequences(read_lines(path), {"w": 50, "s": 1}).assert_complete()


def test_non_loopback_tcp_needs_allow_remote_tcp(start_daemon, raw_client, tmp_path):
    port = free_tcp_port()
    refused_dir, allowed_dir = tmp_path / "refused", tmp_path / "allowed"
    refused_dir.mkdir()
    allowed_dir.mkdir()
    refused = start_daemon(wait=False, workdir=str(refused_dir), endpoint=f"tcp://0.0.0.0:{port}",
                           daemon={"tcp_auth": "none"})
    assert _exit_code(refused) == EXIT_CONFIG
    assert "not a loopback address" in refused.stderr() and "allow_remote_tcp" in refused.stderr()

    daemon = start_daemon(wait=False, workdir=str(allowed_dir), endpoint=f"tcp://0.0.0.0:{port}",
                          daemon={"allow_remote_tcp": True, "tcp_auth": "none"})
    # 0.0.0.0 is an address to bind, not to connect to: reach it over loopback.
    daemon.endpoint = f"tcp://127.0.0.1:{port}"
    daemon.wait_ready()
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "remote.log")
    assert isinstance(client.write(path, [seq_record("w", i) for i in range(10)]), protocol.Ack)
    check_sequences(read_lines(path), {"w": 10}).assert_complete()


def test_malformed_frames_are_counted_and_do_not_disturb_others(start_daemon, raw_client):
    daemon = start_daemon(limits={"max_message_bytes": 4096})
    good = raw_client(daemon.endpoint, "good")
    bad = raw_client(daemon.endpoint, "bad")
    path = os.path.join(daemon.log_dir, "good.log")
    unknown = msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "frobnicate", "id": 1})
    wrong_version = msgpack.packb({"v": 99, "type": "ping", "id": 1})
    too_many_frames = [b"a", b"b", b"c"]
    n = 0

    def good_batch() -> None:
        nonlocal n
        reply = good.write(path, [seq_record("g", n + i) for i in range(20)])
        assert isinstance(reply, protocol.Ack), reply
        n += 20

    good_batch()
    bad.send_raw(b"\xc1 definitely not msgpack")
    good_batch()
    assert bad.recv().code == protocol.E_MALFORMED  # type: ignore[union-attr]
    bad.send_raw(unknown)
    good_batch()
    assert bad.recv().code == protocol.E_UNKNOWN_TYPE  # type: ignore[union-attr]
    bad.send_raw(wrong_version)
    assert bad.recv().code == protocol.E_VERSION  # type: ignore[union-attr]
    bad.dealer.send_multipart(too_many_frames)
    good_batch()
    # Larger than max_message_bytes: zmq drops it and disconnects the sender.
    bad.send_batch(path, [seq_record("huge", i, "h" * 100) for i in range(100)])
    good_batch()

    def counted() -> dict:
        counters = daemon.stats()["daemon"]["counters"]
        return counters if counters["malformed"] >= 2 else {}

    counters = wait_for(counted, what="the malformed frames to be counted")
    assert counters["malformed"] == 2  # garbage bytes, and four frames instead of two
    assert counters["unknown_type"] == 1
    assert counters["unsupported_version"] == 1
    good_batch()
    report = check_sequences(read_lines(path), {"g": n})
    report.assert_complete()
    assert report.foreign == 0, "the oversize batch was written"
    assert daemon.file_stats(path)["records_written"] == n


def test_oversize_frame_is_counted(start_daemon, raw_client):
    daemon = start_daemon(limits={"max_message_bytes": 4096})
    bad = raw_client(daemon.endpoint, "bad")
    path = os.path.join(daemon.log_dir, "app.log")
    # Over max_message_bytes but under twice that: refused with a reply and
    # counted (far larger frames are cut off by libzmq before they are buffered).
    seq = bad.send_batch(path, [seq_record("huge", i, "h" * 100) for i in range(50)])
    reply = bad.recv()
    assert isinstance(reply, protocol.Error) and reply.code == "too_large" and reply.seq == seq

    def counted() -> bool:
        return daemon.stats()["daemon"]["counters"]["too_large"] >= 1

    wait_for(counted, timeout=5, what="the oversize frame to be counted")
