"""NonBlockingConcurrentHandler: a thread-based client of clh-writerd.

Caller's thread: ``prepare`` (freeze the message) and ``enqueue`` (append to
a bounded deque). Sender thread: render, then drive the shared ``Delivery``
state machine (batch, ``send`` over a DEALER socket, retire batches on ack,
switch to the fallback when the daemon is unreachable) and write what it hands
back through the wrapped CLH handler. Records at or above ``sync_level`` go
through a REQ socket (or the fallback) before ``emit()`` returns.
"""

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Union

import zmq

from .. import protocol
from .._batchwrite import CLHHandler
from ._core import (
    DROP_WARNING_EVERY,
    STATE_CONNECTING,
    STATE_EMBEDDED,
    STATE_STOPPED,
    DEFAULT_ENDPOINT,
    ClientStats,
    Fallback,
    WrappingHandler,
    build_clh,
    split_kwargs,
)
from . import _process
from ._delivery import SETTING_NAMES, Confirmed, Delivery, Settings, SyncChannel

log = logging.getLogger("clh_writerd.client")


class _Marker:
    """Goes through the queue like a record: flush() and stop() wait on it."""

    def __init__(self, stop: bool = False, deadline: float = 0.0) -> None:
        self.stop = stop
        self.deadline = deadline
        self.done = threading.Event()


