"""Unit tests of the transport's sync lane without a daemon process: a real
zmq context and a ROUTER socket in this process answering as a daemon would.
What delivery relies on: field values go only to a daemon that said it
renders them (anything else gets the line), and a refusal comes back as an
event on the driver's side, not as a call on the caller's thread."""

import logging
import threading
from typing import Any, Callable, Iterator, List

import pytest
import zmq

from clh_writerd import protocol
from clh_writerd.client._items import ItemMaker
from clh_writerd.client._options import THREAD, HandlerOptions
from clh_writerd.client._plans import to_line
from clh_writerd.client._stats import ClientStats
from clh_writerd.client._transport import SyncRefused, ZmqTransport

PATH = "/var/log/app/lane.log"
FORMAT = "%(levelname)s %(name)s %(message)s"


class Daemon:
    """A ROUTER on inproc that decodes each sync request and answers with
    ``answer(request)`` (an encoded reply)."""

    def __init__(self, context: zmq.Context, answer: Callable[[Any], bytes]) -> None:
        self.router = context.socket(zmq.ROUTER)
        self.router.bind("inproc://daemon")
        self.answer = answer
        self.requests: List[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(20):
                continue
            peer, empty, frame = self.router.recv_multipart()
            request = protocol.decode_request(frame)
            self.requests.append(request)
            self.router.send_multipart([peer, empty, self.answer(request)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.router.close(linger=0)


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def _transport(context: zmq.Context) -> ZmqTransport:
    opts = HandlerOptions.build(THREAD, endpoint="inproc://daemon", sync_timeout=5.0, connect_timeout=5.0)
    return ZmqTransport(context, "inproc://daemon", opts, ClientStats(), protocol.new_client_id("unit"), PATH, {})


def _values(message: str) -> Any:
    """A record as the sync path makes it: field values of a stock formatter."""
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter(FORMAT))
    item = ItemMaker(handler, fields=True).finish_now(logging.makeLogRecord({"msg": message, "name": "app", "levelno": 20, "levelname": "INFO"}))  # type: ignore[arg-type]
    assert type(item) is tuple, "a stock formatter's record travels as field values"
    return item


@pytest.mark.parametrize("renders", [False, True])
def test_field_values_go_only_to_a_daemon_that_renders_them(context, renders):
    daemon = Daemon(context, lambda request: protocol.encode_ok(request.id))
    transport = _transport(context)
    lane = transport.batch_lane()
    try:
        item = _values("hello")
        if renders:
            lane.answered(True)  # as Delivery tells it when a daemon's pong says protocol 2
        assert transport.sync.write(item)
        (request,) = daemon.requests
        if renders:
            assert request.format is not None and request.lines() == [to_line(item)]
        else:
            assert request.format is None and request.lines() == ["INFO app hello"]
    finally:
        lane.close()
        transport.release()
        daemon.close()


def test_a_refused_sync_record_is_an_event_for_the_driver(context):
    daemon = Daemon(context, lambda request: protocol.encode_error(protocol.E_FORBIDDEN_PATH, "outside allowed_dirs",
                                                                   id=request.id))
    transport = _transport(context)
    lane = transport.batch_lane()
    try:
        assert not transport.sync.write("a line")  # not written: the caller's fallback writes it
        assert transport.sync.stats.last_error.startswith("daemon refused a sync record: forbidden_path")
        # The run's batch lane hands it to Delivery, with its connection events.
        assert list(lane.events()) == [SyncRefused(protocol.E_FORBIDDEN_PATH, "outside allowed_dirs")]
        assert list(lane.events()) == []  # taken once
    finally:
        lane.close()
        transport.release()
        daemon.close()
