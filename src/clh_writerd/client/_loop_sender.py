"""The asyncio handler's sender task: how it waits (an ``asyncio.Event`` and
a ``zmq.asyncio`` poller) and how it runs a blocking step (in the executor).
What it does between the waits is the shared ``SenderCore``."""

import asyncio
import functools
import logging
from concurrent.futures import Executor
from typing import Any, Callable, Deque, List, Optional, Set

import zmq

from ._direct import Fallback
from ._sender import Flush, SenderCore
from ._stages import Item
from ._stats import STATE_STOPPED, ClientStats

log = logging.getLogger("clh_writerd.client")
# Seconds of rendering the sender does before it lets the loop run again,
# with an empty queue; it grows with the backlog (a burst: the app logs
# faster than 0.2 ms per turn drains) up to MAX_TURN_BUDGET, so the sender
# keeps up when the app yields every few hundred records while a turn stays
# well under the 1 ms loop-lag goal.
TURN_BUDGET = 0.0002
MAX_TURN_BUDGET = 0.0006


class LoopSender:
    """One sender task on one loop, for one handler, until it is stopped."""

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
        """Drain and end the task; True if everything was written in time."""
        self.begin_stop(timeout)
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout + 1.0)
            done = not self.core.lost
        except asyncio.TimeoutError:
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
        """The loop is gone or the task crashed: write what is left, here."""
        lines: List[Item] = [*self.overflow, *self.core.salvage(self.queue)]
        self.overflow = []
        self.stats.state = STATE_STOPPED
        return self.fallback.write(lines)

    # -- the task ------------------------------------------------------------------------
    async def _run(self, sockets: List[zmq.Socket]) -> None:
        poller: Optional[Any] = None
        if sockets:
            import zmq.asyncio  # here: importing the package must not load it (the daemon imports it)

            poller = zmq.asyncio.Poller()
            for sock in sockets:
                poller.register(sock, zmq.POLLIN)
        core = self.core
        try:
            while not (core.finished(self.queue) and not self.direct):
                try:
                    await self._turn(poller)
                except asyncio.CancelledError:
                    # asyncio.run() is ending: drain within the deadline (it
                    # waits for us), then stop. A second cancel ends at once.
                    if self.stopping:
                        raise
                    self.begin_stop(self.drain_timeout)
        finally:
            if not core.finished(self.queue):
                self.salvage()  # cancelled twice or crashed: write the rest directly
            core.close()
            if self.stopping:
                self.stats.state = STATE_STOPPED

    async def _turn(self, poller: Optional[Any]) -> None:
        """One round: collect, step, write, settle, then wait for work."""
        core, queue = self.core, self.queue
        # One slice of rendering, then a step: a burst that keeps the queue
        # non-empty must not keep the sender from sending (or, before the
        # daemon answered, from probing it: the burst was shed as drops).
        core.collect(queue, self.budget())
        lines = core.step()
        if lines:
            core.written(lines, await self._write(lines))
        for flush in core.settled():
            flush.release()
        wait = core.wait_time()
        if core.finished(queue) and not self.direct:
            return
        if (queue and core.accepting) or wait <= 0:
            await asyncio.sleep(0)
            return
        self.wakeup.clear()
        self.idle = core.accepting  # blocked: a new record must not wake us
        waiters: "List[asyncio.Future[Any]]" = [asyncio.ensure_future(self.wakeup.wait())]
        if poller is not None:
            waiters.append(asyncio.ensure_future(poller.poll(int(wait * 1000))))
        try:
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.idle = False
            for waiter in waiters:
                waiter.cancel()

    def budget(self) -> float:
        """This turn's rendering budget: TURN_BUDGET, more with a backlog."""
        backlog = len(self.queue) / self.queue_size
        return min(MAX_TURN_BUDGET, TURN_BUDGET * (1.0 + 8.0 * backlog))

    async def _write(self, lines: List[Item]) -> bool:
        """One fallback write in the executor. Cancelled meanwhile (asyncio.run
        ending), the lines are not lost: a write not started is called off and
        they go back to the core (the drain writes them, in order)."""
        job = self.executor.submit(self.fallback.write, lines)
        done = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if job.cancel() or not await asyncio.shield(done):
                self.core.put_back(lines)
            raise

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
            self.stats.last_error = f"direct write failed: {future.exception()}"
        self.wakeup.set()

    def _write_overflow(self) -> None:
        lines, self.overflow = self.overflow, []
        self.overflow_job = self.submit(self.fallback.write, lines)
        self.overflow_job.add_done_callback(self._overflow_written)

    def _overflow_written(self, future: "asyncio.Future[Any]") -> None:
        self.overflow_job = None
        if self.overflow:  # gathered while that write ran
            self._write_overflow()


def _settle(future: "asyncio.Future[None]") -> None:
    if not future.done():  # the loop may have cancelled it meanwhile
        future.set_result(None)