class NonBlockingConcurrentHandler(WrappingHandler):
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
        super().__init__(handler, endpoint, level)
        if queue_size < 1:
            raise ValueError("queue_size must be positive")
        self.settings = Settings(
            batch_size=batch_size, batch_bytes=batch_bytes, linger=linger, window=window,
            ack_timeout=ack_timeout, sync_timeout=sync_timeout, connect_timeout=connect_timeout,
            max_probe_interval=max_probe_interval, drain_timeout=drain_timeout,
            report_interval=report_interval)
        self.queue_size = queue_size
        self.sync_level = sync_level
        self.fallback_on_full = fallback_on_full
        self.drain_timeout = drain_timeout
        self._started = False
        self._closed = False
        self._reset_process_state()
        if autostart:
            self.start()

    # -- per-process state (rebuilt in a forked child) ---------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self.stats = ClientStats()
        self.stats.state = STATE_EMBEDDED if self.endpoint is None else STATE_CONNECTING
        self._queue: Deque[Any] = deque()
        self._warnings: Deque[str] = deque()  # drop warnings, ahead of the queue
        self._idle = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._thread: Optional[threading.Thread] = None
        self._context: Optional[zmq.Context] = None
        self._client_id = protocol.new_client_id()
        self._fallback = Fallback(self.handler, self.stats)
        self._sync: Optional[SyncChannel] = None
        self._confirmed = Confirmed(None, self._fallback, self.stats)
        self._delivery: Optional[Delivery] = None
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
        _process.register(self)
        if self.endpoint is not None:
            self._context = zmq.Context()
            self._sync = SyncChannel(self._context, self.endpoint, self.settings, self.stats, self._client_id,
                                     self.path, self.options)
            self._confirmed.sync = self._sync
        self._delivery = Delivery(self.settings, self.stats, self.path, self.options, self._client_id,
                                  self._context, self.endpoint)
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
            self._stop_marker = _Marker(stop=True, deadline=time.monotonic() + timeout)
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
        _process.unregister(self)
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
        in_flight = len(self._delivery.window) if self._delivery is not None else 0
        return self.stats.snapshot(len(self._queue), self.queue_size, in_flight)

    # -- caller's thread: prepare -> enqueue ---------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._pid < 0:  # set by the fork hook in a child (no getpid() syscall per call)
                self._after_fork_in_child()
            if record.levelno >= self.sync_level:
                self._confirmed.write(self._renderer.render_now(record))
                self.stats.sync_count += 1  # type: ignore[attr-defined]
                return
            self.enqueue(record)
        except Exception:
            self.handleError(record)

    def enqueue(self, record: logging.LogRecord) -> None:
        """prepare (freeze the message) and append; the hot path, kept flat."""
        if record.exc_info and not record.exc_text:
            item = self._renderer.prepare(record)
        else:
            item = (record, record.getMessage())  # Renderer.prepare, inlined
        queue = self._queue
        if len(queue) >= self.queue_size or self._stop_marker is not None or self._thread is None:
            self._queue_full(item)
            return
        queue.append(item)
        self.stats.enqueued += 1  # type: ignore[attr-defined]
        if self._idle:
            # One wake-up per idle period: a pipe write per record would cost
            # a syscall and hand the GIL to the sender on every call.
            self._idle = False
            self._wake()

    def _accepting(self) -> bool:
        return self._thread is not None and self._stop_marker is None

    def _queue_full(self, item: Any) -> None:
        record = item[0]
        if self.fallback_on_full or not self._accepting():
            self.stats.fallback_count += 1  # type: ignore[attr-defined]
            self._confirmed.write(self._renderer.render(item))
            return
        self.stats.dropped_count += 1  # type: ignore[attr-defined]
        dropped = self.stats.dropped_count  # type: ignore[attr-defined]
        if dropped % DROP_WARNING_EVERY == 0:
            # Through the sender, not written here: dropping must not make the
            # caller wait for the disk, even once per 1000 records.
            self._warnings.append(self._warning_line(
                record, "queue full, %d records dropped so far (fallback_on_full=False)", dropped))
            self._wake()

    def _wake(self) -> None:
        fd = self._wake_w
        if fd < 0:
            return
        try:
            os.write(fd, b"\0")
        except OSError:
            pass  # a wake-up is already pending (pipe full) or we are stopped

    # -- sender thread ---------------------------------------------------------
    def _run(self) -> None:
        sender = _Sender(self)
        try:
            sender.run()
        except Exception as exc:  # never die silently: write what we hold
            self.stats.last_error = f"sender crashed: {type(exc).__name__}: {exc}"
            log.exception("clh-writerd sender thread crashed; writing through the fallback")
            sender.emergency_flush()
        finally:
            sender.close()

    def _release_sockets(self) -> None:
        if self._sync is not None:
            self._sync.close()
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
    """The sender thread: collect from the deque, drive Delivery, write what
    it hands back through the fallback (blocking is fine on this thread)."""

    def __init__(self, owner: NonBlockingConcurrentHandler) -> None:
        assert owner._delivery is not None
        self.o = owner
        self.stats = owner.stats
        self.delivery = owner._delivery
        self.flush_waiters: List[_Marker] = []
        self.stopping: Optional[_Marker] = None
        self.poller = zmq.Poller()
        self.poller.register(owner._wake_r, zmq.POLLIN)
        for sock in self.delivery.sockets():
            self.poller.register(sock, zmq.POLLIN)

    def close(self) -> None:
        self.delivery.close()

    def run(self) -> None:
        delivery = self.delivery
        while True:
            self._collect()
            delivery.flushing = bool(self.flush_waiters)
            direct = delivery.service(time.monotonic())
            if direct:
                self._write_direct(direct)
            if self.flush_waiters and delivery.drained():
                for marker in self.flush_waiters:
                    marker.done.set()
                self.flush_waiters.clear()
            if self.stopping is not None and delivery.drained() and not self.o._queue and not self.o._warnings:
                self.stopping.done.set()
                return

    def _collect(self) -> None:
        """Move queued records into the delivery's batcher (rendering them).

        Sleeps when there is nothing to take, or no room to take it (the
        window is full: an ack wakes the poll). While a flush() is pending
        nothing more is taken, so only records queued before it are pending.
        """
        o, delivery = self.o, self.delivery
        queue = o._queue
        blocked = bool(self.flush_waiters) or not delivery.has_room
        if blocked or not queue:
            o._idle = not blocked
            if blocked or not queue:  # re-check: a producer may have appended meanwhile
                self.poller.poll(int(delivery.wait_time(time.monotonic()) * 1000))
            o._idle = False
            try:
                os.read(o._wake_r, 4096)
            except OSError:
                pass
        while o._warnings:  # before a pending flush settles: they precede it
            delivery.add(o._warnings.popleft())
        if self.flush_waiters:
            return
        render = o._renderer.render
        while queue and delivery.has_room:
            item = queue.popleft()
            if isinstance(item, _Marker):
                if item.stop:
                    self.stopping = item
                    delivery.stop_deadline = item.deadline
                    continue
                self.flush_waiters.append(item)
                return
            try:
                line = render(item)
            except Exception:
                o.handleError(item[0])
                continue
            if delivery.too_large(line):
                self.stats.oversize += 1  # type: ignore[attr-defined]
                self._write_direct(delivery.batcher.take_all() + [line])
                continue
            delivery.add(line)

    def _write_direct(self, lines: List[str]) -> None:
        while not self.o._fallback.write(lines):
            # Disk full or similar: keep the lines and stop taking new ones
            # (the queue fills up and the caller's policy applies), retry.
            deadline = self.delivery.stop_deadline
            if deadline is not None and time.monotonic() > deadline:
                log.error("clh-writerd: %d records could not be written: %s", len(lines), self.stats.last_error)
                return
            time.sleep(0.1)  # back off before retrying a failed disk write

    def emergency_flush(self) -> None:
        """The sender failed: write everything it holds, release every waiter."""
        delivery = self.delivery
        lines = delivery.window.take_all() + delivery.batcher.take_all()
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


OWN_NAMES = ("endpoint", "queue_size", "sync_level", "fallback_on_full", "level", "autostart") + SETTING_NAMES


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
    clh_kwargs, own = split_kwargs(kwargs, OWN_NAMES)
    return NonBlockingConcurrentHandler(build_clh(filename, use_timed, clh_kwargs), **own)
