"""Client text is escaped in `clh-writerd stats` and in the daemon's own log."""

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
