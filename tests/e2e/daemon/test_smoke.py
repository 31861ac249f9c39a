"""The daemon end to end: batches from a raw client land in the file, in order."""

import os

from clh_writerd import protocol
from support import check_sequences, per_writer_order, read_lines, seq_record


def test_batches_land_in_order_and_are_acked(start_daemon, raw_client, tmp_path):
    daemon = start_daemon()
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "app.log")
    n = 0
    for _ in range(20):
        reply = client.write(path, [seq_record("w1", n + i) for i in range(100)])
        assert isinstance(reply, protocol.Ack)
        n += 100
    lines = read_lines(path)
    check_sequences(lines, {"w1": n}).assert_complete()
    assert per_writer_order(lines) == {"w1": True}
    stats = daemon.file_stats(path)
    assert stats["records_written"] == n
    assert daemon.stop() == 0
