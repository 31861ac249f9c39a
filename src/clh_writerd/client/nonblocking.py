"""NonBlockingConcurrentHandler: a thread-based client of clh-writerd.

Caller's thread: ``freeze`` (the message, and while the daemon renders the
record's plain values instead of the record) and ``enqueue`` (append to
a bounded deque). Sender thread: drive the shared ``SenderCore`` (render,
batch, send, acks, fallback switch) and write what it hands back through the
wrapped CLH handler, inline; it waits on a poller (wake-up pipe + sockets).
Records at or above ``sync_level`` go through a REQ socket (or the fallback)
before ``emit()`` returns.

The sender is never trusted blindly: across ``fork()`` it is parked between
two steps (``park_for_fork``); a sender that makes no progress for
STALL_SECONDS while records wait is bypassed (records are written directly,
with a warning); and a sender that misses ``stop()``'s deadline is taken
over by the stopping thread, which writes what it held.
"""

import logging
import math
import os
import threading
import time
from time import monotonic as _monotonic
from typing import Any, Optional, Union

import zmq

from .._batchwrite import CLHHandler
from . import _notices, _process
from ._wrapping import WrappingHandler, build_clh
from ._direct import describe
from ._options import THREAD, HandlerOptions, split_kwargs
from ._core import Flush, SyncItem
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
# Records wait and the sender has not come round its loop for this long (an
# import lock inherited across fork, a bug): new records are written directly
# until it does. A fallback write in progress does not count (a held lock is
# bounded there: _direct.LOCK_WAIT).
STALL_SECONDS = 2.0
# stop(): after the drain's deadline, how long to wait more for the sender to
# end (its last fallback write may wait _direct.FINAL_LOCK_WAIT for the lock),
# then for it to reach a point between two steps before taking over.
STOP_MARGIN = 0.5
TAKEOVER_LOCK_WAIT = 1.0
# A parked sender goes on by itself after this long (fork() returned long ago).
PARK_LIMIT = 10.0
_NEVER = float("inf")


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
        # The sender's heartbeat: records waiting past this time mean it is stuck.
        self._stall_at = _NEVER
        self._stalled_since = 0.0  # >0 while records bypass a stuck sender
        # fork(): the sender parks between two steps (park_for_fork); it holds
        # _turn for the whole of each step, so whoever holds it sees a consistent core.
        self._turn = threading.Lock()
        self._park_requested = False
        self._parked = threading.Event()
        self._resume = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._thread: Optional[threading.Thread] = None

    def _rebuild(self) -> None:
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

    @_process.draining()
    def stop(self, timeout: Optional[float] = None) -> bool:
        """Drain the queue (to the daemon or the fallback) and stop the sender.

        Idempotent. Returns True if everything queued was written within
        ``timeout`` (default: drain_timeout); at the deadline, whatever the
        daemon has not acknowledged is written through the fallback (by this
        thread, if the sender is stuck). What cannot be written is counted
        as lost and announced.
        """
        thread, core = self._thread, self._core
        if thread is None or core is None or not self.belongs_here():
            self.stats.state = STATE_STOPPED
            return True
        timeout = self.drain_timeout if timeout is None else timeout
        self._stopping = True  # emit() now writes directly
        lost_before = self.stats.lost
        core.request_stop(timeout)
        self._wake()
        thread.join(timeout + STOP_MARGIN)
        stuck = thread.is_alive()
        if stuck:
            lines = self._take_over(core)
        else:
            self._release_sockets()
            self._close_pipe()
            lines = core.salvage(self._queue)  # appended while the sender was finishing
        self._thread = None
        if lines and not self._fallback.write(lines, TAKEOVER_LOCK_WAIT):
            core.lose(lines, self.stats.last_error, self._fallback.error)
        self.stats.state = STATE_STOPPED
        return not stuck and self.stats.lost == lost_before

    def _take_over(self, core: Any) -> list:
        """The sender missed the drain's deadline (stuck in an import, a
        lock, a write): from now on it touches nothing, and this thread
        writes everything it held and everything queued."""
        got = self._turn.acquire(timeout=TAKEOVER_LOCK_WAIT)  # between two of its steps, if it ever gets there
        try:
            core.taken_over = True
            lines = core.salvage(self._queue, writing=not got)
        finally:
            if got:
                self._turn.release()
        self.stats.last_error = "the sender did not finish by the drain's deadline; the stopping thread wrote its records"
        _notices.emit(logging.WARNING, "clh-writerd: %s: %s (%d records)", self.path, self.stats.last_error, len(lines))
        return lines

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
                self._rebuild_in_child()
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
        if self._queue and _monotonic() > self._stall_at:
            self._sender_stuck()  # waiting behind the queue would wait for sync_timeout
            core = None
        if (not self.opts.sync_order or core is None or self._thread is None or self._stopping
                or core.idle(self._queue)):
            self._confirmed.write(self._items.finish_now(record, self.stats.record_limit))
            return
        sync = SyncItem(self._items.prepare(record))
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
        if not self._fallback.write([self._items.line(sync.item)]):
            self.stats.lose(1, self.stats.last_error)
            raise OSError(self.stats.last_error) from self._fallback.error

    def enqueue(self, record: logging.LogRecord) -> None:
        """freeze (the message, and the values the daemon renders) and append; the hot path, kept flat."""
        item = self._items.freeze(record)
        queue = self._queue
        if (len(queue) >= self.queue_size or self._stopping or self._thread is None
                or (queue and _monotonic() > self._stall_at)):
            self._not_queued(item)
            return
        queue.append(item)
        self.stats.enqueued += 1
        if self._idle:
            # One wake-up per idle period: a pipe write per record would cost
            # a syscall and hand the GIL to the sender on every call.
            self._idle = False
            self._wake()

    def _not_queued(self, item: Any) -> None:
        """A record the queue does not take: full, stopping, or the sender stuck."""
        queue = self._queue
        stuck = len(queue) < self.queue_size and not self._stopping and self._thread is not None
        if stuck:
            self._sender_stuck()
        if stuck or self.fallback_on_full or self._stopping or self._thread is None:
            self.stats.fallback_count += 1
            self._confirmed.write(self._items.finish(item, self.stats.record_limit))
        else:
            self._drop(item, "fallback_on_full=False")

    def _sender_stuck(self) -> None:
        """Records wait and the sender has not come round for STALL_SECONDS:
        say so once (here: the sender cannot), then write them directly
        until it comes back (``_run`` says when)."""
        if self._stalled_since:
            return
        self._stalled_since = _monotonic()
        self.stats.last_error = f"the sender made no progress for {STALL_SECONDS:g}s with records waiting"
        _notices.emit(logging.WARNING, "clh-writerd: %s: %s; records are written directly by the threads that log "
                      "them until it does (%d queued records wait for it). To fix: report this with a py-spy dump "
                      "of the process (`py-spy dump --pid %d`).", self.path, self.stats.last_error, len(self._queue),
                      os.getpid())

    # The queue-full policy is _not_queued's; the asyncio handler has its own.
    _queue_full = _not_queued

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

    # -- fork: the sender parks between two steps --------------------------------
    def park_for_fork(self, deadline: float) -> None:
        """Before fork(): have the sender stop between two steps (no import,
        no zmq call, no lock of ours held) until resume_after_fork(); wait
        for it until ``deadline`` at most (a sender stuck in a write or an
        import cannot park: the child does not need it, it builds its own)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return
        self._resume.clear()
        self._parked.clear()
        self._park_requested = True
        self._wake()
        self._parked.wait(max(0.0, deadline - _monotonic()))

    def resume_after_fork(self) -> None:
        """After fork(), in the parent: the sender goes on."""
        if self._park_requested:
            self._park_requested = False
            self._resume.set()

    def _park(self) -> None:
        # Only resume_after_fork() clears the request: the next fork's request
        # may come before this thread has even left the wait.
        self._parked.set()
        self._resume.wait(PARK_LIMIT)

    # -- sender thread: how it waits, and writes inline --------------------------
    def _run(self, core: Any) -> None:
        queue = self._queue
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        for sock in self._batches.sockets() if self._batches is not None else ():
            poller.register(sock, zmq.POLLIN)
        turn = self._turn
        try:
            while True:
                self._wait(core, poller)
                if self._park_requested:
                    self._park()
                with turn:
                    if core.taken_over:
                        return  # stop() gave up waiting and wrote what we held
                    self._stall_at = _monotonic() + STALL_SECONDS
                    if self._stalled_since:
                        self._sender_back()
                    sliced = len(queue) * 2 < self.queue_size
                    core.collect(queue, SLICE_SECONDS if sliced else None)
                    lines = core.step()
                    if lines:
                        self._stall_at = _NEVER  # a write waits for a lock within its own bound
                        ok = self._fallback.write(lines, core.lock_wait())
                        self._stall_at = _monotonic() + STALL_SECONDS
                        if core.taken_over:
                            return
                        core.written(lines, ok, self._fallback.error)
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
            self.stats.last_error = f"sender crashed: {describe(exc)}"
            log.exception("clh-writerd sender thread crashed; writing through the fallback")
            lines = core.salvage(queue)
            if not self._fallback.write(lines):
                core.lose(lines, self.stats.last_error, self._fallback.error)
        finally:
            self._stall_at = _NEVER
            if not core.taken_over:
                core.close()

    def _sender_back(self) -> None:
        stalled = _monotonic() - self._stalled_since
        self._stalled_since = 0.0
        _notices.emit(logging.WARNING, "clh-writerd: %s: the sender goes on after %.1fs without progress; records "
                      "are queued again", self.path, stalled)

    def _wait(self, core: Any, poller: zmq.Poller) -> None:
        """Sleep while there is nothing to take, or no room to take it (an
        ack, a stop or a record wakes the poll)."""
        blocked = not core.accepting
        if self._queue and not blocked and not self._park_requested:
            return
        # Lingering over a partial batch, the poll ends by itself when the
        # batch is due: records logged meanwhile need no wake-up (a pipe
        # write by the caller and a wake-up of this thread per record cost
        # more CPU than rendering them). Flushes, sync records and stop
        # wake it explicitly.
        self._idle = not blocked and not core.lingering
        if (blocked or not self._queue) and not self._park_requested:  # re-check: a producer may have appended
            # Rounded up: a sub-millisecond wait truncated to poll(0) spun,
            # holding the GIL, until the interpreter forced a switch (5 ms).
            wait = core.wait_time()
            self._stall_at = _monotonic() + wait + STALL_SECONDS
            poller.poll(math.ceil(wait * 1000))
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
