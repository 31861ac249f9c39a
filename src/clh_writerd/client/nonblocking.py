"""NonBlockingConcurrentHandler: a thread-based client of clh-writerd.

Caller's thread: ``freeze`` (the message, and while the daemon renders the
record's plain values instead of the record) and ``enqueue`` (append to
a bounded deque). Sender thread: drive the shared ``SenderCore`` (render,
batch, send, acks, fallback switch) and write what it hands back through the
wrapped CLH handler, inline; it waits on a poller (wake-up pipe + sockets).
Records at or above ``sync_level`` go through a REQ socket (or the fallback)
before ``emit()`` returns.
"""

import logging
import math
import os
import threading
import time
from typing import Any, Optional, Union

import zmq

from .._batchwrite import CLHHandler
from . import _process
from ._base import WrappingHandler, build_clh
from ._options import THREAD, HandlerOptions, split_kwargs
from ._sender import Flush, SyncItem
from ._stats import STATE_STOPPED

log = logging.getLogger("clh_writerd.client")

# The sender renders for at most this long, then calls time.sleep(0) before
# the next slice. That is a chance for a caller, not a hand-off: sleep(0)
# drops the GIL and mostly takes it back before a waiting caller is
# scheduled, so a caller in a flat-out loop still waits up to the switch
# interval (5 ms). A real 50 µs sleep does hand the GIL over, but changed
# neither the flat-out p99.9 nor the tails of bursts beyond noise (bursts
# of 20 and 100 records: 5 A/B pairs, of 1,000: 2): the sender then gets
# the GIL back only at the next forced switch. Not while the queue is more
# than half full: a caller logging flat out would then hold the GIL for
# whole intervals and starve the sender (measured: the queue filled up and
# callers wrote synchronously); the interpreter's fair share applies.
SLICE_SECONDS = 0.0002


