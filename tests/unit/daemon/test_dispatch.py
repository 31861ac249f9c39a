"""The daemon's message pipeline without a socket: frames into
``Dispatcher.handle``, replies out, real writers writing real files (no
daemon process, no zmq), as ``Delivery``'s tests drive the client's."""

import os
from typing import Any, Iterator, List, Tuple

import msgpack
import pytest
from support import read_lines, wait_for

from clh_writerd import protocol
from clh_writerd.daemon.access import AccessPolicy, Peer
from clh_writerd.daemon.config import config_from_mapping
from clh_writerd.daemon.dispatch import Dispatcher
from clh_writerd.daemon.stats import DaemonStats
from clh_writerd.daemon import writers
from clh_writerd.daemon.writers import AckQueue, QueueBudget, Router

ME = Peer(os.getuid(), os.getgid(), os.getpid())
CLIENT = protocol.ClientId("host", os.getpid(), "unit", "s1")
OPTIONS = {"maxBytes": 0, "backupCount": 0}


class Pipeline:
    """A dispatcher over a real router and ack queue; ``send`` returns the decoded replies sent now."""

    def __init__(self, logs: str, **limits: Any) -> None:
        self.config = config_from_mapping({"daemon": {"allowed_dirs": [logs]}, "limits": limits})
        self.stats = DaemonStats("ipc:///unit", 10)
        self.acks = AckQueue()
        self.router = Router(self.config, self.stats, self.acks, QueueBudget(self.config.total_queue_bytes,
                                                                               self.config.peer_queue_bytes))
        self.stopping = False
        self.documents: List[Any] = []
        self.dispatcher = Dispatcher(self.config, self.stats, AccessPolicy(self.config, True), self.router,
                                     lambda: self.stopping, self._document, lambda fd, identity: True)

    def _document(self, scope: Any) -> bytes:
        self.documents.append(scope)
        return msgpack.packb({"files": {}})

    def send(self, payload: bytes, peer: Peer = ME) -> List[protocol.Reply]:
        return [protocol.decode_reply(frames[-1]) for frames, _ in self.dispatcher.handle([b"id", payload], peer)]

    def later(self, count: int) -> List[protocol.Reply]:
        """The next ``count`` replies the writers send through the ack queue."""
        got: List[protocol.Reply] = []

        def arrived() -> bool:
            got.extend(protocol.decode_reply(frames[-1]) for frames in self.acks.drain())
            return len(got) >= count

        wait_for(arrived, what=f"{count} replies from the writers")
        return got

    def close(self) -> None:
        self.router.stop_all()
        self.router.join_all(10.0)
        self.acks.close()


@pytest.fixture
def pipe(tmp_path) -> Iterator[Tuple[Pipeline, str]]:
    logs = str(tmp_path / "logs")
    os.makedirs(logs)
    pipeline = Pipeline(logs, queue_batches=2)
    yield pipeline, logs
    pipeline.close()


def batch(path: str, seq: int, lines: List[str]) -> bytes:
    return protocol.encode_batch(CLIENT, seq, path, OPTIONS, lines)


def test_a_batch_is_written_then_acked_by_its_writer(pipe):
    pipeline, logs = pipe
    path = os.path.join(logs, "a.log")
    assert pipeline.send(batch(path, 1, ["one", "two"])) == []  # nothing now: the writer acks
    (ack,) = pipeline.later(1)
    assert isinstance(ack, protocol.Ack) and ack.seq == 1
    assert read_lines(path) == ["one", "two"]
    assert pipeline.stats.clients and pipeline.router.writers[path].stats.records_received == 2


def test_a_sync_record_on_an_idle_file_is_written_and_answered_at_once(pipe, monkeypatch):
    pipeline, logs = pipe
    path = os.path.join(logs, "s.log")
    pipeline.send(batch(path, 1, ["first"]))  # opens the file: a sync record is written here only on an open one
    pipeline.later(1)
    # Idle: the writer thread sends the ack just before it is done. A loaded
    # machine may take more than INLINE_MAX_SECONDS over that first write,
    # which sends the next one to the writer thread (not what this checks).
    writer = pipeline.router.writers[path]
    wait_for(lambda: writer.idle, what="the writer idle after its ack")
    monkeypatch.setattr(writers, "INLINE_MAX_SECONDS", 60.0)
    (reply,) = pipeline.send(protocol.encode_sync(CLIENT, 7, path, OPTIONS, "sync line"))
    assert isinstance(reply, protocol.Ok) and reply.id == 7
    assert read_lines(path) == ["first", "sync line"]  # in the file when the reply is made


