"""The zmq side of delivery: one transport per handler and process, with two
lanes to the same daemon endpoint. Batches travel on a DEALER socket (the
batch lane) behind the small interface ``Delivery`` drives (so tests give it
a fake); sync records make a REQ round trip on the sync lane, from the
callers' threads.
What the sync lane learns that matters to delivery (the daemon refused this
file) comes back through ``events()``, on the driver's thread, like the
batch lane's connection events."""

import struct
import threading
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import zmq

from .. import protocol
from ._plans import Item, plan_of, to_line, values_of
from ._stats import STATE_FALLBACK, ClientStats
from ._trust import CurveKeys, EndpointTrust

CONNECTED = "connected"
DISCONNECTED = "disconnected"


class SyncRefused(NamedTuple):
    """An event: the daemon refused a sync record (``Delivery`` decides
    whether that means the fallback for the whole file)."""
    code: str
    message: str


Event = Union[str, SyncRefused]


class ZmqTransport:
    """Both lanes to one endpoint, for one process: the sync lane (``sync``,
    from the start: an asyncio handler writes sync records before any
    sender runs) and a batch lane for each run of the sender
    (``batch_lane()``; a run's lane is its own, so a sender that was taken
    over never touches the next run's socket). ``release()`` closes the
    sync lane; each batch lane is closed by its run."""

    def __init__(self, context: zmq.Context, endpoint: str, settings: Any, stats: ClientStats,
                 client_id: protocol.ClientId, path: str, options: Dict[str, Any],
                 trust: Optional[EndpointTrust] = None, curve: Optional[CurveKeys] = None) -> None:
        self.context = context
        self.endpoint = endpoint
        self.trust = trust
        self.curve = curve
        self.sync = SyncLane(context, endpoint, settings, stats, client_id, path, options, trust, curve)

    def batch_lane(self) -> "BatchLane":
        return BatchLane(self.context, self.endpoint, self.sync, self.trust, self.curve)

    def release(self) -> None:
        self.sync.close()


