"""The delivery state machine both handlers drive, and the synchronous channel.

``Delivery`` decides what to send, when a batch is retired, when the daemon
counts as unreachable and when to go back to it. It only ever calls
non-blocking socket operations, so the thread handler drives it from its
sender thread and the asyncio handler from its sender task; what differs is
how each waits and how it runs the fallback writes ``service()`` hands back.

``SyncChannel`` is the REQ round trip for records that must be written before
the call returns (Lazy Pirate: a socket that timed out is discarded).
"""

import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import zmq

from .. import protocol
from ._core import (
    RECORD_LIMIT,
    STATE_CONNECTING,
    STATE_DAEMON,
    STATE_EMBEDDED,
    STATE_FALLBACK,
    Batcher,
    ClientStats,
    Fallback,
    Window,
    too_large,
)


class Settings:
    """The delivery parameters both handlers accept (one place for defaults)."""

    def __init__(
        self,
        batch_size: int = 1000,
        batch_bytes: int = 1024 * 1024,
        linger: float = 0.002,
        window: int = 8,
        ack_timeout: float = 5.0,
        sync_timeout: float = 5.0,
        connect_timeout: float = 0.5,
        max_probe_interval: float = 5.0,
        drain_timeout: float = 5.0,
        report_interval: float = 5.0,
    ) -> None:
        if window < 1 or batch_size < 1:
            raise ValueError("window and batch_size must be positive")
        if not 1024 <= batch_bytes <= protocol.MAX_FRAME_BYTES // 2:
            raise ValueError(f"batch_bytes must be in [1024, {protocol.MAX_FRAME_BYTES // 2}]")
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.window = window
        self.ack_timeout = ack_timeout
        self.sync_timeout = sync_timeout
        self.connect_timeout = connect_timeout
        self.max_probe_interval = max_probe_interval
        self.drain_timeout = drain_timeout
        self.report_interval = report_interval


# How long a ping may take to show that a silent daemon is alive.
LIVENESS_TIMEOUT = 2.0
# Pause before sending again a batch the daemon refused as busy (doubling).
MIN_BUSY_BACKOFF = 0.01
MAX_BUSY_BACKOFF = 1.0

SETTING_NAMES = tuple(Settings.__init__.__code__.co_varnames[1:Settings.__init__.__code__.co_argcount])


