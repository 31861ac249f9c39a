"""AsyncConcurrentHandler: an asyncio-native client of clh-writerd.

On the loop's thread ``emit()`` is ``prepare`` + append to a bounded deque;
from another thread the record is handed over with ``call_soon_threadsafe``.
A sender task drives the same ``SenderCore`` as the thread handler, on the
loop, waiting on an ``asyncio.Event`` and a ``zmq.asyncio`` poller; every
blocking step (fallback writes, CLH locks, rotation, gzip, the REQ round
trip) runs in an executor. The loop is blocked only when the user opts in
with ``fallback_mode='block'``.
"""

import asyncio
import logging
import os
import threading
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable, Deque, List, Optional, Set, Union

import zmq.asyncio

from .._batchwrite import CLHHandler
from . import _process
from ._asynclogger import AsyncLogger
from ._base import WrappingHandler, build_clh
from ._options import ASYNC, FALLBACK_MODES, HandlerOptions, split_kwargs
from ._sender import Flush, SenderCore
from ._stages import DROP_WARNING_EVERY
from ._stats import STATE_STOPPED

__all__ = ["AsyncConcurrentHandler", "AsyncLogger", "FALLBACK_MODES", "create_async_concurrent_handler"]
# Seconds of rendering the sender does before it lets the loop run again.
TURN_BUDGET = 0.0002


