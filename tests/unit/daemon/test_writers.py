"""Unit tests of daemon.writers without a subprocess: a FileWriter writing
a real file and acking through the AckQueue the main loop polls, and the
Router's policy with a writer factory that records what it was asked, and
the Server's tuning of the cycle collector given back when it stops.
Stable interfaces only (Router.route, FileWriter.submit/stop/join, Work)."""

import gc
import os
from typing import Any, Dict, List, Tuple

import pytest
from support import check_sequences, read_lines, seq_record

from clh_writerd import protocol
from clh_writerd.daemon.config import config_from_mapping
from clh_writerd.daemon.stats import DaemonStats, FileStats
from clh_writerd.daemon.paths import Target
from clh_writerd.daemon.server import GC_THRESHOLD, Server
from clh_writerd.daemon.writers import AckQueue, FileWriter, Router, Work


@pytest.fixture
def acks():
    """The queue (and pipe) the writer threads hand their replies to."""
    queue = AckQueue()
    yield queue
    queue.close()


def _work(seq: int, lines: List[str]) -> Work:
    return Work([b"peer"], lines, protocol.encode_ack(seq), seq, None)


def test_file_writer_writes_every_batch_then_acks_each_one_in_order(tmp_path, acks):
    path = str(tmp_path / "w.log")
    options = {"maxBytes": 2000, "backupCount": 50}
    writer = FileWriter(Target(str(tmp_path), ("w.log",)), options, FileStats(path, options, 64), acks,
                        capacity=64, chunk_chars=4096)
    writer.start()
    for seq in range(1, 21):
        assert writer.submit(_work(seq, [seq_record("w", (seq - 1) * 10 + i) for i in range(10)]))
    writer.stop()
    assert writer.join(30)
    seqs = []
    for envelope, reply in acks.drain():
        assert envelope == b"peer"
        seqs.append(protocol.decode_reply(reply).seq)
    assert seqs == list(range(1, 21))  # every batch acked, after its write
    check_sequences(read_lines(path), {"w": 200}).assert_complete()


def test_file_writer_bounds_batches_and_sync_records_apart_and_writes_sync_first(tmp_path, acks):
    path = str(tmp_path / "full.log")
    writer = FileWriter(Target(str(tmp_path), ("full.log",)), {}, FileStats(path, {}, 2), acks,
                        capacity=2, chunk_chars=4096)
    # Not started: nothing drains the queue.
    assert writer.submit(_work(1, ["a"])) and writer.submit(_work(2, ["b"]))
    assert not writer.submit(_work(3, ["c"]))
    assert writer.submit(_work(4, ["d"]), sync=True)  # sync records have places of their own
    assert writer.submit(_work(6, ["f"]), sync=True)
    assert not writer.submit(_work(7, ["g"]), sync=True)  # ... and a bound of their own
    writer.start()
    writer.stop()
    assert not writer.submit(_work(5, ["e"]), sync=True)  # stopping: refused, the client falls back
    assert writer.join(30)
    assert read_lines(path) == ["d", "f", "a", "b"]  # sync work first


class Factory:
    def __init__(self) -> None:
        self.made: List[Tuple[str, Dict[str, Any]]] = []

    def __call__(self, target: Target, options: Dict[str, Any], lock_target: Any, authority: Any = None) -> Any:
        self.made.append((target.path, options))
        return _FakeWriter(target.path, options)


class _FakeWriter:
    def __init__(self, path: str, options: Dict[str, Any]) -> None:
        self.path = path
        self.options = options
        self.options_key = protocol.options_key(options)
        self.stats = FileStats(path, options, 1)
        self.last_used = 0.0
        self.idle = False  # always busy: the Router may not close it for a new file
        self.declarers: Dict[int, Any] = {}
        self.anonymous_declared = 0.0
        self.stopped = False

    declared_by = FileWriter.declared_by
    live_declarers = FileWriter.live_declarers

    def stop(self) -> None:
        self.stopped = True

    def join(self, timeout: Any) -> bool:
        return True


def _router(tmp_path: Any, **limits: Any) -> Tuple[Router, Factory, str]:
    logs = str(tmp_path / "logs")
    os.makedirs(logs)
    config = config_from_mapping({"daemon": {"allowed_dirs": [logs]}, "limits": limits})
    factory = Factory()
    return Router(config, DaemonStats("ipc:///unit", 10), make_writer=factory), factory, logs


def test_router_serves_one_writer_per_file_and_refuses_other_options_for_it(tmp_path):
    router, factory, logs = _router(tmp_path)
    path = os.path.join(logs, "a.log")
    options = {"maxBytes": 10, "backupCount": 1}
    first = router.route(path, options)
    assert router.route(path, dict(options)) is first
    with pytest.raises(protocol.ProtocolError) as info:  # one file, one set of options
        router.route(path, {"maxBytes": 99, "backupCount": 1})
    assert info.value.code == protocol.E_OPTIONS_CONFLICT and "maxBytes" in str(info.value)
    assert first.stats.option_conflicts == 1
    assert factory.made == [(path, options)]