def test_ping_stats_and_report_are_answered_now(pipe):
    pipeline, _ = pipe
    (pong,) = pipeline.send(protocol.encode_ping(3))
    assert isinstance(pong, protocol.Ok) and pong.data["protocol"] == protocol.PROTOCOL_VERSION
    (stats,) = pipeline.send(protocol.encode_stats_request(4))
    assert isinstance(stats, protocol.Ok) and pipeline.documents == [None]  # root and the daemon's own uid see all
    (ok,) = pipeline.send(protocol.encode_report(CLIENT, {"enqueued": 5}, id=5))
    assert isinstance(ok, protocol.Ok) and ok.id == 5


@pytest.mark.parametrize("frames,code", [
    ([b"id", b"\xc1"], protocol.E_MALFORMED),
    ([b"id", b"", b"x", b"y"], protocol.E_MALFORMED),
])
def test_malformed_messages_get_an_error_and_the_pipeline_goes_on(pipe, frames, code):
    pipeline, _ = pipe
    replies = pipeline.dispatcher.handle(frames, ME)
    assert [protocol.decode_reply(f[-1]).code for f, _ in replies] == [code]  # type: ignore[union-attr]
    assert isinstance(pipeline.send(protocol.encode_ping(1))[0], protocol.Ok)


def test_an_unknown_directory_and_a_stopping_daemon_are_refused_with_their_codes(pipe, tmp_path):
    pipeline, logs = pipe
    (error,) = pipeline.send(batch(str(tmp_path / "elsewhere.log"), 1, ["x"]))
    assert isinstance(error, protocol.Error) and error.code == protocol.E_FORBIDDEN_PATH and error.seq == 1
    pipeline.stopping = True
    (error,) = pipeline.send(batch(os.path.join(logs, "a.log"), 2, ["x"]))
    assert error.code == protocol.E_SHUTTING_DOWN


def test_a_full_queue_is_busy_and_a_refused_batch_is_never_rendered(pipe, monkeypatch):
    """Back-pressure: the writer is held (its lock taken), its queue fills; the
    next batch is refused busy before it is rendered, and the client's later
    batches for that file stay refused until it sends the refused one again."""
    pipeline, logs = pipe
    path = os.path.join(logs, "busy.log")
    pipeline.send(batch(path, 1, ["a"]))
    pipeline.later(1)
    writer = pipeline.router.writers[path]
    with writer._cond:  # the writer thread cannot take anything while we hold its condition
        writer._busy = True
    try:
        assert pipeline.send(batch(path, 2, ["b"])) == [] and pipeline.send(batch(path, 3, ["c"])) == []
        rendered = []
        lines = protocol.Batch.lines
        monkeypatch.setattr(protocol.Batch, "lines", lambda self, *a: rendered.append(self.seq) or lines(self, *a))
        (busy,) = pipeline.send(batch(path, 4, ["d"]))
        assert busy.code == protocol.E_BUSY and busy.seq == 4 and rendered == []
        (later,) = pipeline.send(batch(path, 5, ["e"]))  # order: refused while 4 is not sent again
        assert later.code == protocol.E_BUSY and rendered == []
        assert writer.stats.busy_refusals == 2
    finally:
        with writer._cond:
            writer._busy = False
            writer._cond.notify()
    acks = pipeline.later(2)
    assert sorted(a.seq for a in acks) == [2, 3]
    assert pipeline.send(batch(path, 4, ["d"])) == []  # the refused one again: taken, and the block lifted
    assert pipeline.later(1)[0].seq == 4
    assert read_lines(path) == ["a", "b", "c", "d"]


def test_an_exception_in_one_message_is_an_internal_error_reply(pipe, monkeypatch):
    pipeline, logs = pipe

    def boom(*args: Any) -> None:
        raise RecursionError("injected")

    monkeypatch.setattr(pipeline.router, "route", boom)
    (error,) = pipeline.send(batch(os.path.join(logs, "a.log"), 9, ["x"]))
    assert error.code == protocol.E_INTERNAL and error.seq == 9
    assert pipeline.stats.counters.get(protocol.E_INTERNAL) == 1
