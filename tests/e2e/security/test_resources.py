"""Bounded resources: no client can make the daemon abort or grow without bound.

One daemon for the module, started with RLIMIT_NOFILE = 512 (soft and hard)
so the derived limits are small enough to reach: 48 files, 192 descriptors for connections.
Each attack records the daemon's RSS, threads and descriptors before and
after, and an honest client writes throughout.
"""

import os
import resource
import uuid

import msgpack
import pytest
import zmq

from clh_writerd import protocol
from support import DaemonProcess, RawClient, hold_clh_lock, seq_record, wait_for

from .conftest import HonestClient, describe_resources, resources

NOFILE = 512
QUEUE = 32
# Figures the daemon must stay under whatever a client does (docs/security.md).
RSS_BOUND_KIB = 120 * 1024
FD_BOUND = NOFILE
THREAD_BOUND = 64 + 8
# Pings a client sends and never reads the replies of: 20x the reply cap shows
# the cap; the daemon answers them at its own pace (about 3k/s under coverage
# on a loaded 2-core machine), hence the deadline below.
DEAF_PINGS = 20000
DEAF_DEADLINE = 120.0
# What the daemon may keep after a connection flood has gone (the flood's peak
# is 40-100 MiB above the start).
RETURNED_SLACK_KIB = 24 * 1024


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("resources"))
    process = DaemonProcess(workdir, limits={"queue_batches": QUEUE, "max_clients": 1000},
                            preexec_fn=_limit_fds)
    process.start()
    yield process
    process.cleanup()


def _within_bounds(daemon, after, fd_bound: int = FD_BOUND) -> None:
    assert daemon.proc.poll() is None, daemon.stderr()[-2000:]
    assert after["rss_kib"] < RSS_BOUND_KIB, after
    assert after["fds"] < fd_bound, after
    assert after["threads"] < THREAD_BOUND, after


def _row(security_row, daemon, attack, expected, observed, honest, before, after):
    security_row(attack, expected, observed + f"; honest client {honest.acked} records", honest.lost(),
                 describe_resources(before, after))


def test_many_files_are_served_within_the_descriptor_limit(daemon, raw_client, security_row):
    limits = daemon.stats()["daemon"]["limits"]
    assert limits["nofile"] == NOFILE and limits["max_files"] == 48 and limits["connections"] == 192
    client = raw_client(daemon.endpoint, "many-files")
    before = resources(daemon.proc.pid)
    files = 400
    with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest-files.log")) as honest:
        for n in range(files):
            path = os.path.join(daemon.log_dir, "many", f"f{n}.log")
            assert isinstance(client.write(path, [seq_record("m", n)]), protocol.Ack), n
        honest.stop()
    after = resources(daemon.proc.pid)
    _within_bounds(daemon, after)
    closed = daemon.stats()["daemon"]["counters"]["files_closed"]
    assert closed >= files - limits["max_files"]
    for n in range(0, files, 37):
        with open(os.path.join(daemon.log_dir, "many", f"f{n}.log")) as f:
            assert f.read() == seq_record("m", n) + "\n"
    _row(security_row, daemon, f"{files} distinct files from one client (RLIMIT_NOFILE {NOFILE})",
         f"every batch acked; least recently used idle files closed (max_files {limits['max_files']} derived "
         "from the limit); no abort", f"{files} acked, {closed} files closed", honest, before, after)


def _stats(observer: RawClient) -> dict:
    """Stats over a connection made before the flood (new ones are refused while it lasts)."""
    for _ in range(12):  # a paused listener drops connections: ask again after the reconnect
        observer.dealer.send(protocol.encode_stats_request())
        reply = observer.try_recv(5.0)
        if reply is not None:
            assert isinstance(reply, protocol.Ok), reply
            return reply.data
    raise AssertionError("no stats reply within 60 s")


FLOOD_NOFILE = 4096


def _limit_fds_flood() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD_NOFILE, FLOOD_NOFILE))


@pytest.fixture
def flood_daemon(tmp_path):
    process = DaemonProcess(str(tmp_path), preexec_fn=_limit_fds_flood)
    process.start()
    yield process
    process.cleanup()


