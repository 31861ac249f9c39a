"""The asyncio handler's driver task (the thread handler's is its sender
thread, in nonblocking.py): how it waits (an ``asyncio.Event`` and
a ``zmq.asyncio`` poller) and how it runs a blocking step (in the executor).
What it does between the waits is the shared ``SenderCore``."""

import asyncio
import concurrent.futures
import functools
import logging
import time
from concurrent.futures import Executor
from typing import Any, Callable, Deque, List, Optional, Set

import zmq
import zmq.asyncio

from ._direct import Fallback
from ._core import Flush, SenderCore
from ._plans import Item
from ._stats import STATE_STOPPED, ClientStats

log = logging.getLogger("clh_writerd.client")
# Seconds of rendering the sender does before it lets the loop run again,
# with an empty queue; it grows with the backlog (a burst: the app logs
# faster than 0.2 ms per turn drains) up to MAX_TURN_BUDGET, so the sender
# keeps up when the app yields every few hundred records while a turn stays
# well under the 1 ms loop-lag goal.
TURN_BUDGET = 0.0002
MAX_TURN_BUDGET = 0.0006
# A turn may go on rendering up to this long in all to catch up with what
# the app queued since the last turn (a burst); under the 1 ms loop-lag goal.
KEEP_UP_BUDGET = 0.001


