"""The forwarder inside a real clh-writerd: started by [forward], visible in stats and metrics, stopped by SIGTERM."""

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

from support import DaemonProcess, check_sequences, free_tcp_port, seq_record, wait_for, write_config

from clh_writerd import protocol
from clh_writerd.forward.relp import FrameParser, encode_frame


def forwarding_daemon(tmp_path, central, **daemon_options) -> DaemonProcess:
    daemon = DaemonProcess(str(tmp_path))
    write_config(daemon.config_path, {
        "daemon": {"endpoint": daemon.endpoint, "allowed_dirs": [daemon.log_dir], **daemon_options},
        "forward": {"target": central.target, "paths": [os.path.join(daemon.log_dir, "*.log")],
                    "state_file": str(tmp_path / "forward.json"), "hostname": "web1"}})
    return daemon


def test_stats_metrics_and_a_clean_stop(tmp_path, central, raw_client):
    pytest.importorskip("prometheus_client")
    central.start()
    port = free_tcp_port()
    daemon = forwarding_daemon(tmp_path, central, metrics_listen=f"127.0.0.1:{port}")
    try:
        daemon.start()
        client = raw_client(daemon.endpoint)
        path = os.path.join(daemon.log_dir, "app.log")
        for k in range(10):
            assert isinstance(client.write(path, [seq_record("w", 50 * k + i) for i in range(50)]), protocol.Ack)
        wait_for(lambda: check_sequences(central.lines(), {"w": 500}).missing_count == 0, 20, "500 records")
        wait_for(lambda: daemon.stats()["forward"]["files"][0]["lag_bytes"] == 0, 10, "no lag")
        fwd = daemon.stats()["forward"]
        assert fwd["connected"] and fwd["acked"] == 500 and fwd["lost_segments"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert f'clh_writerd_forward_connected{{target="{central.target}"}} 1.0' in text
        assert 'clh_writerd_forward_events_total{event="acked"} 500.0' in text
        for event in ("gaps", "lost_bytes", "protocol_errors"):
            assert f'clh_writerd_forward_events_total{{event="{event}"}} 0.0' in text
        assert f'clh_writerd_forward_lag_bytes{{path="{path}"}} 0.0' in text
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
    # SIGTERM wrote the checkpoint: the whole file is acknowledged.
    with open(tmp_path / "forward.json") as f:
        (segment,) = json.load(f)["segments"].values()
    assert segment["offset"] == os.path.getsize(path)
    assert "forward: connected" in daemon.stderr()


def test_check_config_rejects_forwarding_without_paths(tmp_path):
    path = write_config(str(tmp_path / "c.toml"), {"forward": {"target": "127.0.0.1:2514"}})
    out = subprocess.run([sys.executable, "-m", "clh_writerd", "check-config", path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "forward.paths is empty" in out.stderr


def test_an_unreadable_checkpoint_is_a_start_up_failure(tmp_path, central):
    daemon = forwarding_daemon(tmp_path, central)
    (tmp_path / "forward.json").write_text("{torn")
    try:
        daemon.start(wait=False)
        assert daemon.proc.wait(30) == 3  # EXIT_STARTUP: refuse rather than resend or skip everything
    finally:
        daemon.cleanup()
    assert "unreadable forward checkpoint" in daemon.stderr()


class HostileCentral:
    """A "central" that answers the RELP open, then misbehaves, one behaviour per connection (issue 29).

    giant: an rsp announcing 999,999,999 bytes, then an endless stream; huge: a 10-digit DATALEN;
    garbage: random bytes; flood: well-formed rsp frames for transactions never sent. With
    ``records``, it first acks one syslog frame (so others are in flight) and then misbehaves.
    Each stream stops at CAP bytes or when the client hangs up (what a bounded client does at once).
    """

    CAP = 256 * 1024 * 1024

    def __init__(self, port: int, behaviours) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.behaviours = list(behaviours)
        self.streamed = []  # (behaviour, bytes sent before the client hung up)
        self.acked = []  # the records this "central" acknowledged (and did not keep)
        self.stopping = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for behaviour, records in self.behaviours:
            conn = None
            while conn is None and not self.stopping:
                try:
                    conn, _ = self.listener.accept()
                except socket.timeout:
                    continue
            if conn is None:
                return
            with conn:
                self.streamed.append((behaviour, self.misbehave(conn, behaviour, records)))

    def misbehave(self, conn: socket.socket, behaviour: str, records: bool) -> int:
        parser = FrameParser(max_data=10**6)
        frames = []
        conn.settimeout(20)
        while not frames:
            frames += parser.feed(conn.recv(65536))
        offers = b"200 OK\nrelp_version=0\nrelp_software=hostile\ncommands=syslog"
        conn.sendall(encode_frame(frames.pop(0)[0], b"rsp", offers))
        if records:
            while not any(command == b"syslog" for _, command, _ in frames):
                frames += parser.feed(conn.recv(65536))
            txnr, _, message = next(f for f in frames if f[1] == b"syslog")
            conn.sendall(encode_frame(txnr, b"rsp", b"200 OK"))
            self.acked.append(message.split(b" - ", 3)[-1].decode())
        else:
            txnr = 1
        if behaviour == "giant":
            head, chunk = b"%d rsp 999999999 " % (txnr + 1), b"x" * 65536
        elif behaviour == "huge":
            head, chunk = b"%d rsp 9999999999 " % (txnr + 1), b"x" * 65536
        elif behaviour == "garbage":
            head, chunk = b"", os.urandom(65536)
        else:
            head, chunk = b"", b"".join(encode_frame(500_000_000 + i, b"rsp", b"200 OK") for i in range(4000))
        sent = 0
        try:
            conn.sendall(head)
            while sent < self.CAP:
                if behaviour == "flood":  # new transaction numbers each time: a set of acks would grow
                    chunk = b"".join(encode_frame(500_000_000 + sent // 20 + i, b"rsp", b"200 OK") for i in range(4000))
                conn.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the client hung up: what we want
        return sent

    def close(self) -> None:
        self.stopping = True
        self.thread.join(30)
        self.listener.close()


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])


def test_a_hostile_central_is_disconnected_and_counted_with_memory_flat(tmp_path, central, raw_client):
    """A central that streams a giant frame, garbage or unsolicited acks, with records in flight or
    not: the daemon hangs up each time (protocol_errors), its peak memory stays flat, and once a
    real central listens on the same port every record arrives."""
    daemon = forwarding_daemon(tmp_path, central)
    idle = [("giant", False), ("garbage", False)]
    busy = [("giant", True), ("huge", True), ("garbage", True), ("flood", True)]
    hostile = HostileCentral(central.port, idle + busy)
    try:
        daemon.start()
        baseline = peak_rss_kib(daemon.proc.pid)
        wait_for(lambda: len(hostile.streamed) == len(idle), 30, "the idle sessions")
        client = raw_client(daemon.endpoint)
        path = os.path.join(daemon.log_dir, "app.log")
        for k in range(10):
            assert isinstance(client.write(path, [seq_record("w", 50 * k + i) for i in range(50)]), protocol.Ack)
        wait_for(lambda: len(hostile.streamed) == len(idle + busy), 60, "every hostile session")
        wait_for(lambda: daemon.stats()["forward"]["protocol_errors"] == len(idle + busy), 10, "every one counted")
        grown = peak_rss_kib(daemon.proc.pid) - baseline
        print(f"hostile central: streamed {hostile.streamed}; daemon peak RSS grew {grown} KiB")
        assert all(sent < HostileCentral.CAP for _, sent in hostile.streamed), hostile.streamed
        assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB"
        hostile.close()
        central.start()  # a real central on the same port: forwarding resumes
        # A record the hostile central acknowledged is its loss, not the forwarder's (it may or may
        # not have been taken as acked, as the ack shared a read with the garbage): nothing else is missing.
        taken = {int(line.split()[2]) for line in hostile.acked}

        def complete() -> bool:
            return set(check_sequences(central.lines(), {"w": 500}).missing.get("w", [])) <= taken

        wait_for(complete, 30, f"500 records, except those the hostile central acked ({sorted(taken)})")
        fwd = daemon.stats()["forward"]
        assert fwd["connected"] and fwd["last_error"] == "" and fwd["lost_segments"] == 0
        assert daemon.stop() == 0
    finally:
        hostile.close()
        daemon.cleanup()