def test_connection_flood_is_shut_down_beyond_the_limit(flood_daemon, raw_client, security_row):
    daemon = flood_daemon
    limits = daemon.stats()["daemon"]["limits"]
    observer = raw_client(daemon.endpoint, "observer")
    _stats(observer)
    before = resources(daemon.proc.pid)
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = FLOOD_NOFILE + 100
    sockets = []
    with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest-conns.log")) as honest:
        try:
            for _ in range(FLOOD_NOFILE):  # as many as the descriptor limit: libzmq used to abort in accept()
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(daemon.endpoint)
                s.send(protocol.encode_ping())
                sockets.append(s)
            wait_for(lambda: _stats(observer)["daemon"]["counters"]["connections_refused"] > 0,
                     what="connections beyond the limit to be refused")
            during = resources(daemon.proc.pid)
            _within_bounds(daemon, during, FLOOD_NOFILE)
            acked = honest.acked
            wait_for(lambda: honest.acked > acked + 100, what="the honest client to go on")
        finally:
            for s in sockets:
                s.close(0)
            ctx.destroy(linger=0)
        refused = _stats(observer)["daemon"]["counters"]["connections_refused"]
        honest.stop()
    wait_for(lambda: resources(daemon.proc.pid)["fds"] < before["fds"] + 10, what="descriptors to come back")
    # Thousands of connections cost libzmq tens of MiB; the daemon hands that
    # memory back once they are gone instead of staying at its peak for good.
    wait_for(lambda: resources(daemon.proc.pid)["rss_kib"] < before["rss_kib"] + RETURNED_SLACK_KIB,
             what="the flood's memory to be returned")
    after = resources(daemon.proc.pid)
    _within_bounds(daemon, after, FLOOD_NOFILE)
    paused = daemon.stats()["daemon"]["counters"]["listener_paused"]
    _row(security_row, daemon, f"{FLOOD_NOFILE} idle connections (RLIMIT_NOFILE {FLOOD_NOFILE})",
         f"descriptors for connections capped at about limits.connections ({limits['connections']}); each one "
         "beyond is shut down at once and counted; "
         "listening paused while descriptors are short; no abort; the connections' memory returned once they are gone",
         f"{refused} shut down, listener paused {paused} time(s), fds during {during['fds']}", honest, before, after)


CAPPED_CONNECTIONS = 32