class LoopDriver:
    """One driver task on one loop, for one handler, until it is stopped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, core: SenderCore, queue: Deque[Any], fallback: Fallback,
                 executor: Executor, sockets: List[zmq.Socket], stats: ClientStats, drain_timeout: float,
                 queue_size: int = 10000) -> None:
        self.loop, self.core, self.queue, self.fallback = loop, core, queue, fallback
        self.queue_size = queue_size
        self.executor, self.stats, self.drain_timeout = executor, stats, drain_timeout
        self.wakeup = asyncio.Event()
        self.idle = False  # waiting with room for records: the next one must wake us
        self.stopping = False
        self.direct: "Set[asyncio.Future[Any]]" = set()  # executor writes stopping waits for
        self.overflow: List[Item] = []  # 'nowait' records waiting for their write
        self.overflow_job: "Optional[asyncio.Future[Any]]" = None
        self.seen = 0  # stats.enqueued at the last turn: what arrived since
        self.job: Optional[WriteJob] = None  # the fallback write in the executor, if any
        self.task = loop.create_task(self._run(sockets))
        self.task.add_done_callback(self._task_done)

    # -- called by the handler, on the loop's thread --------------------------------
    def record_queued(self) -> None:
        """One wake-up per idle period, not one per record."""
        if self.idle:
            self.idle = False
            self.wakeup.set()

    def wake(self) -> None:
        self.wakeup.set()

    def submit(self, write: Callable[[Any], Any], arg: Any) -> "asyncio.Future[Any]":
        """A direct write in the executor, tracked so stopping waits for it."""
        future = self.loop.run_in_executor(self.executor, write, arg)
        self.direct.add(future)
        future.add_done_callback(self._direct_done)
        return future

    def add_overflow(self, line: Item) -> None:
        """'nowait': one job at a time writes everything gathered so far in one
        write (one lock) through the fallback, so a daemon that is not keeping
        up is not asked once per record and the executor keeps room."""
        self.overflow.append(line)
        if self.overflow_job is None:
            self._write_overflow()

    async def flush(self) -> None:
        """Return once every record queued before the call is written."""
        future: "asyncio.Future[None]" = self.loop.create_future()
        self.queue.append(Flush(functools.partial(_settle, future)))
        self.wakeup.set()
        await future

    def begin_stop(self, timeout: float) -> None:
        self.stopping = True
        self.core.request_stop(timeout)
        self.wakeup.set()

    async def stop(self, timeout: float) -> bool:
        """Drain and end the task; True if everything was written in time.
        Past ``timeout`` the task is cancelled: it writes what is left
        directly as it ends (after the write in progress, never under it)."""
        lost_before = self.stats.lost
        self.begin_stop(timeout)
        # asyncio.wait neither cancels the task on timeout nor raises its
        # outcome (a task cancelled meanwhile, by asyncio.run or an earlier stop).
        finished, _ = await asyncio.wait({self.task}, timeout=timeout + 1.0)
        if finished:
            task = self.task
            done = not task.cancelled() and task.exception() is None and self.stats.lost == lost_before
        else:
            self.task.cancel()
            done = False
        if self.direct:
            await asyncio.wait(list(self.direct), timeout=timeout)
        return done

    def abandon(self) -> bool:
        """The loop died under the task: write what is left, close its sockets."""
        written = self.salvage()
        self.core.close()
        return written

    def salvage(self) -> bool:
        """The loop is gone or the task crashed: write what is left, here.
        Later records are written directly (``stopping``), not queued for a
        task that is gone."""
        self.stopping = True
        self._leave_job()
        lines: List[Item] = [*self.overflow, *self.core.salvage(self.queue)]
        self.overflow = []
        self.stats.state = STATE_STOPPED
        if self.fallback.write(lines):
            return True
        self.core.lose(lines, self.stats.last_error, self.fallback.error)
        return False

    # -- the task ------------------------------------------------------------------------
    async def _run(self, sockets: List[zmq.Socket]) -> None:
        poller: Optional[Any] = None
        if sockets:
            poller = zmq.asyncio.Poller()
            for sock in sockets:
                poller.register(sock, zmq.POLLIN)
        core = self.core
        try:
            while not (core.finished(self.queue) and not self.direct and self.job is None):
                try:
                    await self._turn(poller)
                except asyncio.CancelledError:
                    # asyncio.run() is ending: drain within the deadline (it
                    # waits for us), then stop. A second cancel ends at once.
                    if self.stopping:
                        raise
                    self.begin_stop(self.drain_timeout)
        finally:
            self._leave_job()
            if not core.finished(self.queue):
                self.salvage()  # cancelled twice or crashed: write the rest directly
            core.close()
            if self.stopping:
                self.stats.state = STATE_STOPPED

    async def _turn(self, poller: Optional[Any]) -> None:
        """One round: collect a slice, step and start a write (unless one is
        in progress), settle, then wait for work. Rendering goes on while a
        write is in the executor: the next write takes what was rendered
        meanwhile, so a slow disk gets few large writes, not one per slice."""
        core, queue = self.core, self.queue
        self._reap()
        # One slice of rendering, then a step: a burst that keeps the queue
        # non-empty must not keep the sender from sending (or, before the
        # daemon answered, from probing it: the burst was shed as drops).
        self._collect()
        if self.job is None:
            lines = core.step()
            if lines:
                self.job = WriteJob(lines, self.executor.submit(self.fallback.write, lines, core.lock_wait()))
        if self.job is not None:
            # No step while a write is in progress (what it sends or writes
            # next must come after these lines), no flush settles before it.
            if queue and core.accepting:
                await asyncio.sleep(0)
                return
            await self._wait([self.job.wrapper], None, cancel=False)
            return
        for flush in core.settled():
            flush.release()
        wait = core.wait_time()
        if core.finished(queue) and not self.direct:
            return
        if (queue and core.accepting) or wait <= 0:
            await asyncio.sleep(0)
            return
        waiters: "List[asyncio.Future[Any]]" = []
        if poller is not None:
            waiters.append(asyncio.ensure_future(poller.poll(int(wait * 1000))))
        await self._wait(waiters, wait)

    async def _wait(self, waiters: "List[asyncio.Future[Any]]", timeout: Optional[float],
                    cancel: bool = True) -> None:
        """Until a wake-up, one of ``waiters`` or ``timeout``; then the
        waiters are cancelled (if ``cancel``)."""
        self.wakeup.clear()
        self.idle = self.core.accepting  # blocked: a new record must not wake us
        wake = asyncio.ensure_future(self.wakeup.wait())
        try:
            await asyncio.wait([wake, *waiters], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.idle = False
            wake.cancel()
            for waiter in waiters if cancel else ():
                waiter.cancel()

    def _collect(self) -> None:
        """One slice of rendering; then more while it has not caught up with
        what the app queued since the last turn, up to KEEP_UP_BUDGET in all.
        A sender that renders less per turn than the app logs between two
        yields falls behind until the queue is full: a burst was shed as
        drops (measured: 2,700-3,000 of 20,000 with a yield every 200)."""
        core, queue = self.core, self.queue
        started = time.perf_counter()
        arrived = self.stats.enqueued - self.seen
        self.seen = self.stats.enqueued
        taken = core.collect(queue, self.budget())
        while taken < arrived and queue and core.accepting:
            left = KEEP_UP_BUDGET - (time.perf_counter() - started)
            if left <= 0:
                break
            more = core.collect(queue, left)
            if not more:
                break
            taken += more

    def budget(self) -> float:
        """This turn's rendering budget: TURN_BUDGET, more with a backlog."""
        backlog = len(self.queue) / self.queue_size
        return min(MAX_TURN_BUDGET, TURN_BUDGET * (1.0 + 8.0 * backlog))

    def _reap(self) -> None:
        """A write that ended: tell the core (a failed one is retried)."""
        job = self.job
        if job is None or not job.future.done():
            return
        self.job = None
        self.core.written(job.lines, job.ok(), self.fallback.error)

    def _leave_job(self) -> None:
        """The task ends with a write in the executor: one not started is
        called off and its lines go first in the salvage; one running ends
        by itself (the salvage's write waits for it on CLH's lock)."""
        job, self.job = self.job, None
        if job is None:
            return
        if job.future.cancel():
            self.core.put_back(job.lines)
        elif job.future.done():
            self.core.written(job.lines, job.ok(), self.fallback.error)
        else:
            job.future.add_done_callback(functools.partial(self._late_write_done, job.lines))

    def _task_done(self, task: "asyncio.Task[None]") -> None:
        # A crashed sender must not strand records or flush() callers.
        if task.cancelled() or task.exception() is None:
            return
        self.stats.last_error = f"sender crashed: {task.exception()!r}"
        log.error("clh-writerd async sender crashed: %r", task.exception())
        self.salvage()

    def _direct_done(self, future: "asyncio.Future[Any]") -> None:
        self.direct.discard(future)
        if not future.cancelled() and future.exception() is not None:
            error = future.exception()
            self.stats.last_error = f"direct write failed: {error}"
            self.core.announce(1, self.stats.last_error, error)  # counted as lost by Confirmed.write
        self.wakeup.set()

    def _write_overflow(self) -> None:
        lines, self.overflow = self.overflow, []
        self.overflow_job = self.submit(self.fallback.write, lines)
        self.overflow_job.add_done_callback(functools.partial(self._overflow_written, lines))

    def _overflow_written(self, lines: List[Item], future: "asyncio.Future[Any]") -> None:
        self.overflow_job = None
        if not future.cancelled() and future.exception() is None and not future.result():
            self.core.lose(lines, self.stats.last_error, self.fallback.error)
        if self.overflow:  # gathered while that write ran
            self._write_overflow()

    def _late_write_done(self, lines: List[Item], future: "concurrent.futures.Future[bool]") -> None:
        """A write that was still running when the task ended (any thread)."""
        if future.cancelled() or future.exception() is not None or not future.result():
            self.core.lose(lines, f"could not be written while the sender stopped: {self.stats.last_error}",
                           self.fallback.error)


class WriteJob:
    """A fallback write in the executor and the lines it writes. ``wrapper``
    is what the loop awaits; it is never cancelled (that would call the
    write off: wrap_future passes a cancel on to the executor's future)."""

    __slots__ = ("lines", "future", "wrapper")

    def __init__(self, lines: List[Item], future: "concurrent.futures.Future[bool]") -> None:
        self.lines = lines
        self.future = future
        self.wrapper: "asyncio.Future[bool]" = asyncio.wrap_future(future)

    def ok(self) -> bool:
        future = self.future
        return not future.cancelled() and future.exception() is None and bool(future.result())


def _settle(future: "asyncio.Future[None]") -> None:
    if not future.done():  # the loop may have cancelled it meanwhile
        future.set_result(None)
