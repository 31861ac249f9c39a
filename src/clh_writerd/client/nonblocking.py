"""NonBlockingConcurrentHandler: a thread-based client of clh-writerd.

Caller's thread: ``prepare`` (freeze the message) and ``enqueue`` (append to
a bounded deque). Sender thread: render, batch, ``send`` over a DEALER socket,
retire batches on ack. When the daemon is unreachable the sender writes
through the wrapped CLH handler instead (the fallback) and goes back to the
daemon once it answers a ping. Records at or above ``sync_level`` go through
a REQ socket (or the fallback) before ``emit()`` returns.
"""

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Union

import zmq

from .. import protocol
from .._batchwrite import CLHHandler
from ._core import (
    DROP_WARNING_EVERY,
    STATE_CONNECTING,
    STATE_DAEMON,
    STATE_EMBEDDED,
    STATE_FALLBACK,
    STATE_STOPPED,
    Batcher,
    ClientStats,
    Fallback,
    Renderer,
    Window,
    file_spec,
    too_large,
)

log = logging.getLogger("clh_writerd.client")


class _Default:
    def __repr__(self) -> str:
        return "<default endpoint>"


DEFAULT_ENDPOINT: Any = _Default()

_live_handlers: "weakref.WeakSet[NonBlockingConcurrentHandler]" = weakref.WeakSet()


class _Marker:
    """Goes through the queue like a record: flush() and stop() wait on it."""

    def __init__(self, stop: bool = False) -> None:
        self.stop = stop
        self.done = threading.Event()