def test_connections_are_capped_by_max_connections(tmp_path, raw_client, security_row):
    """The descriptor-derived figure can be tens of thousands (LimitNOFILE=65536): max_connections
    bounds the memory a flood can take whatever the descriptor limit."""
    daemon = DaemonProcess(str(tmp_path), limits={"max_connections": CAPPED_CONNECTIONS})
    daemon.start()
    ctx = zmq.Context()
    try:
        limits = daemon.stats()["daemon"]["limits"]
        assert limits["nofile"] > 1024 and limits["connections"] == CAPPED_CONNECTIONS, limits
        observer = raw_client(daemon.endpoint, "observer")
        _stats(observer)
        with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest-capped.log")) as honest:
            before = resources(daemon.proc.pid)
            attackers = []
            for _ in range(10 * CAPPED_CONNECTIONS):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.RECONNECT_IVL, -1)  # what is shut down stays down: the steady state is the cap
                s.connect(daemon.endpoint)
                try:
                    s.send(protocol.encode_ping(), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # its connection was already shut down (and not retried): no pipe to queue on
                attackers.append(s)
            wait_for(lambda: _stats(observer)["daemon"]["counters"]["connections_refused"] > 0,
                     what="connections beyond max_connections to be refused")
            wait_for(lambda: resources(daemon.proc.pid)["fds"] <= before["fds"] + CAPPED_CONNECTIONS,
                     what="the daemon to hold no more than max_connections connections")
            during = resources(daemon.proc.pid)
            acked = honest.acked
            wait_for(lambda: honest.acked > acked + 100, what="the honest client to go on")
            for s in attackers:
                s.close(0)
            honest.stop()
        refused = _stats(observer)["daemon"]["counters"]["connections_refused"]
        assert refused >= 3 * CAPPED_CONNECTIONS, refused  # of the 9x beyond the cap, some never get through the listen backlog
        assert daemon.proc.poll() is None, daemon.stderr()[-2000:]
        security_row(f"{10 * CAPPED_CONNECTIONS} idle connections, limits.max_connections = {CAPPED_CONNECTIONS}",
                     "connections capped at max_connections whatever RLIMIT_NOFILE allows (memory: about 30 KiB "
                     "each); each one beyond is shut down at once and counted",
                     f"{refused} shut down, daemon fds {before['fds']} -> {during['fds']} during the flood; "
                     f"honest client {honest.acked} records", honest.lost(), describe_resources(before, during))
    finally:
        ctx.destroy(linger=0)
        daemon.cleanup()


def test_sync_records_unread_replies_reports_and_endless_multipart_stay_bounded(daemon, security_row):
    before = resources(daemon.proc.pid)
    ctx = zmq.Context()
    blocked = os.path.join(daemon.log_dir, "held.log")
    attacker = RawClient(daemon.endpoint, "flood")
    try:
        with HonestClient(daemon.endpoint, os.path.join(daemon.log_dir, "honest-flood.log")) as honest:
            assert isinstance(attacker.write(blocked, [seq_record("s", 0)]), protocol.Ack)
            with hold_clh_lock(blocked):  # the file's writer is stuck: sync records pile up
                # The writer took at most QUEUE before it blocked, QUEUE more wait: the rest is refused.
                # Sent in windows the attacker reads between (one that never reads loses its replies:
                # that is the deaf client below).
                busy = 0
                for start in range(0, 3000, 250):
                    for n in range(start, start + 250):
                        attacker.dealer.send(protocol.encode_sync(attacker.client, n, blocked, {}, "x" * 1000))
                    while busy < start + 250 - 2 * QUEUE:
                        reply = attacker.recv()
                        assert isinstance(reply, protocol.Error) and reply.code == protocol.E_BUSY, reply
                        busy += 1
            ok = 0
            for _ in range(3000 - busy):
                reply = attacker.recv()
                if isinstance(reply, protocol.Ok):
                    ok += 1
                else:
                    assert isinstance(reply, protocol.Error) and reply.code == protocol.E_BUSY, reply
                    busy += 1
            assert ok <= 2 * QUEUE and ok + busy == 3000
            # Replies never read: a DEALER sends pings and never receives.
            deaf = ctx.socket(zmq.DEALER)
            deaf.setsockopt(zmq.LINGER, 0)
            deaf.setsockopt(zmq.SNDHWM, 0)
            deaf.setsockopt(zmq.SNDTIMEO, 10000)  # fail, never hang, if the daemon refused the connection
            deaf.connect(daemon.endpoint)
            for n in range(DEAF_PINGS):
                deaf.send(protocol.encode_ping(n))
            # Reports with many distinct counter names, from many sessions. Sent in windows
            # below the reply cap: a client with reply_hwm replies unread loses the next ones
            # (as the deaf one does), and this one must see every report answered.
            reply_hwm = daemon.stats()["daemon"]["limits"]["reply_hwm"]
            window = reply_hwm // 2
            for start in range(0, 2000, window):
                ids = range(start, min(start + window, 2000))
                for n in ids:
                    client = protocol.new_client_id(f"r{n}")
                    names = {uuid.uuid4().hex: 1 for _ in range(protocol.MAX_COUNTERS)}
                    attacker.dealer.send(protocol.encode_report(client, names, id=n))
                for n in ids:
                    reply = attacker.recv()
                    assert isinstance(reply, protocol.Ok) and reply.id == n, (reply, n)
            # The deaf client's replies beyond the cap were dropped, and counted.
            unread_max = 4 * reply_hwm  # its pipes on both sides and the socket buffers
            wait_for(lambda: daemon.stats()["daemon"]["counters"]["replies_dropped"] >= DEAF_PINGS - unread_max,
                     DEAF_DEADLINE, what="the deaf client's replies beyond the cap to be dropped and counted")
            # A multipart message that never ends (100 MB of 1 KB frames).
            endless = ctx.socket(zmq.DEALER)
            endless.setsockopt(zmq.LINGER, 0)
            endless.setsockopt(zmq.SNDTIMEO, 10000)
            endless.connect(daemon.endpoint)
            for _ in range(100000):
                endless.send(b"x" * 1024, zmq.SNDMORE)
            ping = attacker.write  # the daemon still answers
            assert isinstance(ping(os.path.join(daemon.log_dir, "after.log"), [seq_record("p", 0)]), protocol.Ack)
            during = resources(daemon.proc.pid)
            deaf.close(0)
            endless.close(0)
            honest.stop()
    finally:
        attacker.close()
        ctx.destroy(linger=0)
    doc = daemon.stats()
    size = len(msgpack.packb(doc))
    assert size < 2 * 1024 * 1024, size  # the stats reply stays small
    assert doc["daemon"]["counters"]["unknown_counters"] == 2000 * protocol.MAX_COUNTERS
    dropped = doc["daemon"]["counters"]["replies_dropped"]
    after = resources(daemon.proc.pid)
    _within_bounds(daemon, during)
    _within_bounds(daemon, after)
    _row(security_row, daemon, "floods: 3000 sync records to a locked file, 20k unread replies, 2000 reports "
         "x 32 unknown counters, a 100 MB endless multipart",
         f"sync records bounded by queue_batches ({QUEUE}) then busy; replies capped per peer (SNDHWM); unknown "
         "counter names ignored and counted; RSS bounded",
         f"{busy} busy replies, {ok} written, {dropped} replies dropped, stats reply {size // 1024} KiB, daemon RSS during {during['rss_kib'] // 1024} "
         "MiB", honest, before, after)