class Delivery:
    """Batches, window, acks, probes and the daemon/fallback switch."""

    def __init__(self, settings: Settings, stats: ClientStats, path: str, options: Dict[str, Any],
                 client_id: protocol.ClientId, context: Optional[zmq.Context], endpoint: Optional[str]) -> None:
        self.s = settings
        self.stats = stats
        self.path = path
        self.options = options
        self.client_id = client_id
        self.window = Window(settings.window)
        self.batcher = Batcher(settings.batch_size, settings.batch_bytes)
        stats.record_limit = RECORD_LIMIT  # until a daemon tells its own
        self.stop_deadline: Optional[float] = None
        self.flushing = False  # a flush() waits: send without lingering
        self.dealer: Optional[zmq.Socket] = None
        self.monitor: Optional[zmq.Socket] = None
        self.connect_started = time.monotonic()
        self.probe_at = 0.0
        self.probe_interval = 0.1
        self.probe_id = 0
        # A daemon that acks nothing for ack_timeout gets a ping: answered,
        # it is alive but slow (keep waiting, no duplicates); unanswered
        # within liveness_timeout, the fallback takes over.
        self.last_progress = time.monotonic()
        self.liveness_deadline: Optional[float] = None
        self.liveness_id = 0
        # The daemon said it is stopping: what it accepted before will still
        # be written and acked; what it refused goes to the fallback after.
        self.daemon_stopping = False
        self.resend_at = 0.0
        self.busy_backoff = MIN_BUSY_BACKOFF
        self.report_at = time.monotonic() + settings.report_interval
        self.reported: Dict[str, int] = {}
        if endpoint is None or context is None:
            stats.state = STATE_EMBEDDED
        else:
            stats.state = STATE_CONNECTING
            self._open(context, endpoint)

    # -- sockets -------------------------------------------------------------
    def _open(self, context: zmq.Context, endpoint: str) -> None:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # Queue only on completed connections: with no daemon, send() fails
        # at once instead of parking records in a zmq queue nobody drains.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        # ZMTP heartbeats notice a daemon that stopped answering (SIGSTOP).
        dealer.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        dealer.connect(endpoint)
        self.dealer = dealer

    def sockets(self) -> List[zmq.Socket]:
        """What the driver waits on for readability."""
        return [s for s in (self.dealer, self.monitor) if s is not None]

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

    # -- feeding -----------------------------------------------------------
    @property
    def embedded(self) -> bool:
        return self.dealer is None

    @property
    def has_room(self) -> bool:
        """Whether the driver should take more records from its queue."""
        return len(self.batcher.lines) < self.s.batch_size * self.s.window

    def add(self, line: str) -> None:
        self.batcher.add(line)

    def too_large(self, line: str) -> bool:
        """Whether ``line`` cannot travel to this daemon: the driver writes it
        through the fallback instead (counted as ``oversize``)."""
        return too_large(line, self.stats.record_limit)

    def drained(self) -> bool:
        return not self.batcher.lines and not len(self.window)

    # -- the step ------------------------------------------------------------
    def service(self, now: float) -> List[str]:
        """Read replies, send what fits, and return lines the driver must
        write directly now, oldest first (fallback or embedded mode)."""
        if self.dealer is None:
            return self.batcher.take_all()
        self.on_readable()
        state = self.stats.state
        if state == STATE_CONNECTING:
            if now >= self.probe_at:
                self._probe(now)
            if now - self.connect_started > self.s.connect_timeout:
                self._enter_fallback("no daemon answered within connect_timeout")
        elif state == STATE_DAEMON:
            if self.daemon_stopping:
                if not self.window.batches:  # everything it accepted is acked
                    self._enter_fallback("the daemon is stopping")
            else:
                self._send_batches(now)
            self._check_liveness(now)
        direct: List[str] = []
        if self.stats.state == STATE_FALLBACK:
            replayed = self.window.take_all()
            self.stats.resent += len(replayed)  # type: ignore[attr-defined]
            direct = replayed + self.batcher.take_all()
            if now >= self.probe_at:
                self._probe(now)
        if now >= self.report_at:
            self._report(now)
        return direct

    def _check_liveness(self, now: float) -> None:
        if not self.window.batches:
            self.last_progress = now
            self.liveness_deadline = None
            return
        if self.liveness_deadline is not None:
            if now > self.liveness_deadline:
                self._enter_fallback(f"no ack within {self.ack_timeout():.1f}s and no answer to a ping")
            return
        if now - self.last_progress > self.ack_timeout():
            if self.stop_deadline is not None and now >= self.stop_deadline - 0.5:
                self._enter_fallback("stopping: no time left to wait for acks")
                return
            self.liveness_id = self._next_id()
            self._ping(self.liveness_id)
            self.liveness_deadline = now + min(self.s.ack_timeout, LIVENESS_TIMEOUT)

    def _next_id(self) -> int:
        self.probe_id += 1
        return self.probe_id

    def wait_time(self, now: float) -> float:
        """How long the driver may sleep before something is due."""
        due = [now + 0.5]
        if self.batcher.lines and (self.window.has_room or self.stats.state != STATE_DAEMON):
            due.append(self.batcher.first_at + (0 if self.flushing or self.stop_deadline else self.s.linger))
        if len(self.window):
            due.append(self.liveness_deadline or (self.last_progress + self.ack_timeout()))
            if self.window.refused:
                due.append(self.resend_at)
        if self.stats.state == STATE_FALLBACK:
            due.append(self.probe_at)
        elif self.stats.state == STATE_CONNECTING:
            due.append(min(self.probe_at, self.connect_started + self.s.connect_timeout))
        return max(0.0, min(due) - now)

    def ack_timeout(self) -> float:
        if self.stop_deadline is not None:
            # Stopping: leave time to write the window through the fallback.
            remaining = self.stop_deadline - time.monotonic() - 0.5
            return max(0.0, min(self.s.ack_timeout, remaining))
        return self.s.ack_timeout

    # -- daemon path -----------------------------------------------------------
    def _send_batches(self, now: float) -> None:
        window, batcher = self.window, self.batcher
        if not window.batches:
            self.last_progress = now  # the ack clock starts with the first batch out
        # Refused as busy: nothing of it was written, so sending it again can
        # not duplicate anything (it is counted in `busy`, not `resent`).
        for seq, batch in (window.ready_to_resend() if now >= self.resend_at else ()):
            if not self._send(batch.payload):
                window.refuse(seq)
                return
            window.resend(seq, batch)
        hurry = self.flushing or self.stop_deadline is not None
        while batcher.lines and window.has_room:
            if not batcher.full and not hurry and now - batcher.first_at < self.s.linger:
                return
            lines = batcher.take()
            payload = protocol.encode_batch(self.client_id, window.next_seq, self.path, self.options, lines)
            if not self._send(payload):
                batcher.put_back(lines)  # written by the fallback, in order
                return
            window.add(lines, payload)
            self.stats.sent += len(lines)  # type: ignore[attr-defined]

    def _send(self, payload: bytes) -> bool:
        assert self.dealer is not None
        try:
            self.dealer.send(payload, zmq.NOBLOCK)
            return True
        except zmq.Again:
            self._enter_fallback("daemon not connected")
            return False

    def on_readable(self) -> None:
        """Drain replies, then connection events, without blocking.

        Replies first: acks the daemon sent before it went away are already
        queued when the disconnect event arrives, and must retire their
        batches before the fallback decides what to write again."""
        self._replies()
        if self.monitor is not None:
            self._monitor_events()

    def _replies(self) -> None:
        if self.dealer is None:
            return
        while True:
            try:
                data = self.dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = protocol.decode_reply(data)
            except protocol.ProtocolError as exc:
                self.stats.last_error = f"bad reply from daemon: {exc}"
                continue
            if isinstance(reply, protocol.Ack):
                batch = self.window.ack(reply.seq)
                if batch is not None:
                    self.stats.acked += len(batch.lines)  # type: ignore[attr-defined]
                    self.last_progress = time.monotonic()
                    self.busy_backoff = MIN_BUSY_BACKOFF
            elif isinstance(reply, protocol.Ok):
                if reply.id == self.liveness_id and self.liveness_deadline is not None:
                    self.last_progress = time.monotonic()  # slow, not gone: keep waiting
                    self.liveness_deadline = None
                elif reply.id == self.probe_id and self.stats.state != STATE_DAEMON:
                    self._enter_daemon(reply.data)
            elif isinstance(reply, protocol.Error):
                self._error(reply)

    def _error(self, reply: protocol.Error) -> None:
        if reply.code == protocol.E_BUSY and reply.seq is not None:
            self.stats.busy += 1  # type: ignore[attr-defined]
            self.window.refuse(reply.seq)
            # Back off before sending it again: an overloaded daemon should
            # not spend its time decoding frames it has to refuse.
            self.resend_at = time.monotonic() + self.busy_backoff
            self.busy_backoff = min(MAX_BUSY_BACKOFF, self.busy_backoff * 2)
            return
        if reply.code == protocol.E_SHUTTING_DOWN and reply.seq is not None:
            # It refuses this batch and every later one, but writes and acks
            # the earlier ones while draining: wait for those, then fall back.
            self.window.refuse(reply.seq)
            self.daemon_stopping = True
            return
        self.stats.last_error = f"daemon error {reply.code}: {reply.message}"
        if reply.seq is None:
            return  # a refused report or ping: nothing to write
        if reply.code in protocol.RETRYABLE_ERRORS:
            self._enter_fallback(self.stats.last_error)
        else:
            # This daemon will never take the file: stay in fallback and ask
            # again rarely (a config reload may allow it later).
            self._enter_fallback(self.stats.last_error, probe_after=60.0)

    def _monitor_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        assert self.monitor is not None
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self.stats.state == STATE_DAEMON:
                self._enter_fallback("daemon disconnected")
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.stats.state != STATE_DAEMON:
                self.probe_at = 0.0  # a daemon is there: probe now

    def _ping(self, id: int) -> None:
        assert self.dealer is not None
        try:
            self.dealer.send(protocol.encode_ping(id), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _probe(self, now: float) -> None:
        self._ping(self._next_id())
        self.probe_at = now + self.probe_interval
        self.probe_interval = min(self.s.max_probe_interval, self.probe_interval * 2)

    def _enter_daemon(self, info: Dict[str, Any]) -> None:
        self.stats.state = STATE_DAEMON
        self.probe_interval = 0.1
        self.daemon_stopping = False
        self.liveness_deadline = None
        self.last_progress = time.monotonic()
        limit = info.get("max_message_bytes")
        if isinstance(limit, int) and limit > 0:
            # Stay well under the daemon's frame limit (msgpack overhead).
            self.batcher.max_bytes = min(self.s.batch_bytes, max(1024, limit // 2))
            # A record the daemon would refuse (or libzmq cut off) is never sent.
            self.stats.record_limit = min(RECORD_LIMIT, limit // 2)

    def _enter_fallback(self, reason: str, probe_after: Optional[float] = None) -> None:
        self.liveness_deadline = None
        self.daemon_stopping = False
        if self.stats.state != STATE_FALLBACK:
            self.stats.last_error = reason
        self.stats.state = STATE_FALLBACK
        self.probe_at = time.monotonic() + (probe_after if probe_after is not None else self.probe_interval)

    def _report(self, now: float) -> None:
        self.report_at = now + self.s.report_interval
        counters = self.stats.report()
        if counters == self.reported or self.stats.state != STATE_DAEMON or self.dealer is None:
            return
        try:
            self.dealer.send(protocol.encode_report(self.client_id, counters, id=0), zmq.NOBLOCK)
            self.reported = counters
        except zmq.Again:
            pass


class SyncChannel:
    """REQ round trips for records confirmed before the call returns.

    Thread-safe (one lock, one socket). Lazy Pirate: after a timeout or a
    bad reply the socket is closed and a new one is made next time.
    """

    def __init__(self, context: zmq.Context, endpoint: str, settings: Settings, stats: ClientStats,
                 client_id: protocol.ClientId, path: str, options: Dict[str, Any]) -> None:
        self.context = context
        self.endpoint = endpoint
        self.s = settings
        self.stats = stats
        self.client_id = client_id
        self.path = path
        self.options = options
        self._req: Optional[zmq.Socket] = None
        self._lock = threading.Lock()
        self._ids = 0

    def write(self, line: str) -> bool:
        """True once the daemon confirmed the line is written; False: use the fallback."""
        with self._lock:
            if self.stats.state == STATE_FALLBACK:
                return False  # became unreachable while we waited for the lock
            req = self._req or self._connect()
            if req is None:
                return False
            self._ids += 1
            payload = protocol.encode_sync(self.client_id, self._ids, self.path, self.options, line)
            try:
                req.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                self._drop()
                return False
            if not req.poll(int(self.s.sync_timeout * 1000)):
                self.stats.sync_timeouts += 1  # type: ignore[attr-defined]
                self.stats.last_error = f"sync record not confirmed within {self.s.sync_timeout}s"
                self._drop()
                return False
            ok, error = self._reply(req)
            if error:
                self.stats.last_error = error
            return ok

    def _connect(self) -> Optional[zmq.Socket]:
        req = self.context.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.IMMEDIATE, 1)
        req.connect(self.endpoint)
        # With IMMEDIATE, POLLOUT means a daemon completed the connection.
        if not req.poll(int(self.s.connect_timeout * 1000), zmq.POLLOUT):
            req.close(linger=0)
            return None
        self._req = req
        return req

    def _reply(self, req: zmq.Socket) -> Tuple[bool, str]:
        try:
            reply = protocol.decode_reply(req.recv())
        except protocol.ProtocolError as exc:
            self._drop()
            return False, f"bad reply from daemon: {exc}"
        if isinstance(reply, protocol.Ok):
            return True, ""
        if isinstance(reply, protocol.Error):
            return False, f"daemon refused a sync record: {reply.code}: {reply.message}"
        return False, f"unexpected reply {reply!r}"

    def _drop(self) -> None:
        if self._req is not None:
            self._req.close(linger=0)
            self._req = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class Confirmed:
    """Writes one line and returns only once it is in the file: through the
    daemon (SyncChannel) when it is reachable, else through the fallback."""

    def __init__(self, sync: Optional[SyncChannel], fallback: Fallback, stats: ClientStats) -> None:
        self.sync = sync
        self.fallback = fallback
        self.stats = stats

    def write(self, line: str) -> None:
        """Raises OSError when even the fallback could not write the line."""
        if self.sync is not None and self.stats.state != STATE_FALLBACK:
            if too_large(line, self.stats.record_limit):
                # The daemon would refuse it, or libzmq cut the REQ off (a sync_timeout).
                self.stats.oversize += 1  # type: ignore[attr-defined]
            elif self.sync.write(line):
                return
        if not self.fallback.write([line]):
            raise OSError(self.stats.last_error)
