"""Unit tests of daemon.writers without a subprocess: a FileWriter writing
a real file and acking over a real inproc socket, and the Router's policy
with a writer factory that records what it was asked. Stable interfaces
only (Router.route, FileWriter.submit/stop/join, Work)."""

import os
from typing import Any, Dict, List, Tuple

import pytest
import zmq
from support import check_sequences, read_lines, seq_record

from clh_writerd import protocol
from clh_writerd.daemon.config import config_from_mapping
from clh_writerd.daemon.stats import DaemonStats, FileStats
from clh_writerd.daemon.writers import FileWriter, Router, Work


@pytest.fixture
def acks():
    """(context, endpoint, PULL socket) the writer pushes its replies to."""
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    endpoint = f"inproc://acks-{id(pull)}"
    pull.bind(endpoint)
    yield context, endpoint, pull
    pull.close(linger=0)
    context.term()


def _work(seq: int, lines: List[str]) -> Work:
    return Work([b"peer"], lines, protocol.encode_ack(seq), seq, None)


def test_file_writer_writes_every_batch_then_acks_each_one_in_order(tmp_path, acks):
    context, endpoint, pull = acks
    path = str(tmp_path / "w.log")
    options = {"maxBytes": 2000, "backupCount": 50}
    writer = FileWriter(path, options, FileStats(path, options, 64), context, endpoint, capacity=64, chunk_chars=4096)
    writer.start()
    for seq in range(1, 21):
        assert writer.submit(_work(seq, [seq_record("w", (seq - 1) * 10 + i) for i in range(10)]))
    writer.stop()
    assert writer.join(30)
    seqs = []
    while pull.poll(0):
        envelope, reply = pull.recv_multipart()
        assert envelope == b"peer"
        seqs.append(protocol.decode_reply(reply).seq)
    assert seqs == list(range(1, 21))  # every batch acked, after its write
    check_sequences(read_lines(path), {"w": 200}).assert_complete()


def test_file_writer_refuses_work_beyond_capacity_but_never_a_sync_record(tmp_path, acks):
    context, endpoint, _ = acks
    path = str(tmp_path / "full.log")
    writer = FileWriter(path, {}, FileStats(path, {}, 2), context, endpoint, capacity=2, chunk_chars=4096)
    # Not started: nothing drains the queue.
    assert writer.submit(_work(1, ["a"])) and writer.submit(_work(2, ["b"]))
    assert not writer.submit(_work(3, ["c"]))
    assert writer.submit(_work(4, ["d"]), sync=True)
    writer.start()
    writer.stop()
    assert not writer.submit(_work(5, ["e"]), sync=True)  # stopping: refused, the client falls back
    assert writer.join(30)
    assert read_lines(path) == ["d", "a", "b"]  # sync work first


class Factory:
    def __init__(self) -> None:
        self.made: List[Tuple[str, Dict[str, Any]]] = []

    def __call__(self, path: str, options: Dict[str, Any]) -> Any:
        self.made.append((path, options))
        return _FakeWriter(options)


class _FakeWriter:
    def __init__(self, options: Dict[str, Any]) -> None:
        self.options = options
        self.options_key = protocol.options_key(options)
        self.stats = FileStats("x", options, 1)

    def stop(self) -> None:
        pass

    def join(self, timeout: Any) -> bool:
        return True


def _router(tmp_path: Any, **limits: Any) -> Tuple[Router, Factory, str]:
    logs = str(tmp_path / "logs")
    os.makedirs(logs)
    config = config_from_mapping({"daemon": {"allowed_dirs": [logs]}, "limits": limits})
    factory = Factory()
    return Router(config, DaemonStats("ipc:///unit", 10), factory), factory, logs


def test_router_serves_one_writer_per_file_and_keeps_the_first_options(tmp_path):
    router, factory, logs = _router(tmp_path)
    path = os.path.join(logs, "a.log")
    first = router.route(path, {"maxBytes": 10})
    assert router.route(path, {"maxBytes": 10}) is first
    assert router.route(path, {"maxBytes": 99}) is first  # a conflict: counted, first options kept
    assert first.stats.option_conflicts == 1
    assert factory.made == [(path, {"maxBytes": 10})]


@pytest.mark.parametrize("path, options, code", [
    ("/etc/passwd", {}, protocol.E_FORBIDDEN_PATH),
    ("LOGS/../escape.log", {}, protocol.E_FORBIDDEN_PATH),
    ("LOGS/a.log", {"backupCount": 2000}, protocol.E_BAD_OPTIONS),
    ("LOGS/a.log", {"owner": ["root", "root"]}, protocol.E_BAD_OPTIONS),
])
def test_router_refuses_what_the_policy_forbids_with_an_error_code(tmp_path, path, options, code):
    router, factory, logs = _router(tmp_path)
    with pytest.raises(protocol.ProtocolError) as info:
        router.route(path.replace("LOGS", logs), options)
    assert info.value.code == code and factory.made == []


def test_router_serves_at_most_max_files(tmp_path):
    router, _, logs = _router(tmp_path, max_files=2)
    router.route(os.path.join(logs, "1.log"), {})
    router.route(os.path.join(logs, "2.log"), {})
    with pytest.raises(protocol.ProtocolError) as info:
        router.route(os.path.join(logs, "3.log"), {})
    assert info.value.code == protocol.E_TOO_LARGE