class AsyncConcurrentHandler(WrappingHandler):
    """A logging handler for asyncio applications that never blocks the loop.

    Wraps a ConcurrentRotatingFileHandler or ConcurrentTimedRotatingFileHandler
    (composition). ``fallback_mode`` says what happens when the queue is full:
    ``'drop'`` (count and drop), ``'block'`` (write synchronously on the loop),
    ``'nowait'`` (hand the record straight to the executor, bounded).
    Options: see ``HandlerOptions`` (docs/client.md lists them).
    """

    KIND = ASYNC
    _task: "Optional[asyncio.Task[None]]" = None
    _loop: Optional[asyncio.AbstractEventLoop] = None

    def __init__(self, handler: CLHHandler, **options: Any) -> None:
        super().__init__(handler, **options)
        self.fallback_mode = self.opts.fallback_mode
        self.block_warning = self.opts.block_warning
        # 'nowait' hands full-queue records to the executor; bound that work.
        self.max_nowait = self.opts.max_nowait or max(16, self.queue_size // 10)
        _process.register(self)

    def _new_process_state(self) -> None:
        super()._new_process_state()
        self._queue: Deque[Any] = deque()
        self._executor: Optional[Executor] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread = -1
        self._task = None
        self._wakeup: Optional[asyncio.Event] = None
        self._idle = self._stopping = False
        self._direct: "Set[asyncio.Future[Any]]" = set()
        self._overflow: List[str] = []  # 'nowait' records waiting for their write
        self._overflow_job: "Optional[asyncio.Future[Any]]" = None
        self._blocked_warnings = 0
        self._open_sync()  # before any loop: sync records without a loop use it

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running loop and start the sender task (done lazily by
        the first emit() on a loop, and by ``async with``)."""
        if self._task is not None:
            raise RuntimeError("handler already started")
        if self._closed:
            raise RuntimeError("handler is closed")
        loop = asyncio.get_running_loop()
        _process.register(self)  # again in a forked child: its exit hooks
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._executor = self.opts.executor or ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="clh-writerd-async")
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._run(self._new_core()))
        self._task.add_done_callback(self._sender_done)

    def _sender_done(self, task: "asyncio.Task[None]") -> None:
        # A crashed sender must not strand records or flush() callers.
        if task.cancelled() or task.exception() is None:
            return
        self.stats.last_error = f"sender crashed: {task.exception()!r}"
        logging.getLogger("clh_writerd.client").error("clh-writerd async sender crashed: %r", task.exception())
        self._salvage()

    async def __aenter__(self) -> "AsyncConcurrentHandler":
        if self._task is None:
            self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self, timeout: Optional[float] = None) -> None:
        """Drain (to the daemon or the fallback), stop the sender, close."""
        await self.astop(timeout)
        self._close_resources()

    async def astop(self, timeout: Optional[float] = None) -> bool:
        """Drain and stop the sender task; True if everything was written in time."""
        task, core = self._task, self._core
        if task is None or task.done() or core is None:
            self.stats.state = STATE_STOPPED
            return True
        timeout = self.drain_timeout if timeout is None else timeout
        self._begin_stop(timeout)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout + 1.0)
            done = not core.lost
        except asyncio.TimeoutError:
            task.cancel()
            done = False
        if self._direct:
            await asyncio.wait(list(self._direct), timeout=timeout)
        self.stats.state = STATE_STOPPED
        return done

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Synchronous stop, for code outside the loop (atexit, another thread)."""
        loop = self._loop
        if self._task is None or not self.belongs_here():
            self.stats.state = STATE_STOPPED
            return True
        if loop is not None and loop.is_running() and threading.get_ident() != self._loop_thread:
            future = asyncio.run_coroutine_threadsafe(self.astop(timeout), loop)
            try:
                return future.result((timeout or self.drain_timeout) + 2.0)
            except Exception:
                return False
        if loop is not None and loop.is_running():
            # On the loop's own thread we cannot wait for the task: ask it to stop.
            self._begin_stop(self.drain_timeout if timeout is None else timeout)
            return False
        return self._salvage()

    def close(self) -> None:
        """logging.shutdown() and handler removal call this: stop, then close."""
        if not self._closed:
            self.stop()
            self._close_resources()

    def _close_resources(self) -> None:
        if self._closed:
            return
        if self._executor is not None and self.opts.executor is None:
            self._executor.shutdown(wait=False)
        if self._task is None or self._task.done():
            self._release_sockets()
        self._close_wrapped()

    def flush(self) -> None:
        """From another thread: wait until everything queued is written. On the
        loop's thread this cannot wait (it would block the loop): use aflush()."""
        loop = self._loop
        if loop is None or not loop.is_running() or threading.get_ident() == self._loop_thread:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.aflush(), loop).result(self.drain_timeout + 1.0)
        except Exception:
            pass

    async def aflush(self) -> None:
        """Return once every record queued before the call is written."""
        if self._task is None or self._loop is None:
            return
        future: "asyncio.Future[None]" = self._loop.create_future()
        self._queue.append(Flush(lambda: future.done() or future.set_result(None)))
        self._wake()
        await future

    def _queue_depth(self) -> int:
        return len(self._queue)

    # -- emit: prepare -> enqueue, on the loop's thread -----------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = self._loop
            if self._closed:
                self._after_close(record)
            elif threading.get_ident() == self._loop_thread and loop is not None and loop.is_running():
                self._emit_item(self._renderer.prepare(record), record.levelno)
            elif loop is not None and loop.is_running() and self.belongs_here():
                item = self._renderer.prepare(record)
                try:
                    loop.call_soon_threadsafe(self._emit_item, item, record.levelno)
                except RuntimeError:  # the loop closed meanwhile
                    self._confirmed.write(self._renderer.render(item))
            else:
                self._emit_without_loop(record)
        except Exception:
            self.handleError(record)

    def _emit_without_loop(self, record: logging.LogRecord) -> None:
        if not self.belongs_here():
            self._new_process_state()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # No loop to protect: write before returning, nothing is lost.
            self._confirmed.write(self._renderer.render_now(record))
            self.stats.sync_count += int(record.levelno >= self.sync_level)
            return
        if self._task is not None and self._loop is not None and self._loop.is_closed():
            self._salvage()  # a previous loop died with records: write them
            self._release_sockets()
            self._task = None
        self.start()
        self._emit_item(self._renderer.prepare(record), record.levelno)

    def _emit_item(self, item: Any, levelno: int) -> None:
        if levelno >= self.sync_level or self._stopping:
            self.stats.sync_count += int(levelno >= self.sync_level)
            if self.fallback_mode == "block" and levelno >= self.sync_level:
                self._confirmed.write(self._renderer.render(item))
            else:
                self._submit(self._confirmed.write, self._renderer.render(item))  # never dropped
            return
        queue = self._queue
        if len(queue) >= self.queue_size:
            self._queue_full(item)
            return
        queue.append(item)
        self.stats.enqueued += 1
        if self._idle:
            self._idle = False
            self._wake()

    def _queue_full(self, item: Any) -> None:
        mode = self.fallback_mode
        if mode == "block":
            self.stats.fallback_count += 1
            self._blocked_warnings += 1
            if self.block_warning and self._blocked_warnings % DROP_WARNING_EVERY == 1:
                self._confirmed.write(self._warning_line(
                    item[0], "queue full: blocking the event loop to write (%d so far)", self._blocked_warnings))
            self._confirmed.write(self._renderer.render(item))
        elif mode == "nowait" and len(self._overflow) < self.max_nowait:
            self.stats.fallback_count += 1
            self._overflow.append(self._renderer.render(item))
            if self._overflow_job is None:
                self._flush_overflow()
        else:
            self._drop(item, f"fallback_mode={mode!r}")

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _submit(self, write: Callable[[Any], Any], arg: Any) -> "asyncio.Future[Any]":
        """A direct write in the executor, tracked so stopping waits for it."""
        assert self._loop is not None
        future = self._loop.run_in_executor(self._executor, write, arg)
        self._direct.add(future)
        future.add_done_callback(self._direct_done)
        return future

    def _direct_done(self, future: "asyncio.Future[Any]") -> None:
        self._direct.discard(future)
        if not future.cancelled() and future.exception() is not None:
            self.stats.last_error = f"direct write failed: {future.exception()}"
        self._wake()

    def _flush_overflow(self) -> None:
        """'nowait' overflow: one job at a time writes all gathered so far in
        one write (one lock) through the fallback, so the executor keeps room
        for the sender's own writes."""
        lines, self._overflow = self._overflow, []
        self._overflow_job = self._submit(self._fallback.write, lines)
        self._overflow_job.add_done_callback(self._overflow_written)

    def _overflow_written(self, future: "asyncio.Future[Any]") -> None:
        self._overflow_job = None
        if self._overflow:  # gathered while that write ran
            self._flush_overflow()

    # -- awaitable confirmation ---------------------------------------------------
    async def emit_wait(self, record: logging.LogRecord, timeout: Optional[float] = None) -> None:
        """Write ``record`` and return once it is in the file (daemon confirmed
        or fallback written). Raises asyncio.TimeoutError after ``timeout``
        (the write may still complete). Skips the queue, like sync records."""
        loop = asyncio.get_running_loop()
        if self._task is None and not self._closed:
            self.start()
        line = self._renderer.render_now(record)
        future = loop.run_in_executor(self._executor, self._confirmed.write, line)
        self.stats.sync_count += 1
        await asyncio.wait_for(future, timeout)

    emit_async = emit_wait  # the name in the original plan

    def get_async_logger(self, logger: Union[str, logging.Logger, None] = None) -> AsyncLogger:
        """An adapter whose ``await alog.info(...)`` returns once the record is written."""
        if not isinstance(logger, logging.Logger):
            logger = logging.getLogger(logger)
        return AsyncLogger(logger, self)

    # -- sender task: how it waits, and writes in the executor -----------------------
    def _begin_stop(self, timeout: float) -> None:
        self._stopping = True
        if self._core is not None:
            self._core.request_stop(timeout)
        self._wake()

    async def _run(self, core: SenderCore) -> None:
        poller = zmq.asyncio.Poller() if self._transport is not None else None
        for sock in self._transport.sockets() if self._transport is not None else ():
            poller.register(sock, zmq.POLLIN)  # type: ignore[union-attr]
        try:
            while not (core.finished(self._queue) and not self._direct):
                try:
                    await self._turn(core, poller)
                except asyncio.CancelledError:
                    # asyncio.run() is ending: drain within the deadline (it
                    # waits for us), then stop. A second cancel ends at once.
                    if self._stopping:
                        raise
                    self._begin_stop(self.drain_timeout)
        finally:
            if not core.finished(self._queue):
                self._salvage()  # cancelled twice or crashed: write the rest directly
            core.close()
            if self._stopping:
                self.stats.state = STATE_STOPPED

    async def _turn(self, core: SenderCore, poller: Optional[Any]) -> None:
        """One round: collect, step, write, settle, then wait for work."""
        queue = self._queue
        while core.collect(queue, TURN_BUDGET) and queue and core.accepting:
            await asyncio.sleep(0)  # rendering is CPU work on the loop: let it run between slices
        lines = core.step()
        if lines:
            core.written(lines, await self._write(core, lines))
        for flush in core.settled():
            flush.release()
        wait = core.wait_time()
        if core.finished(queue) and not self._direct:
            return
        if (queue and core.accepting) or wait <= 0:
            await asyncio.sleep(0)
            return
        assert self._wakeup is not None
        self._wakeup.clear()
        self._idle = core.accepting  # blocked: a new record must not wake us
        waiters = [asyncio.ensure_future(self._wakeup.wait())]
        if poller is not None:
            waiters.append(asyncio.ensure_future(poller.poll(int(wait * 1000))))
        try:
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._idle = False
            for waiter in waiters:
                waiter.cancel()

    async def _write(self, core: SenderCore, lines: List[str]) -> bool:
        """One fallback write in the executor. Cancelled meanwhile (asyncio.run
        ending), the lines are not lost: a write not started is called off and
        they go back to the core (the drain writes them, in order)."""
        assert self._executor is not None
        job = self._executor.submit(self._fallback.write, lines)
        done = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if job.cancel() or not await asyncio.shield(done):
                core.put_back(lines)
            raise

    def _salvage(self) -> bool:
        """The loop is gone: write what the queue and the sender still hold."""
        lines, self._overflow = self._overflow, []
        if self._core is not None:
            lines += self._core.salvage(self._queue)
        self.stats.state = STATE_STOPPED
        return self._fallback.write(lines)


def create_async_concurrent_handler(
    filename: Union[str, "os.PathLike[str]"], use_timed: bool = False, **kwargs: Any
) -> AsyncConcurrentHandler:
    """Build a CLH handler for ``filename`` and wrap it (see create_nonblocking_handler)."""
    clh_kwargs, own = split_kwargs(ASYNC, kwargs)
    HandlerOptions.build(ASYNC, **own)  # refuse bad options before creating the file
    return AsyncConcurrentHandler(build_clh(filename, use_timed, clh_kwargs), **own)