class NonBlockingConcurrentHandler(WrappingHandler):
    """A logging handler that never blocks the caller on disk, lock or daemon.

    Wraps a ConcurrentRotatingFileHandler or ConcurrentTimedRotatingFileHandler
    (composition): the wrapped handler describes the file and is the fallback
    writer. ``endpoint=None`` means no daemon: the sender thread writes through
    the wrapped handler (a complete in-process non-blocking CLH handler).
    Options: see ``HandlerOptions`` (docs/client.md lists them).
    """

    KIND = THREAD
    _thread: Optional[threading.Thread] = None
    _started = False

    def __init__(self, handler: CLHHandler, **options: Any) -> None:
        super().__init__(handler, **options)
        self.fallback_on_full = self.opts.fallback_on_full
        self._started = False
        if self.opts.autostart:
            self.start()

    def _new_process_state(self) -> None:
        super()._new_process_state()
        self._idle = False
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._thread: Optional[threading.Thread] = None

    def _after_fork_in_child(self) -> None:
        # Never touch the parent's zmq context or sockets here: drop them.
        # The wrapped CLH handler reopens its lock file itself after a fork.
        was_running = self._started and not self._closed
        self._close_pipe()  # the child's copies; the parent keeps its own
        self._new_process_state()
        self._started = False
        if was_running:
            self.start()

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the sender thread (done by the constructor unless autostart=False)."""
        self._check_startable(self._started)
        self._started = True
        _process.register(self)
        core = self._new_core()
        # A daemon thread: interpreter exit joins non-daemon threads *before*
        # atexit runs, and our atexit hook is what drains the queue.
        self._thread = threading.Thread(target=self._run, args=(core,), name="clh-writerd-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Drain the queue (to the daemon or the fallback) and stop the sender.

        Idempotent. Returns True if everything queued was written within
        ``timeout`` (default: drain_timeout); at the deadline, whatever the
        daemon has not acknowledged is written through the fallback.
        """
        thread, core = self._thread, self._core
        if thread is None or core is None or not self.belongs_here():
            self.stats.state = STATE_STOPPED
            return True
        timeout = self.drain_timeout if timeout is None else timeout
        self._stopping = True  # emit() now writes directly
        core.request_stop(timeout)
        self._wake()
        thread.join(timeout + 1.0)
        done = not thread.is_alive()
        if done:
            self._release_sockets()
            self._close_pipe()
            # A record appended while the sender was finishing: write it here.
            done = self._fallback.write(core.salvage(self._queue)) and not core.lost
        self.stats.state = STATE_STOPPED
        return done

    def close(self) -> None:
        """Stop (draining the queue) and close the wrapped handler."""
        if self._closed:
            return
        self.stop()
        self._close_wrapped()

    def flush(self) -> None:
        """Return once every record queued before this call is written."""
        self.wait_flushed(self.drain_timeout)

    def wait_flushed(self, timeout: float) -> bool:
        thread = self._thread
        if thread is None or not thread.is_alive() or not self.belongs_here():
            return thread is None
        done = threading.Event()
        self._queue.append(Flush(done.set))
        self._wake()
        return done.wait(timeout)

    def __del__(self) -> None:
        # Safety net only: close() or interpreter exit normally did this.
        try:
            if self._started and not self._closed and self.belongs_here():
                self.stop(timeout=1.0)
        except Exception:
            pass

    # -- caller's thread: freeze -> enqueue --------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._pid < 0:  # set by the fork hook in a child (no getpid() syscall per call)
                self._after_fork_in_child()
            if self._closed:
                self._after_close(record)
            elif record.levelno >= self.sync_level:
                self.emit_sync(record)
            else:
                self.enqueue(record)
        except Exception:
            self.handleError(record)

    def emit_sync(self, record: logging.LogRecord) -> None:
        """A record at or above sync_level: in the file when this returns.

        With ``sync_order`` (the default), and records of this process still
        queued or unacknowledged, it goes through the queue behind them and
        the caller waits for all of them (a flush); otherwise, straight to
        the daemon's REQ path (or the fallback)."""
        self.stats.sync_count += 1
        core = self._core
        if (not self.opts.sync_order or core is None or self._thread is None or self._stopping
                or core.idle(self._queue)):
            self._confirmed.write(self._renderer.render_now(record))
            return
        sync = SyncItem(self._renderer.prepare(record))
        done = threading.Event()
        self._queue.append(sync)  # never refused: a sync record is never dropped
        self._queue.append(Flush(done.set))
        self._wake()
        if done.wait(self.opts.sync_timeout):
            return
        # Stalled (daemon stopped, sender stuck): the record must still be in
        # the file on return. Not taken yet: write it here (the sender will
        # skip it). Already sent: write it here too (a duplicate, counted as
        # resent, if the daemon writes it later).
        self.stats.sync_timeouts += 1
        self.stats.last_error = f"sync record not confirmed within {self.opts.sync_timeout}s"
        if not sync.claim("caller"):
            self.stats.resent += 1
        if not self._fallback.write([self._renderer.render_line(sync.item)]):
            raise OSError(self.stats.last_error)

    def enqueue(self, record: logging.LogRecord) -> None:
        """freeze (the message, and the values the daemon renders) and append; the hot path, kept flat."""
        item = self._renderer.freeze(record)
        queue = self._queue
        if len(queue) >= self.queue_size or self._stopping or self._thread is None:
            self._queue_full(item)
            return
        queue.append(item)
        self.stats.enqueued += 1
        if self._idle:
            # One wake-up per idle period: a pipe write per record would cost
            # a syscall and hand the GIL to the sender on every call.
            self._idle = False
            self._wake()

    def _queue_full(self, item: Any) -> None:
        if self.fallback_on_full or self._stopping or self._thread is None:
            self.stats.fallback_count += 1
            self._confirmed.write(self._renderer.render(item))
        else:
            self._drop(item, "fallback_on_full=False")

    def _wake(self) -> None:
        fd = self._wake_w
        if fd < 0:
            return
        try:
            os.write(fd, b"\0")
        except OSError:
            pass  # a wake-up is already pending (pipe full) or we are stopped

    def _close_pipe(self) -> None:
        fds = (self._wake_r, self._wake_w)
        self._wake_r = self._wake_w = -1  # before closing: a late _wake() must not hit a reused fd
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    # -- sender thread: how it waits, and writes inline --------------------------
    def _run(self, core: Any) -> None:
        queue = self._queue
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        for sock in self._transport.sockets() if self._transport is not None else ():
            poller.register(sock, zmq.POLLIN)
        try:
            while True:
                self._wait(core, poller)
                sliced = len(queue) * 2 < self.queue_size
                core.collect(queue, SLICE_SECONDS if sliced else None)
                lines = core.step()
                if lines:
                    core.written(lines, self._fallback.write(lines))
                for flush in core.settled():
                    flush.release()
                if core.finished(queue):
                    return
                if queue and sliced:
                    time.sleep(0)  # between slices (see SLICE_SECONDS)
        except Exception as exc:  # never die silently: write what we hold
            # From now on emit() writes each record itself, as while stopping:
            # a queue nobody drains would hold them until close(), or drop them.
            self._stopping = True
            self.stats.last_error = f"sender crashed: {type(exc).__name__}: {exc}"
            log.exception("clh-writerd sender thread crashed; writing through the fallback")
            self._fallback.write(core.salvage(queue))
        finally:
            core.close()

    def _wait(self, core: Any, poller: zmq.Poller) -> None:
        """Sleep while there is nothing to take, or no room to take it (an
        ack, a stop or a record wakes the poll)."""
        blocked = not core.accepting
        if self._queue and not blocked:
            return
        # Lingering over a partial batch, the poll ends by itself when the
        # batch is due: records logged meanwhile need no wake-up (a pipe
        # write by the caller and a wake-up of this thread per record cost
        # more CPU than rendering them). Flushes, sync records and stop
        # wake it explicitly.
        self._idle = not blocked and not core.lingering
        if blocked or not self._queue:  # re-check: a producer may have appended meanwhile
            # Rounded up: a sub-millisecond wait truncated to poll(0) spun,
            # holding the GIL, until the interpreter forced a switch (5 ms).
            poller.poll(math.ceil(core.wait_time() * 1000))
        self._idle = False
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass


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
    clh_kwargs, own = split_kwargs(THREAD, kwargs)
    HandlerOptions.build(THREAD, **own)  # refuse bad options before creating the file
    return NonBlockingConcurrentHandler(build_clh(filename, use_timed, clh_kwargs), **own)
