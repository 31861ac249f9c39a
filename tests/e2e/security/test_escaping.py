"""Client text is escaped in `clh-writerd stats` and in the daemon's own log; what a
daemon says is escaped by the client."""

import logging
import os
import subprocess
import sys

from clh_writerd import protocol
from support import seq_record

from .conftest import HonestClient

EVIL_PROGRAM = "app\x1b[2J\x1b[31mRED\nFORGED LINE\u202e"
EVIL_NAME = "evil\nINFO clh-writerd[1]: forged\x1b[0m.log"


def test_control_characters_from_clients_are_escaped(start_daemon, raw_client, security_row):
    daemon = start_daemon()
    with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest.log")) as honest:
        client = raw_client(daemon.endpoint, EVIL_PROGRAM)
        client.client = client.client._replace(host="host\x1b]0;title\x07")
        path = os.path.join(daemon.log_dir, EVIL_NAME)
        assert isinstance(client.write(path, [seq_record("e", 0)]), protocol.Ack)
        # Refused ones are logged too (a warning naming the path).
        reply = client.write(path + "\x00", [seq_record("e", 1)])
        assert isinstance(reply, protocol.Error)
        client.dealer.send(protocol.encode_report(client.client, {"dropped": 3}))
        assert isinstance(client.recv(), protocol.Ok)
        honest.stop()
        lost = honest.lost()
    table = subprocess.run([sys.executable, "-m", "clh_writerd", "stats", "--endpoint", daemon.endpoint],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b" in out and "\\n" in out
    assert not any(line.startswith(("FORGED", "INFO clh-writerd[1]")) for line in out.splitlines())
    daemon.stop()
    log = daemon.stderr()
    assert "\x1b" not in log
    assert not any(line.startswith("INFO clh-writerd[1]") for line in log.splitlines())
    assert "evil\\nINFO" in log  # the serving line names the file, escaped
    security_row("control characters in host, program and path",
                 "escaped (\\n, \\x1b, \\u202e) in `clh-writerd stats` and in the daemon's log lines",
                 "no raw ESC/BEL/RLO, no forged line in the stats table or the daemon log; "
                 f"honest client {honest.acked} records", lost)


class HostileDaemon:
    """A daemon that lies in its replies: control characters in every error, and (``huge``) acks of
    1 MiB a client should never buffer. Runs in a thread of the test; its directory is ours, so the
    client trusts the endpoint: only what it says is hostile."""

    def __init__(self, endpoint: str, huge: bool) -> None:
        import threading

        import zmq

        self.endpoint, self.huge = endpoint, huge
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgpack

        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            request = protocol.decode_request(frames[-1])
            if isinstance(request, protocol.Batch):
                self.batches += 1
                if self.huge:  # a valid ack padded to 1 MiB
                    reply = msgpack.packb({"v": 1, "type": "ack", "seq": request.seq, "pad": "x" * (1 << 20)})
                else:
                    reply = protocol.encode_error("forbidden_path", "\x1b]0;pwned\x07\x1b[2J\nINFO forged line\u202e",
                                                  seq=request.seq)
            else:
                reply = protocol.encode_ok(getattr(request, "id", 0), {"max_message_bytes": 1 << 20, "protocol": 1})
            self.sock.send_multipart(frames[:-1] + [reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.context.term()


class Capture(logging.Handler):
    """Keeps the formatted notices of the clh_writerd.client logger."""

    def __init__(self) -> None:
        super().__init__()
        self.notices: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.notices.append(self.format(record))


def test_a_hostile_daemon_can_neither_write_escapes_into_warnings_nor_grow_a_client(tmp_path, security_row):
    import tempfile

    from clh_writerd import create_nonblocking_handler
    from support import check_sequences, read_lines

    seen = []
    for huge in (False, True):
        sockdir = tempfile.mkdtemp(prefix="cw-", dir="/tmp")
        fake = HostileDaemon(f"ipc://{sockdir}/w.sock", huge)
        path = str(tmp_path / f"app-{huge}.log")
        capture = Capture()
        client_log = logging.getLogger("clh_writerd.client")
        client_log.addHandler(capture)
        handler = create_nonblocking_handler(path, endpoint=fake.endpoint, ack_timeout=0.5, liveness_timeout=0.5)
        logger = logging.getLogger(f"hostile-{huge}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        try:
            for n in range(50):
                logger.info(seq_record("app", n))
            handler.flush()
            stats = handler.get_stats()
        finally:
            logger.removeHandler(handler)
            handler.close()
            client_log.removeHandler(capture)
            fake.close()
        check_sequences(read_lines(path), {"app": 50}).assert_complete(allow_duplicates=True)
        assert fake.batches > 0  # it did talk to the hostile daemon
        text = "\n".join(capture.notices) + str(stats.get("last_error"))
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, text
        assert not any(line.startswith("INFO forged") for line in text.splitlines())
        if huge:  # acks over MAXMSGSIZE are never read: the records went through the fallback
            assert stats["acked"] == 0 and stats["fallback_written"] > 0, stats
        else:
            assert "\\x1b" in text
        seen.append(stats)
    security_row("a hostile daemon answers with ESC/BEL/newline/RLO in its error messages, or with 1 MiB acks "
                 "(was: the client accepted 512 MiB frames and copied raw ESC into its warnings)",
                 "errors decoded with control characters escaped before any warning or get_stats(); a handler "
                 "socket takes no reply over 64 KiB (MAXMSGSIZE): the records go through the fallback",
                 f"no raw control character in the notices or last_error; 0 huge acks read, "
                 f"{seen[1]['fallback_written']} records written by the fallback", 0)