class BatchLane:
    """A DEALER socket and its monitor, the interface ``Delivery`` drives:
    ``send``/``recv`` never block, and ``events`` reports connections made
    and lost, and the sync lane's refusals. It connects only once
    ``usable()`` found the endpoint trustworthy (``EndpointTrust``)."""

    def __init__(self, context: zmq.Context, endpoint: str, sync: "SyncLane",
                 trust: Optional[EndpointTrust] = None, curve: Optional[CurveKeys] = None) -> None:
        self.endpoint = endpoint
        self.trust = trust
        self.sync = sync
        self.connected = False
        dealer = context.socket(zmq.DEALER)
        if curve is not None:
            curve.apply(dealer)
        dealer.setsockopt(zmq.LINGER, 0)
        # Queue only on completed connections: with no daemon, send() fails
        # at once instead of parking records in a zmq queue nobody drains.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        # ZMTP heartbeats notice a daemon that stopped answering (SIGSTOP).
        dealer.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.monitor: Optional[zmq.Socket] = dealer.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.dealer: Optional[zmq.Socket] = dealer

    def answered(self, renders: bool) -> None:
        """A daemon answered a probe; ``renders``: it renders field values
        (protocol 2). Called on the driver's thread; the sync lane reads it
        on callers' threads (one bool, replaced whole)."""
        self.sync.renders = renders

    def usable(self) -> str:
        """"" once connected to a trusted endpoint; else why not (nothing is connected then)."""
        problem = self.trust.problem() if self.trust is not None else ""
        if self.dealer is None:
            return problem
        if problem:
            if self.connected:
                self.dealer.disconnect(self.endpoint)
                self.connected = False
            return problem
        if not self.connected:
            self.dealer.connect(self.endpoint)
            self.connected = True
        return ""

    def sockets(self) -> List[zmq.Socket]:
        """What a driver waits on for readability."""
        return [s for s in (self.dealer, self.monitor) if s is not None]

    def send(self, payload: bytes) -> bool:
        """False when no daemon is connected (nothing was queued)."""
        if self.dealer is None:
            return False
        try:
            self.dealer.send(payload, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def recv(self) -> Optional[bytes]:
        if self.dealer is None:
            return None
        try:
            return self.dealer.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def events(self) -> Iterator[Event]:
        refusals = self.sync.refusals
        while refusals:
            yield refusals.popleft()
        while self.monitor is not None:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = _monitor_event(frames)
            if event == zmq.EVENT_DISCONNECTED:
                yield DISCONNECTED
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                yield CONNECTED

    def close(self) -> None:
        if self.dealer is not None:
            try:
                self.dealer.disable_monitor()
            except zmq.ZMQError:
                pass
            if self.monitor is not None:
                self.monitor.close(linger=0)
            self.dealer.close(linger=0)
            self.dealer = self.monitor = None


def _monitor_event(frames: List[bytes]) -> int:
    """The event id of a monitor message (a 16-bit id and a 32-bit value in
    the first frame, the endpoint in the second). Parsed here rather than by
    zmq.utils.monitor, which imports asyncio for the thread handler's sake."""
    if len(frames) != 2 or len(frames[0]) != 6:
        return 0
    return int(struct.unpack("=Hi", frames[0])[0])


class SyncLane:
    """REQ round trips for records confirmed before the call returns.

    Thread-safe (one lock, one socket). Lazy Pirate: after a timeout or a
    bad reply the socket is closed and a new one is made next time.
    """

    def __init__(self, context: zmq.Context, endpoint: str, settings: Any, stats: ClientStats,
                 client_id: protocol.ClientId, path: str, options: Dict[str, Any],
                 trust: Optional[EndpointTrust] = None, curve: Optional[CurveKeys] = None) -> None:
        # The daemon renders field values (ZmqTransport.answered); until one
        # said so, values are rendered here: any daemon takes a line.
        self.renders = False
        # Refused sync records, appended on callers' threads, taken by the
        # driver (BatchLane.events()); bounded: one says what it must,
        # and no sender may be running yet to take them.
        self.refusals: Deque[SyncRefused] = deque(maxlen=64)
        self.context = context
        self.trust = trust
        self.curve = curve
        self.endpoint = endpoint
        self.s = settings
        self.stats = stats
        self.client_id = client_id
        self.path = path
        self.options = options
        self._req: Optional[zmq.Socket] = None
        self._lock = threading.Lock()
        self._ids = 0
        self._frames: Dict[Any, protocol.SyncFrame] = {}  # by field format (None: a rendered line)

    def write(self, line: Item) -> bool:
        """True once the daemon confirmed the line (or field values: the
        daemon renders them) is written; False: use the fallback."""
        if type(line) is not str and not self.renders:
            line = to_line(line)
        with self._lock:
            if self.stats.state == STATE_FALLBACK:
                return False  # became unreachable while we waited for the lock
            req = self._req or self._connect()
            if req is None:
                return False
            self._ids += 1
            if isinstance(line, str):
                payload = self._frame(None).encode(self._ids, line)
            else:
                payload = self._frame(plan_of(line).format).encode(self._ids, values_of(line))
            try:
                req.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                self._drop()
                return False
            try:
                reply = req.recv()  # RCVTIMEO: sync_timeout
            except zmq.Again:
                self.stats.sync_timeouts += 1
                self.stats.last_error = f"sync record not confirmed within {self.s.sync_timeout}s"
                self._drop()
                return False
            ok, error = self._reply(reply)
            if error:
                self.stats.last_error = error
            return ok

    def _frame(self, format: Any) -> protocol.SyncFrame:
        frame = self._frames.get(format)
        if frame is None:
            if len(self._frames) >= 64:  # formats come from the app's formatters: few; bounded anyway
                self._frames.clear()
            frame = self._frames[format] = protocol.SyncFrame(self.client_id, self.path, self.options, format=format)
        return frame

    def _connect(self) -> Optional[zmq.Socket]:
        problem = self.trust.problem() if self.trust is not None else ""
        if problem:
            self.stats.last_error = problem
            return None
        req = self.context.socket(zmq.REQ)
        if self.curve is not None:
            self.curve.apply(req)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.IMMEDIATE, 1)
        req.setsockopt(zmq.RCVTIMEO, max(1, int(self.s.sync_timeout * 1000)))
        req.connect(self.endpoint)
        # With IMMEDIATE, POLLOUT means a daemon completed the connection.
        if not req.poll(int(self.s.connect_timeout * 1000), zmq.POLLOUT):
            req.close(linger=0)
            return None
        self._req = req
        return req

    def _reply(self, frame: bytes) -> Tuple[bool, str]:
        try:
            reply = protocol.decode_reply(frame)
        except protocol.ProtocolError as exc:
            self._drop()
            return False, f"bad reply from daemon: {exc}"
        if isinstance(reply, protocol.Ok):
            return True, ""
        if isinstance(reply, protocol.Error):
            self.refusals.append(SyncRefused(reply.code, reply.message))
            return False, f"daemon refused a sync record: {reply.code}: {reply.message}"
        return False, f"unexpected reply {reply!r}"

    def _drop(self) -> None:
        if self._req is not None:
            self._req.close(linger=0)
            self._req = None

    def close(self) -> None:
        with self._lock:
            self._drop()