class NonBlockingConcurrentHandler(logging.Handler):
    """A logging handler that never blocks the caller on disk, lock or daemon.

    Wraps a ConcurrentRotatingFileHandler or ConcurrentTimedRotatingFileHandler
    (composition): the wrapped handler describes the file and is the fallback
    writer. ``endpoint=None`` means no daemon: the sender thread writes through
    the wrapped handler (a complete in-process non-blocking CLH handler).
    """

    def __init__(
        self,
        handler: CLHHandler,
        *,
        endpoint: Any = DEFAULT_ENDPOINT,
        queue_size: int = 10000,
        sync_level: int = logging.ERROR,
        fallback_on_full: bool = True,
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
        level: int = logging.NOTSET,
        autostart: bool = True,
    ) -> None:
        super().__init__(level)
        if queue_size < 1 or window < 1 or batch_size < 1:
            raise ValueError("queue_size, window and batch_size must be positive")
        if not 1024 <= batch_bytes <= protocol.MAX_FRAME_BYTES // 2:
            raise ValueError(f"batch_bytes must be in [1024, {protocol.MAX_FRAME_BYTES // 2}]")
        self.handler = handler
        self.endpoint: Optional[str] = protocol.default_endpoint() if endpoint is DEFAULT_ENDPOINT else endpoint
        self.queue_size = queue_size
        self.sync_level = sync_level
        self.fallback_on_full = fallback_on_full
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.window_size = window
        self.ack_timeout = ack_timeout
        self.sync_timeout = sync_timeout
        self.connect_timeout = connect_timeout
        self.max_probe_interval = max_probe_interval
        self.drain_timeout = drain_timeout
        self.report_interval = report_interval
        if handler.formatter is not None and self.formatter is None:
            super().setFormatter(handler.formatter)
        self.path, self.options = file_spec(handler)
        self._renderer = Renderer(handler)
        self._started = False
        self._closed = False
        self._reset_process_state()
        _live_handlers.add(self)
        if autostart:
            self.start()

    # -- per-process state (rebuilt in a forked child) ---------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self.stats = ClientStats()
        self.stats.state = STATE_EMBEDDED if self.endpoint is None else STATE_CONNECTING
        self._queue: Deque[Any] = deque()
        self._idle = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._thread: Optional[threading.Thread] = None
        self._context: Optional[zmq.Context] = None
        self._req: Optional[zmq.Socket] = None
        self._req_lock = threading.Lock()
        self._client_id = protocol.new_client_id()
        self._fallback = Fallback(self.handler, self.stats)
        self._sync_ids = 0
        self._stop_marker: Optional[_Marker] = None

    def _after_fork_in_child(self) -> None:
        # Never touch the parent's zmq context or sockets here: drop them.
        # The wrapped CLH handler reopens its lock file itself after a fork.
        was_running = self._started and not self._closed
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)  # the child's copies; the parent keeps its own
                except OSError:
                    pass
        self._reset_process_state()
        self._started = False
        if was_running:
            self.start()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Start the sender thread (done by the constructor unless autostart=False)."""
        if self._started:
            raise RuntimeError("handler already started")
        if self._closed:
            raise RuntimeError("handler is closed")
        self._started = True
        _drain_at_multiprocessing_exit()
        if self.endpoint is not None:
            self._context = zmq.Context()
        # A daemon thread: interpreter exit joins non-daemon threads *before*
        # atexit runs, and our atexit hook is what drains the queue.
        self._thread = threading.Thread(target=self._run, name="clh-writerd-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Drain the queue (to the daemon or the fallback) and stop the sender.

        Idempotent. Returns True if everything queued was written within
        ``timeout`` (default: drain_timeout).
        """
        if self._thread is None or self._pid != os.getpid():
            self.stats.state = STATE_STOPPED
            return True
        if not self._thread.is_alive():
            self._release_sockets()
            self.stats.state = STATE_STOPPED
            return not self._queue
        timeout = self.drain_timeout if timeout is None else timeout
        if self._stop_marker is None:
            self._stop_marker = _Marker(stop=True)
            self._stop_deadline = time.monotonic() + timeout
            self._queue.append(self._stop_marker)
            self._wake()
        done = self._stop_marker.done.wait(timeout + 1.0)
        self._thread.join(max(0.1, timeout))
        if not self._thread.is_alive():
            self._release_sockets()
        self.stats.state = STATE_STOPPED
        return done

    def close(self) -> None:
        """Stop (draining the queue) and close the wrapped handler."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        _live_handlers.discard(self)
        try:
            self.handler.close()
        finally:
            super().close()

    def flush(self) -> None:
        """Return once every record queued before this call is written."""
        self.wait_flushed(self.drain_timeout)

    def wait_flushed(self, timeout: float) -> bool:
        if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
            return self._thread is None
        marker = _Marker()
        self._queue.append(marker)
        self._wake()
        return marker.done.wait(timeout)

    def __del__(self) -> None:
        # Safety net only: close() or interpreter exit normally did this.
        try:
            if self._started and not self._closed and self._pid == os.getpid():
                self.stop(timeout=1.0)
        except Exception:
            pass

    def get_stats(self) -> Dict[str, Any]:
        """Queue and delivery counters (see docs/client.md for each key)."""
        return self.stats.snapshot(len(self._queue), self.queue_size, self._in_flight())

    def _in_flight(self) -> int:
        window = getattr(self, "_window", None)
        return len(window) if window is not None else 0

    def setFormatter(self, fmt: Optional[logging.Formatter]) -> None:
        # The wrapped handler renders every line (daemon and fallback paths
        # alike), so it must use the same formatter.
        super().setFormatter(fmt)
        self.handler.setFormatter(fmt)

    # -- caller's thread: prepare -> enqueue ---------------------------------
    def handle(self, record: logging.LogRecord) -> Any:
        # emit() is thread-safe without Handler.lock: skip taking it.
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):
            record = rv
        if rv:
            self.emit(record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._pid != os.getpid():
                self._after_fork_in_child()
            if record.levelno >= self.sync_level:
                self._write_now(record)
                self.stats.sync_count += 1  # type: ignore[attr-defined]
                return
            self.enqueue(self._renderer.prepare(record))
        except Exception:
            self.handleError(record)

    def enqueue(self, item: Any) -> None:
        queue = self._queue
        if len(queue) >= self.queue_size or not self._accepting():
            self._queue_full(item)
            return
        queue.append(item)
        self.stats.enqueued += 1  # type: ignore[attr-defined]
        if self._idle:
            self._wake()

    def _accepting(self) -> bool:
        return self._thread is not None and self._stop_marker is None

    def _queue_full(self, item: Any) -> None:
        record = item[0]
        if self.fallback_on_full or not self._accepting():
            self.stats.fallback_count += 1  # type: ignore[attr-defined]
            self._write_line_now(self._renderer.render(item))
            return
        self.stats.dropped_count += 1  # type: ignore[attr-defined]
        dropped = self.stats.dropped_count  # type: ignore[attr-defined]
        if dropped % DROP_WARNING_EVERY == 0:
            warning = logging.makeLogRecord({
                "name": "clh_writerd", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "clh-writerd: queue full, %d records dropped so far (fallback_on_full=False)",
                "args": (dropped,), "created": record.created, "msecs": record.msecs,
            })
            self._write_line_now(self._renderer.render_now(warning))

    def _wake(self) -> None:
        fd = self._wake_w
        if fd < 0:
            return
        try:
            os.write(fd, b"\0")
        except OSError:
            pass  # a wake-up is already pending (pipe full) or we are stopped

    # -- synchronous path (caller's thread) ---------------------------------
    def _write_now(self, record: logging.LogRecord) -> None:
        self._write_line_now(self._renderer.render_now(record))

    def _write_line_now(self, line: str) -> None:
        """Written when this returns: confirmed by the daemon, or by the fallback."""
        if self.endpoint is not None and self.stats.state != STATE_FALLBACK and not too_large(line):
            if self._sync_via_daemon(line):
                return
        if not self._fallback.write([line]):
            raise OSError(self.stats.last_error)

    def _sync_via_daemon(self, line: str) -> bool:
        """REQ round trip; Lazy Pirate: a timed-out socket is discarded."""
        with self._req_lock:
            context = self._context
            if context is None:
                return False
            req = self._req
            if req is None:
                req = self._req = context.socket(zmq.REQ)
                req.setsockopt(zmq.LINGER, 0)
                req.setsockopt(zmq.IMMEDIATE, 1)
                req.connect(self.endpoint)
                if not req.poll(int(self.connect_timeout * 1000), zmq.POLLOUT):
                    self._drop_req()
                    return False
            self._sync_ids += 1
            payload = protocol.encode_sync(self._client_id, self._sync_ids, self.path, self.options, line)
            try:
                req.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                self._drop_req()
                return False
            if not req.poll(int(self.sync_timeout * 1000)):
                self.stats.sync_timeouts += 1  # type: ignore[attr-defined]
                self.stats.last_error = f"sync record not confirmed within {self.sync_timeout}s"
                self._drop_req()
                return False
            try:
                reply = protocol.decode_reply(req.recv())
            except protocol.ProtocolError:
                self._drop_req()
                return False
            if isinstance(reply, protocol.Ok):
                return True
            if isinstance(reply, protocol.Error):
                self.stats.last_error = f"daemon refused a sync record: {reply.code}: {reply.message}"
            return False

    def _drop_req(self) -> None:
        if self._req is not None:
            self._req.close(linger=0)
            self._req = None

    # -- sender thread ---------------------------------------------------------
    def _run(self) -> None:
        sender = _Sender(self)
        self._window = sender.window
        try:
            sender.run()
        except Exception as exc:  # never die silently: write what we hold
            self.stats.last_error = f"sender crashed: {type(exc).__name__}: {exc}"
            log.exception("clh-writerd sender thread crashed; writing through the fallback")
            sender.emergency_flush()
        finally:
            sender.close()

    def _release_sockets(self) -> None:
        with self._req_lock:
            self._drop_req()
            if self._context is not None:
                self._context.term()
                self._context = None
        fds = (self._wake_r, self._wake_w)
        self._wake_r = self._wake_w = -1  # before closing: a late _wake() must not hit a reused fd
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class _Sender:
    """The sender thread's state machine: collect -> batch -> send / fallback."""

    def __init__(self, owner: NonBlockingConcurrentHandler) -> None:
        self.o = owner
        self.stats = owner.stats
        self.window = Window(owner.window_size)
        self.batcher = Batcher(owner.batch_size, owner.batch_bytes)
        self.flush_waiters: List[_Marker] = []
        self.stopping: Optional[_Marker] = None
        self.dealer: Optional[zmq.Socket] = None
        self.monitor: Optional[zmq.Socket] = None
        self.poller = zmq.Poller()
        self.poller.register(owner._wake_r, zmq.POLLIN)
        self.connect_started = time.monotonic()
        self.probe_at = 0.0
        self.probe_interval = 0.1
        self.probe_id = 0
        self.report_at = time.monotonic() + owner.report_interval
        self.reported: Dict[str, int] = {}
        self.max_payload = protocol.MAX_FRAME_BYTES
        if owner.endpoint is not None:
            self._open_dealer()

    # -- sockets -------------------------------------------------------------
    def _open_dealer(self) -> None:
        context = self.o._context
        assert context is not None
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # Queue only on completed connections: with no daemon, send() fails
        # at once instead of parking records in a zmq queue nobody drains.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        dealer.connect(self.o.endpoint)
        self.dealer = dealer
        self.poller.register(dealer, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

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

    # -- main loop -------------------------------------------------------------
    def run(self) -> None:
        while True:
            self._collect()
            if self.o.endpoint is None:
                self._to_fallback(self.batcher.take_all())
            else:
                self._service()
            self._settle_markers()
            if self.stopping is not None and self._drained():
                self.stopping.done.set()
                return

    def _drained(self) -> bool:
        return not self.batcher.lines and not len(self.window) and not self.o._queue

    def _wait_time(self, blocked: bool = False) -> float:
        """How long poll() may sleep before something is due."""
        if self.o._queue and not blocked:
            return 0.0
        now = time.monotonic()
        due = [now + 0.5]
        if self.batcher.lines:
            if self.window.has_room or self.stats.state != STATE_DAEMON:
                due.append(self.batcher.first_at + self.o.linger)
        if len(self.window):
            oldest = self.window.oldest_sent_at()
            due.append((oldest or now) + self._ack_timeout())
            if self.window.refused:
                due.append(now + 0.02)
        if self.stats.state == STATE_FALLBACK:
            due.append(self.probe_at)
        if self.stats.state == STATE_CONNECTING:
            due.append(self.connect_started + self.o.connect_timeout)
        return max(0.0, min(due) - now)

    def _collect(self) -> None:
        """Move queued records into the batcher (rendering them).

        While a flush() is pending nothing more is taken, so the batcher holds
        only records queued before it; they are sent at once.
        """
        o = self.o
        queue = o._queue
        blocked = bool(self.flush_waiters)
        if blocked or not queue:
            o._idle = not blocked
            if blocked or not queue:  # re-check: a producer may have appended meanwhile
                self._poll(self._wait_time(blocked))
            o._idle = False
            try:
                os.read(o._wake_r, 4096)
            except (BlockingIOError, OSError):
                pass
        if blocked:
            return
        render = o._renderer.render
        batcher = self.batcher
        limit = o.batch_size * max(1, o.window_size)
        while queue and len(batcher.lines) < limit:
            item = queue.popleft()
            if isinstance(item, _Marker):
                if item.stop:
                    self.stopping = item
                    continue
                self.flush_waiters.append(item)
                return
            try:
                line = render(item)
            except Exception:
                o.handleError(item[0])
                continue
            if too_large(line):
                self.stats.oversize += 1  # type: ignore[attr-defined]
                self._to_fallback(batcher.take_all() + [line])
                continue
            batcher.add(line)

    def _poll(self, timeout: float) -> None:
        events = dict(self.poller.poll(int(timeout * 1000)))
        if self.monitor is not None and self.monitor in events:
            self._monitor_events()
        if self.dealer is not None and self.dealer in events:
            self._replies()

    def _settle_markers(self) -> None:
        # Collection stopped at the marker: everything before it is written
        # once the batcher and the window are empty.
        if self.flush_waiters and not self.batcher.lines and not len(self.window):
            for marker in self.flush_waiters:
                marker.done.set()
            self.flush_waiters.clear()

    # -- daemon path -----------------------------------------------------------
    def _service(self) -> None:
        now = time.monotonic()
        if self.dealer is not None:
            self._poll(0)
        state = self.stats.state
        if state == STATE_CONNECTING:
            if now >= self.probe_at:
                self._probe(now)
            if now - self.connect_started > self.o.connect_timeout:
                self._enter_fallback("no daemon answered within connect_timeout")
        elif state == STATE_DAEMON:
            self._send_batches(now)
            oldest = self.window.oldest_sent_at()
            if oldest is not None and now - oldest > self._ack_timeout():
                self._enter_fallback(f"no ack within {self._ack_timeout():.1f}s")
        if self.stats.state == STATE_FALLBACK:
            replayed = self.window.take_all()
            self.stats.resent += len(replayed)  # type: ignore[attr-defined]
            self._to_fallback(replayed + self.batcher.take_all())
            if now >= self.probe_at:
                self._probe(now)
        if now >= self.report_at:
            self._report(now)

    def _ack_timeout(self) -> float:
        if self.stopping is not None:
            # Leave time to write the window through the fallback.
            remaining = self.o._stop_deadline - time.monotonic() - 0.5
            return max(0.0, min(self.o.ack_timeout, remaining))
        return self.o.ack_timeout

    def _send_batches(self, now: float) -> None:
        window, batcher = self.window, self.batcher
        for seq, batch in window.ready_to_resend():
            if not self._send(batch.payload):
                window.refuse(seq)
                return
            window.resend(seq, batch, now)
            self.stats.resent += len(batch.lines)  # type: ignore[attr-defined]
        while batcher.lines and window.has_room:
            if not batcher.full and now - batcher.first_at < self.o.linger and self.stopping is None \
                    and not self.flush_waiters:
                return
            lines = batcher.take()
            seq = window.next_seq
            payload = protocol.encode_batch(self.o._client_id, seq, self.o.path, self.o.options, lines)
            if not self._send(payload):
                batcher.put_back(lines)  # written by the fallback, in order
                return
            window.add(lines, payload, now)
            self.stats.sent += len(lines)  # type: ignore[attr-defined]

    def _send(self, payload: bytes) -> bool:
        assert self.dealer is not None
        try:
            self.dealer.send(payload, zmq.NOBLOCK)
            return True
        except zmq.Again:
            self._enter_fallback("daemon not connected")
            return False

    def _replies(self) -> None:
        assert self.dealer is not None
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
            elif isinstance(reply, protocol.Ok):
                if reply.id == self.probe_id and self.stats.state != STATE_DAEMON:
                    self._enter_daemon(reply.data)
            elif isinstance(reply, protocol.Error):
                self._error(reply)

    def _error(self, reply: protocol.Error) -> None:
        if reply.code == protocol.E_BUSY and reply.seq is not None:
            self.stats.busy += 1  # type: ignore[attr-defined]
            self.window.refuse(reply.seq)
            return
        self.stats.last_error = f"daemon error {reply.code}: {reply.message}"
        if reply.seq is None and reply.id is not None:
            return  # a refused report/ping: nothing to write
        if reply.code in protocol.RETRYABLE_ERRORS:
            self._enter_fallback(self.stats.last_error)
        else:
            # The daemon will never take this file: stay in fallback and ask
            # again rarely (a config reload may allow it later).
            self._enter_fallback(self.stats.last_error, probe_after=60.0)
            log.warning("clh-writerd refused %s (%s); writing it directly", self.o.path, reply.message)

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
                self.probe_at = 0.0  # probe now

    def _probe(self, now: float) -> None:
        assert self.dealer is not None
        self.probe_id += 1
        try:
            self.dealer.send(protocol.encode_ping(self.probe_id), zmq.NOBLOCK)
        except zmq.Again:
            pass
        self.probe_at = now + self.probe_interval
        self.probe_interval = min(self.o.max_probe_interval, self.probe_interval * 2)

    def _enter_daemon(self, info: Dict[str, Any]) -> None:
        self.stats.state = STATE_DAEMON
        self.probe_interval = 0.1
        limit = info.get("max_message_bytes")
        if isinstance(limit, int) and limit > 0:
            self.max_payload = limit
            self.batcher.max_bytes = min(self.o.batch_bytes, max(1024, limit // 2))

    def _enter_fallback(self, reason: str, probe_after: Optional[float] = None) -> None:
        if self.stats.state != STATE_FALLBACK:
            self.stats.last_error = reason
        self.stats.state = STATE_FALLBACK
        self.probe_at = time.monotonic() + (probe_after if probe_after is not None else self.probe_interval)

    # -- fallback ----------------------------------------------------------
    def _to_fallback(self, lines: List[str]) -> None:
        if not lines:
            return
        while not self.o._fallback.write(lines):
            # Disk full or similar: keep the lines, stop taking new ones (the
            # queue fills up and the caller's policy applies), retry.
            if self.stopping is not None and time.monotonic() > self.o._stop_deadline:
                log.error("clh-writerd: %d records could not be written: %s", len(lines), self.stats.last_error)
                return
            time.sleep(0.1)  # back off before retrying a failed disk write

    def emergency_flush(self) -> None:
        """The sender failed: write everything it holds, release every waiter."""
        lines = self.window.take_all() + self.batcher.take_all()
        queue = self.o._queue
        while queue:
            item = queue.popleft()
            if isinstance(item, _Marker):
                item.done.set()
                continue
            try:
                lines.append(self.o._renderer.render(item))
            except Exception:
                pass
        self.o._fallback.write(lines)
        for marker in self.flush_waiters + ([self.stopping] if self.stopping else []):
            marker.done.set()

    def _report(self, now: float) -> None:
        self.report_at = now + self.o.report_interval
        counters = self.stats.report()
        if counters == self.reported or self.stats.state != STATE_DAEMON or self.dealer is None:
            return
        try:
            self.dealer.send(protocol.encode_report(self.o._client_id, counters, id=0), zmq.NOBLOCK)
            self.reported = counters
        except zmq.Again:
            pass


# Wrapped handlers' write locks held across fork() (see _before_fork).
_FORK_LOCK_TIMEOUT = 5.0
_fork_held: List[Any] = []


def _before_fork() -> None:
    """Let no thread be inside a write of a wrapped CLH handler when we fork.

    The child inherits the handler's open file object; forked in the middle of
    a write, it holds the parent's half-written buffer and its internal lock in
    the held state: the child's first write then fails ("reentrant call") or
    blocks forever. Every write (sender and synchronous paths) holds CLH's
    thread lock, so holding it across fork() (as logging did before 3.9) means
    the child gets a clean stream. Bounded: a write stuck on another process's
    file lock must not hang fork() forever.
    """
    for handler in list(_live_handlers):
        clh = getattr(handler.handler, "clh", handler.handler)  # timed handlers wrap one
        lock = getattr(clh, "_thread_lock", None)
        if lock is not None and lock.acquire(timeout=_FORK_LOCK_TIMEOUT):
            _fork_held.append(lock)


def _release_fork_locks() -> None:
    while _fork_held:
        lock = _fork_held.pop()
        try:
            lock.release()
        except RuntimeError:
            pass


def _after_fork_in_child() -> None:
    _release_fork_locks()
    for handler in list(_live_handlers):
        handler._pid = -1  # emit() rebuilds it lazily in the child


def _stop_all_at_exit() -> None:
    for handler in list(_live_handlers):
        try:
            handler.stop()
        except Exception:
            pass


_mp_finalizer: Any = None


def _drain_at_multiprocessing_exit() -> None:
    """Also drain when a multiprocessing child exits.

    A child started with the 'fork' method (Process or Pool worker) leaves
    through os._exit(): atexit hooks do not run there, multiprocessing's
    finalizers do. The child's registry is cleared when it starts, so this is
    (re)registered by the first start() in each process that needs it.
    """
    global _mp_finalizer
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None or (_mp_finalizer is not None and _mp_finalizer.still_active()):
        return
    # Lowest priority: runs after other finalizers, which may still log.
    _mp_finalizer = mp_util.Finalize(None, _stop_all_at_exit, exitpriority=-100)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: None, after_in_parent=_release_fork_locks,
                        after_in_child=_after_fork_in_child)
atexit.register(_stop_all_at_exit)


def create_nonblocking_handler(
    filename: Union[str, "os.PathLike[str]"], use_timed: bool = False, **kwargs: Any
) -> NonBlockingConcurrentHandler:
    """Build a CLH handler for ``filename`` and wrap it.

    Keyword arguments are split: NonBlockingConcurrentHandler's own (endpoint,
    queue_size, sync_level, ...) go to it; the rest (maxBytes, backupCount,
    use_gzip, when, interval, ...) to ConcurrentRotatingFileHandler, or to
    ConcurrentTimedRotatingFileHandler when ``use_timed`` is true. This is what
    dictConfig/fileConfig/YAML configurations point at.
    """
    return NonBlockingConcurrentHandler(_build_clh(filename, use_timed, kwargs), **_own_kwargs(kwargs))


_OWN = (
    "endpoint", "queue_size", "sync_level", "fallback_on_full", "batch_size", "batch_bytes", "linger",
    "window", "ack_timeout", "sync_timeout", "connect_timeout", "max_probe_interval", "drain_timeout",
    "report_interval", "level", "autostart",
)


def _own_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in _OWN}
    if isinstance(own.get("sync_level"), str):
        own["sync_level"] = logging.getLevelName(own["sync_level"].upper())
    if isinstance(own.get("level"), str):
        own["level"] = logging.getLevelName(own["level"].upper())
    return own


def _build_clh(filename: Any, use_timed: bool, kwargs: Dict[str, Any]) -> CLHHandler:
    from concurrent_log_handler import ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler

    own = {k: kwargs[k] for k in _OWN if k in kwargs}
    clh_kwargs = {k: v for k, v in kwargs.items() if k not in own}
    path = os.path.abspath(os.fspath(filename))
    kwargs.clear()
    kwargs.update(own)
    if use_timed:
        return ConcurrentTimedRotatingFileHandler(path, **clh_kwargs)
    return ConcurrentRotatingFileHandler(path, **clh_kwargs)