def _unused_pid() -> int:
    """A pid no process has now (counting down from the kernel's largest)."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read())
    while pid > 1:
        pid -= 1
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
    raise AssertionError("no free pid")


def test_router_changes_a_files_options_once_every_process_that_declared_them_is_gone(tmp_path):
    """Rolling redeploys: the served options stay while a process that
    declared them runs (here: this one); a declaration from a process that
    has exited does not hold them; a writer still writing its queue asks
    the new declaration to come back (busy)."""
    router, factory, logs = _router(tmp_path)
    path = os.path.join(logs, "a.log")
    old, new = {"maxBytes": 10, "backupCount": 1}, {"maxBytes": 99, "backupCount": 1}
    first = router.route(path, old, pid=_unused_pid())
    router.route(path, old, pid=os.getpid())
    with pytest.raises(protocol.ProtocolError) as info:
        router.route(path, new, pid=12345)
    assert info.value.code == protocol.E_OPTIONS_CONFLICT and f"still running ({os.getpid()})" in str(info.value)
    assert "'maxBytes': 10" in str(info.value) and "'maxBytes': 99" in str(info.value)
    first.declarers.pop(os.getpid())  # as if this process had exited too
    with pytest.raises(protocol.ProtocolError) as info:
        router.route(path, new)
    assert info.value.code == protocol.E_BUSY and not first.stopped  # its queue first
    first.idle = True
    second = router.route(path, new, pid=os.getpid())
    assert first.stopped and second is not first and factory.made == [(path, old), (path, new)]
    assert router.stats.counters["option_changes"] == 1


@pytest.mark.parametrize("path, options, code", [
    ("/etc/passwd", {}, protocol.E_FORBIDDEN_PATH),
    ("LOGS/../escape.log", {}, protocol.E_FORBIDDEN_PATH),
    ("LOGS/a.log", {"backupCount": 2000}, protocol.E_BAD_OPTIONS),
    ("LOGS/a.log", {"owner": ["root", "root"]}, protocol.E_BAD_OPTIONS),
    ("LOGS/a.log", {"chmod": 0o4755}, protocol.E_BAD_OPTIONS),
    ("LOGS/a.log", {"encoding": "latin-1"}, protocol.E_BAD_OPTIONS),
])
def test_router_refuses_what_the_policy_forbids_with_an_error_code(tmp_path, path, options, code):
    router, factory, logs = _router(tmp_path)
    with pytest.raises(protocol.ProtocolError) as info:
        router.route(path.replace("LOGS", logs), options)
    assert info.value.code == code and factory.made == []


def test_router_serves_at_most_max_files_while_none_is_idle(tmp_path):
    router, _, logs = _router(tmp_path, max_files=2)
    router.route(os.path.join(logs, "1.log"), {})
    router.route(os.path.join(logs, "2.log"), {})
    with pytest.raises(protocol.ProtocolError) as info:
        router.route(os.path.join(logs, "3.log"), {})
    assert info.value.code == protocol.E_BUSY


def test_serving_tunes_the_cycle_collector_and_stopping_gives_it_back(tmp_path):
    logs = str(tmp_path / "logs")
    os.mkdir(logs)
    server = Server(config_from_mapping({"daemon": {"endpoint": f"ipc://{tmp_path}/s.sock", "allowed_dirs": [logs]}}))
    before = gc.get_threshold()
    server._tune_collector()
    try:
        assert gc.get_threshold() == (GC_THRESHOLD,) + before[1:]
        assert gc.get_freeze_count() > 0  # what startup made is out of the collections
    finally:
        server._release()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


# -- budgets and authority (issue 25) --------------------------------------------
def test_queue_budget_refuses_past_a_peers_share_and_the_total_but_never_an_empty_one():
    from clh_writerd.daemon.writers import QueueBudget

    budget = QueueBudget(total=100, per_peer=60)
    assert budget.reserve("a", 50) == "" and budget.reserve("a", 20).startswith("peer_queue_bytes")
    assert budget.reserve("b", 50) == "" and budget.reserve("c", 10).startswith("total_queue_bytes")
    budget.release("a", 50)
    budget.release("b", 50)
    assert budget.total == 0 and budget.peers == {}
    assert budget.reserve("a", 500) == ""  # one message larger than every budget still goes through, alone


def test_rate_limit_lets_a_burst_through_counts_the_rest_and_says_so():
    import logging

    from clh_writerd.daemon.server import RateLimit
    from clh_writerd.daemon.stats import PEER_LOGGER

    counted = []
    limit = RateLimit(5, lambda name, n: counted.append(n))

    def record(name: str, msg: str = "refused") -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, "x", 0, msg, None, None)

    passed = [limit.filter(record(PEER_LOGGER)) for _ in range(50)]
    assert passed.count(True) in (5, 6) and sum(counted) == passed.count(False)
    assert all(limit.filter(record("clh_writerd.daemon", "stopping")) for _ in range(50))  # lifecycle: never held
    limit._last -= 1.0  # a second later (the bucket refills by the clock)
    line = record(PEER_LOGGER)
    assert limit.filter(line) and "suppressed by log_rate_limit" in line.msg


def test_authority_applies_the_owner_then_group_then_other_bits():
    from types import SimpleNamespace

    from clh_writerd.daemon.paths import W, X, Authority

    alice = Authority(1000, 1000, frozenset({1000, 50}))
    st = SimpleNamespace(st_uid=1000, st_gid=50, st_mode=0o100077)  # owner nothing, group and other all
    assert not alice.may(st, W)  # the owner class applies alone, as in the kernel
    st = SimpleNamespace(st_uid=0, st_gid=50, st_mode=0o100620)
    assert alice.may(st, W) and not alice.may(st, X)
    sticky = SimpleNamespace(st_uid=0, st_gid=0, st_mode=0o41777)
    theirs = SimpleNamespace(st_uid=1001, st_gid=1001, st_mode=0o100666)
    assert not alice.may_rename_in(sticky, theirs) and alice.may_rename_in(sticky, None)


def test_the_scraper_uid_comes_from_the_kernels_socket_table():
    import socket

    from clh_writerd.daemon.metrics import scraper_uid

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                ip, port = client.getsockname()
                assert scraper_uid(ip, port, *server.getsockname()) == os.getuid()
                assert scraper_uid("10.1.2.3", port, *server.getsockname()) is None  # not loopback
