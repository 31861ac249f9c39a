"""AsyncConcurrentHandler: an asyncio-native client of clh-writerd.

On the loop's thread ``emit()`` is ``prepare`` + ``put_nowait`` on an
``asyncio.Queue``; from another thread the record is handed over with
``call_soon_threadsafe``. A sender task drives the same ``Delivery`` state
machine as the thread-based handler, on the loop; every blocking step
(fallback writes, CLH locks, rotation, gzip, the REQ round trip) runs in an
executor. The loop is blocked only when the user opts in with
``fallback_mode='block'``.
"""

import asyncio
import logging
import os
import sys
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Set, Union

import zmq
import zmq.asyncio

from .. import protocol
from .._batchwrite import CLHHandler
from ._core import (
    DROP_WARNING_EVERY,
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

FALLBACK_MODES = ("drop", "block", "nowait")
# Seconds of rendering the sender does before it lets the loop run again.
TURN_BUDGET = 0.0002

class _Flush:
    """A queue marker: the sender settles it once everything before it is written."""

    def __init__(self, future: "asyncio.Future[None]") -> None:
        self.future = future


class AsyncConcurrentHandler(WrappingHandler):
    """A logging handler for asyncio applications that never blocks the loop.

    Wraps a ConcurrentRotatingFileHandler or ConcurrentTimedRotatingFileHandler
    (composition). ``fallback_mode`` says what happens when the queue is full:
    ``'drop'`` (count and drop), ``'block'`` (write synchronously on the loop),
    ``'nowait'`` (hand the record straight to the executor, bounded).
    """

    def __init__(
        self,
        handler: CLHHandler,
        *,
        endpoint: Any = DEFAULT_ENDPOINT,
        queue_size: int = 10000,
        sync_level: int = logging.CRITICAL,
        fallback_mode: str = "drop",
        executor: Optional[Executor] = None,
        block_warning: bool = True,
        max_nowait: Optional[int] = None,
        level: int = logging.NOTSET,
        **settings: Any,
    ) -> None:
        super().__init__(handler, endpoint, level)
        if fallback_mode not in FALLBACK_MODES:
            raise ValueError(f"fallback_mode must be one of {FALLBACK_MODES}, got {fallback_mode!r}")
        if queue_size < 1:
            raise ValueError("queue_size must be positive")
        unknown = set(settings) - set(SETTING_NAMES)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        self.queue_size = queue_size
        self.sync_level = sync_level
        self.fallback_mode = fallback_mode
        self.block_warning = block_warning
        # 'nowait' hands full-queue records to the executor; bound that work.
        self.max_nowait = max_nowait if max_nowait is not None else max(16, queue_size // 10)
        self.settings = Settings(**settings)
        self._given_executor = executor
        self._closed = False
        self._reset()
        _process.register(self)

    def _reset(self) -> None:
        """Per-process, per-loop state (rebuilt after fork)."""
        self._pid = os.getpid()
        self.stats = ClientStats()
        self.stats.state = STATE_EMBEDDED if self.endpoint is None else "connecting"
        self._fallback = Fallback(self.handler, self.stats)
        self._client_id = protocol.new_client_id()
        self._context: Optional[zmq.Context] = zmq.Context() if self.endpoint is not None else None
        self._sync: Optional[SyncChannel] = None
        if self._context is not None and self.endpoint is not None:
            self._sync = SyncChannel(self._context, self.endpoint, self.settings, self.stats, self._client_id,
                                     self.path, self.options)
        self._confirmed = Confirmed(self._sync, self._fallback, self.stats)
        self._executor: Optional[Executor] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread = -1
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._delivery: Optional[Delivery] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._stopping = False
        self._direct: Set["asyncio.Future[Any]"] = set()
        self._overflow: List[str] = []  # 'nowait' records waiting for their write
        self._overflow_job: Optional["asyncio.Future[Any]"] = None
        self._blocked_warnings = 0

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running loop and start the sender task (done lazily by
        the first emit() on a loop, and by ``async with``)."""
        if self._task is not None:
            raise RuntimeError("handler already started")
        if self._closed:
            raise RuntimeError("handler is closed")
        loop = asyncio.get_running_loop()
        _process.register(self)  # again in a forked child: its exit hooks
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._executor = self._given_executor or ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="clh-writerd-async")
        self._queue = asyncio.Queue(self.queue_size)
        self._wakeup = asyncio.Event()
        self._delivery = Delivery(self.settings, self.stats, self.path, self.options, self._client_id,
                                  self._context, self.endpoint)
        self._task = loop.create_task(self._run())
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
        task = self._task
        if task is None or task.done():
            self.stats.state = STATE_STOPPED
            return True
        timeout = self.settings.drain_timeout if timeout is None else timeout
        self._begin_stop(timeout)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout + 1.0)
            done = True
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
        if self._task is None or self._pid != os.getpid():
            self.stats.state = STATE_STOPPED
            return True
        if loop is not None and loop.is_running() and threading.get_ident() != self._loop_thread:
            future = asyncio.run_coroutine_threadsafe(self.astop(timeout), loop)
            try:
                return future.result((timeout or self.settings.drain_timeout) + 2.0)
            except Exception:
                return False
        if loop is not None and loop.is_running():
            # On the loop's own thread we cannot wait for the task: ask it to stop.
            self._begin_stop(self.settings.drain_timeout if timeout is None else timeout)
            return False
        return self._salvage()

    def close(self) -> None:
        """logging.shutdown() and handler removal call this: stop, then close."""
        if self._closed:
            return
        self.stop()
        self._close_resources()

    def _close_resources(self) -> None:
        if self._closed:
            return
        self._closed = True
        _process.unregister(self)
        if self._sync is not None:
            self._sync.close()
        if self._executor is not None and self._given_executor is None:
            self._executor.shutdown(wait=False)
        if self._context is not None and (self._task is None or self._task.done()):
            self._context.term()
            self._context = None
        try:
            self.handler.close()
        finally:
            super().close()

    def flush(self) -> None:
        """From another thread: wait until everything queued is written. On the
        loop's thread this cannot wait (it would block the loop): use aflush()."""
        loop = self._loop
        if loop is None or not loop.is_running() or threading.get_ident() == self._loop_thread:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.aflush(), loop).result(self.settings.drain_timeout + 1.0)
        except Exception:
            pass

    async def aflush(self) -> None:
        """Return once every record queued before the call is written."""
        if self._queue is None:
            return
        assert self._loop is not None and self._wakeup is not None
        future: "asyncio.Future[None]" = self._loop.create_future()
        await self._queue.put(_Flush(future))
        self._wakeup.set()
        await future

    def get_stats(self) -> Dict[str, Any]:
        """The same keys as NonBlockingConcurrentHandler.get_stats()."""
        in_flight = len(self._delivery.window) if self._delivery is not None else 0
        depth = self._queue.qsize() if self._queue is not None else 0
        return self.stats.snapshot(depth, self.queue_size, in_flight)

    # -- emit ----------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = self._loop
            if threading.get_ident() == self._loop_thread and loop is not None and loop.is_running():
                self._emit_on_loop(record)
            elif loop is not None and loop.is_running() and self._pid == os.getpid():
                item = self._renderer.prepare(record)
                try:
                    loop.call_soon_threadsafe(self._emit_item, item, record.levelno)
                except RuntimeError:  # the loop closed meanwhile
                    self._write_now(self._renderer.render(item))
            else:
                self._emit_without_loop(record)
        except Exception:
            self.handleError(record)

    def _emit_without_loop(self, record: logging.LogRecord) -> None:
        if self._pid != os.getpid():
            self._reset()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # No loop to protect: write before returning, nothing is lost.
            self._write_now(self._renderer.render_now(record))
            self.stats.sync_count += int(record.levelno >= self.sync_level)  # type: ignore[attr-defined]
            return
        if self._task is not None and self._loop is not None and self._loop.is_closed():
            self._salvage()  # a previous loop died with records: write them
            self._task = None
        self.start()
        self._emit_on_loop(record)

    def _emit_on_loop(self, record: logging.LogRecord) -> None:
        self._emit_item(self._renderer.prepare(record), record.levelno)

    def _emit_item(self, item: Any, levelno: int) -> None:
        """prepare'd record -> enqueue, on the loop's thread."""
        if levelno >= self.sync_level:
            self.stats.sync_count += 1  # type: ignore[attr-defined]
            line = self._renderer.render(item)
            if self.fallback_mode == "block":
                self._write_now(line)
            else:
                self._submit(line)  # confirmed written by the executor; never dropped
            return
        assert self._queue is not None
        if self._stopping:
            self._submit(self._renderer.render(item))
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._queue_full(item)
            return
        self.stats.enqueued += 1  # type: ignore[attr-defined]

    def _queue_full(self, item: Any) -> None:
        mode = self.fallback_mode
        if mode == "block":
            self.stats.fallback_count += 1  # type: ignore[attr-defined]
            self._blocked_warnings += 1
            if self.block_warning and self._blocked_warnings % DROP_WARNING_EVERY == 1:
                self._write_now(self._warning_line(item[0], "queue full: blocking the event loop to write (%d so far)",
                                              self._blocked_warnings))
            self._write_now(self._renderer.render(item))
            return
        if mode == "nowait" and len(self._overflow) < self.max_nowait:
            self.stats.fallback_count += 1  # type: ignore[attr-defined]
            self._overflow.append(self._renderer.render(item))
            if self._overflow_job is None:
                self._flush_overflow()
            return
        self.stats.dropped_count += 1  # type: ignore[attr-defined]
        dropped = self.stats.dropped_count  # type: ignore[attr-defined]
        if dropped % DROP_WARNING_EVERY == 0:
            self._submit(self._warning_line(item[0], "queue full, %d records dropped so far (fallback_mode=%r)",
                                       dropped, mode))

    def _write_now(self, line: str) -> None:
        self._confirmed.write(line)

    def _submit(self, line: str) -> None:
        """Write one line in the executor, tracked so stopping waits for it."""
        assert self._loop is not None
        future = self._loop.run_in_executor(self._executor, self._confirmed.write, line)
        self._direct.add(future)
        future.add_done_callback(self._direct_done)

    def _direct_done(self, future: "asyncio.Future[Any]") -> None:
        self._direct.discard(future)
        if not future.cancelled() and future.exception() is not None:
            self.stats.last_error = f"direct write failed: {future.exception()}"

    # -- awaitable confirmation ------------------------------------------------
    async def emit_wait(self, record: logging.LogRecord, timeout: Optional[float] = None) -> None:
        """Write ``record`` and return once it is in the file (daemon confirmed
        or fallback written). Raises asyncio.TimeoutError after ``timeout``
        (the write may still complete). Skips the queue, like sync records."""
        loop = asyncio.get_running_loop()
        if self._task is None and not self._closed:
            self.start()
        line = self._renderer.render_now(record)
        future = loop.run_in_executor(self._executor, self._confirmed.write, line)
        self.stats.sync_count += 1  # type: ignore[attr-defined]
        await asyncio.wait_for(future, timeout)

    emit_async = emit_wait  # the name in the original plan

    def get_async_logger(self, logger: Union[str, logging.Logger, None] = None) -> "AsyncLogger":
        """An adapter whose ``await alog.info(...)`` returns once the record is written."""
        if not isinstance(logger, logging.Logger):
            logger = logging.getLogger(logger)
        return AsyncLogger(logger, self)

    # -- sender task -----------------------------------------------------------
    def _begin_stop(self, timeout: float) -> None:
        self._stopping = True
        if self._delivery is not None and self._delivery.stop_deadline is None:
            self._delivery.stop_deadline = time.monotonic() + timeout
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        assert self._queue is not None and self._delivery is not None and self._wakeup is not None
        delivery, queue = self._delivery, self._queue
        poller = zmq.asyncio.Poller() if not delivery.embedded else None
        if poller is not None:
            for sock in delivery.sockets():
                poller.register(sock, zmq.POLLIN)
        flushes: List[_Flush] = []
        getter: Optional["asyncio.Future[Any]"] = None
        try:
            while True:
                try:
                    getter = await self._step(delivery, queue, poller, flushes, getter)
                    if self._stopping and queue.empty() and delivery.drained() and not flushes \
                            and not self._direct and (getter is None or not getter.done()):
                        return
                except asyncio.CancelledError:
                    # asyncio.run() is ending: drain within the deadline (it
                    # waits for us), then stop. A second cancel ends at once.
                    if self._stopping:
                        raise
                    self._begin_stop(self.settings.drain_timeout)
        finally:
            if getter is not None and not getter.cancel() and not getter.cancelled() \
                    and getter.exception() is None:
                queue.put_nowait(getter.result())  # taken but not handled: keep it for salvage
            if not queue.empty() or not delivery.drained():
                self._salvage()  # cancelled twice or crashed: write the rest directly
            delivery.close()
            if self._stopping:
                self.stats.state = STATE_STOPPED

    async def _step(self, delivery: Delivery, queue: asyncio.Queue, poller: Optional[Any],
                    flushes: List[_Flush], getter: Optional["asyncio.Future[Any]"]) -> Optional["asyncio.Future[Any]"]:
        """One round: collect, service, write directly, then wait for work."""
        if getter is not None and getter.done():
            if not getter.cancelled():  # cancelled below, then this step was interrupted
                self._take(getter.result(), delivery, flushes)
            getter = None
        if getter is not None and not queue.empty():
            # The yields below would let a pending getter take a record out of
            # turn; records are here anyway, so retire it.
            getter.cancel()
            getter = None
        taken, turn_started = 0, time.perf_counter()
        while not flushes and delivery.has_room and not queue.empty():
            self._take(queue.get_nowait(), delivery, flushes)
            taken += 1
            if taken % 16 == 0 and time.perf_counter() - turn_started > TURN_BUDGET:
                # Rendering is CPU work on the loop; after a slow write the
                # queue holds thousands of records: let the loop run between
                # slices (a time budget, since a render's cost varies 10x).
                await asyncio.sleep(0)
                turn_started = time.perf_counter()
        delivery.flushing = bool(flushes)
        direct = delivery.service(time.monotonic())
        if direct:
            await self._write_direct(direct, delivery)
        if flushes and delivery.drained():
            for flush in flushes:
                if not flush.future.done():
                    flush.future.set_result(None)
            flushes.clear()
        if self._stopping and queue.empty() and delivery.drained() and not self._direct:
            return getter
        wait = delivery.wait_time(time.monotonic())
        if (not queue.empty() and not flushes and delivery.has_room) or wait <= 0:
            await asyncio.sleep(0)  # let the loop breathe between busy rounds
            return getter
        return await self._wait(queue, poller, wait, getter, bool(flushes))

    def _take(self, item: Any, delivery: Delivery, flushes: List[_Flush]) -> None:
        if isinstance(item, _Flush):
            flushes.append(item)
            return
        try:
            line = self._renderer.render(item)
        except Exception:
            self.handleError(item[0])
            return
        if delivery.too_large(line):
            self.stats.oversize += 1  # type: ignore[attr-defined]
            self._submit_lines(delivery.batcher.take_all() + [line])
            return
        delivery.add(line)

    def _submit_lines(self, lines: List[str]) -> "asyncio.Future[Any]":
        """Write lines directly (the fallback) in the executor, tracked."""
        assert self._loop is not None
        future = self._loop.run_in_executor(self._executor, self._fallback.write, lines)
        self._direct.add(future)
        future.add_done_callback(self._direct_done)
        return future

    def _flush_overflow(self) -> None:
        """'nowait' overflow: one job at a time writes everything gathered so
        far in one write (one lock), straight through the fallback, so a
        daemon that is not keeping up is not asked once per record and the
        executor keeps room for the sender's own writes. Loop thread only."""
        lines, self._overflow = self._overflow, []
        self._overflow_job = self._submit_lines(lines)
        self._overflow_job.add_done_callback(self._overflow_written)

    def _overflow_written(self, future: "asyncio.Future[Any]") -> None:
        self._overflow_job = None
        if self._overflow:  # gathered while that write ran
            self._flush_overflow()

    async def _write_direct(self, lines: List[str], delivery: Delivery) -> None:
        assert self._loop is not None and self._executor is not None
        while not await self._write_or_put_back(lines, delivery):
            # Disk full or similar: keep the lines (the queue fills up and the
            # policy applies) and retry, unless the stop deadline passed.
            if delivery.stop_deadline is not None and time.monotonic() > delivery.stop_deadline:
                return
            await asyncio.sleep(0.1)

    async def _write_or_put_back(self, lines: List[str], delivery: Delivery) -> bool:
        """One fallback write in the executor. If the sender is cancelled
        meanwhile (asyncio.run ending), the lines are not lost: a write not yet
        started is called off and the lines go back to the batcher (the drain
        writes them, in order); a started one is waited for."""
        assert self._executor is not None
        job = self._executor.submit(self._fallback.write, lines)
        done = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if job.cancel() or not await asyncio.shield(done):
                delivery.batcher.put_back(lines)
            raise

    async def _wait(self, queue: asyncio.Queue, poller: Optional[Any], wait: float,
                    getter: Optional["asyncio.Future[Any]"], blocked: bool) -> Optional["asyncio.Future[Any]"]:
        """Sleep until a record arrives, a socket is readable, a stop is asked, or ``wait`` passes."""
        assert self._wakeup is not None
        waiters: List["asyncio.Future[Any]"] = []
        if not blocked:
            if getter is None:
                getter = asyncio.ensure_future(queue.get())
            waiters.append(getter)
        poll = asyncio.ensure_future(poller.poll(int(wait * 1000))) if poller is not None else None
        if poll is not None:
            waiters.append(poll)
        self._wakeup.clear()
        wake = asyncio.ensure_future(self._wakeup.wait())
        waiters.append(wake)
        try:
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (poll, wake):
                if waiter is not None and not waiter.done():
                    waiter.cancel()
        return getter

    def _salvage(self) -> bool:
        """The loop is gone: write what the queue and the sender still hold."""
        lines: List[str] = list(self._overflow)
        self._overflow = []
        if self._delivery is not None:
            lines += self._delivery.window.take_all() + self._delivery.batcher.take_all()
        queue = self._queue
        while queue is not None and not queue.empty():
            item = queue.get_nowait()
            if not isinstance(item, _Flush):
                lines.append(self._renderer.render(item))
        self.stats.state = STATE_STOPPED
        return self._fallback.write(lines)


class AsyncLogger:
    """``await alog.critical("payment %s captured", pid)`` returns once the
    record is in the file. Other handlers of the logger get it as usual."""

    def __init__(self, logger: logging.Logger, handler: AsyncConcurrentHandler) -> None:
        self.logger = logger
        self.handler = handler

    async def log(self, level: int, msg: Any, *args: Any, exc_info: Any = None, stack_info: bool = False,
                  extra: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> None:
        await self._log(level, msg, args, exc_info, stack_info, extra, timeout)

    async def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.DEBUG, msg, args, **kwargs)

    async def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.INFO, msg, args, **kwargs)

    async def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.WARNING, msg, args, **kwargs)

    async def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.ERROR, msg, args, **kwargs)

    async def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        await self._log(logging.ERROR, msg, args, **kwargs)

    async def critical(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        await self._log(logging.CRITICAL, msg, args, **kwargs)

    async def _log(self, level: int, msg: Any, args: Any, exc_info: Any = None, stack_info: bool = False,
                   extra: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> None:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        # The caller is two frames up (the level method, then its caller).
        frame = sys._getframe(2)
        code = frame.f_code
        if exc_info and not isinstance(exc_info, tuple):
            exc_info = sys.exc_info() if not isinstance(exc_info, BaseException) else \
                (type(exc_info), exc_info, exc_info.__traceback__)
        sinfo = None
        if stack_info:
            import traceback

            sinfo = "Stack (most recent call last):\n" + "".join(traceback.format_stack(frame)).rstrip("\n")
        record = logger.makeRecord(logger.name, level, code.co_filename, frame.f_lineno, msg, args,
                                   exc_info, code.co_name, extra, sinfo)
        if not logger.filter(record):
            return
        if self.handler.filter(record) and level >= self.handler.level:
            await self.handler.emit_wait(record, timeout)
        for other in _handlers_of(logger):
            if other is not self.handler and level >= other.level:
                other.handle(record)


def _handlers_of(logger: logging.Logger) -> List[logging.Handler]:
    """The handlers Logger.callHandlers would reach, in order."""
    out: List[logging.Handler] = []
    current: Optional[logging.Logger] = logger
    while current is not None:
        out.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent  # type: ignore[assignment]
    return out


OWN_NAMES = ("endpoint", "queue_size", "sync_level", "fallback_mode", "executor", "block_warning",
             "max_nowait", "level") + SETTING_NAMES


def create_async_concurrent_handler(
    filename: Union[str, "os.PathLike[str]"], use_timed: bool = False, **kwargs: Any
) -> AsyncConcurrentHandler:
    """Build a CLH handler for ``filename`` and wrap it (see create_nonblocking_handler)."""
    clh_kwargs, own = split_kwargs(kwargs, OWN_NAMES)
    return AsyncConcurrentHandler(build_clh(filename, use_timed, clh_kwargs), **own)
