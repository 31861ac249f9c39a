"""AsyncConcurrentHandler: an asyncio-native client of clh-writerd.

On the loop's thread ``emit()`` is ``freeze`` + append to a bounded deque;
from another thread the record is handed over with ``call_soon_threadsafe``.
The driver task (``LoopDriver``) drives the same ``SenderCore`` as the thread
handler; every blocking step runs in an executor. The loop is blocked only
when the user opts in with ``fallback_mode='block'``.
"""

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

from .._batchwrite import CLHHandler
from .._compat import require_full_python
from . import _process
from ._asynclogger import AsyncLogger
from ._wrapping import WrappingHandler, build_clh
from ._loop_driver import LoopDriver
from ._options import ASYNC, HandlerOptions, split_kwargs
from ._notices import DROP_WARNING_EVERY
from ._plans import record_of
from ._stats import STATE_STOPPED

require_full_python("AsyncConcurrentHandler")

__all__ = ["AsyncConcurrentHandler", "AsyncLogger", "create_async_concurrent_handler"]


class AsyncConcurrentHandler(WrappingHandler):
    """A logging handler for asyncio applications that never blocks the loop.

    Wraps a ConcurrentRotatingFileHandler or ConcurrentTimedRotatingFileHandler
    (composition). ``fallback_mode`` says what happens when the queue is full:
    ``'drop'`` (count and drop), ``'block'`` (write synchronously on the loop),
    ``'nowait'`` (hand the record straight to the executor, bounded).
    Options: see ``HandlerOptions`` (docs/client.md lists them).
    """

    KIND = ASYNC
    _driver: Optional[LoopDriver] = None
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
        self._loop = None
        self._loop_thread = -1
        self._driver = None
        self._blocked_warnings = 0
        self._open_transport()  # before any loop: sync records without a loop use its sync lane

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running loop and start the driver task (done lazily by
        the first emit() on a loop, and by ``async with``)."""
        self._check_startable(self._driver is not None)
        loop = asyncio.get_running_loop()
        _process.register(self)  # again in a forked child: its exit hooks
        self._loop, self._loop_thread = loop, threading.get_ident()
        executor = self.opts.executor or ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="clh-writerd-async")
        core = self._new_core()
        sockets = self._batches.sockets() if self._batches is not None else []
        self._driver = LoopDriver(loop, core, self._queue, self._fallback, executor, sockets, self.stats,
                                  self.drain_timeout, self.queue_size)

    async def __aenter__(self) -> "AsyncConcurrentHandler":
        if self._driver is None:
            self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self, timeout: Optional[float] = None) -> None:
        """Drain (to the daemon or the fallback), stop the driver, close."""
        await self.astop(timeout)
        self._close_resources()

    async def astop(self, timeout: Optional[float] = None) -> bool:
        """Drain and stop the driver task; True if everything was written in time."""
        driver = self._driver
        done = True
        if driver is not None and not driver.task.done():
            done = await driver.stop(self.drain_timeout if timeout is None else timeout)
        self.stats.state = STATE_STOPPED
        return done

    def loop_runs_here(self) -> bool:
        loop = self._loop
        return loop is not None and loop.is_running() and threading.get_ident() == self._loop_thread

    @_process.draining()
    def stop(self, timeout: Optional[float] = None) -> bool:
        """Synchronous stop, for code outside the loop (atexit, another thread)."""
        loop, driver = self._loop, self._driver
        if driver is None or not self.belongs_here():
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
            driver.begin_stop(self.drain_timeout if timeout is None else timeout)
            return False
        return driver.salvage()

    def close(self) -> None:
        """logging.shutdown() and handler removal call this: stop, then close."""
        if not self._closed:
            self.stop()
            self._close_resources()

    def _close_resources(self) -> None:
        if self._closed:
            return
        driver = self._driver
        if driver is None or driver.task.done():
            self._release_after(driver)
            self._close_wrapped()
            return
        # The task still runs (stop() gave up waiting, or could not wait on
        # the loop's own thread): it may be writing. The executor, sockets
        # and the file are released when it ends, never under its write.
        self._close_wrapped(close_file=False)
        driver.task.add_done_callback(lambda _task: self._release_after(driver, close_file=True))

    def _release_after(self, driver: Optional[LoopDriver], close_file: bool = False) -> None:
        if driver is not None and self.opts.executor is None:
            driver.executor.shutdown(wait=False)
        self._release_sockets()
        if close_file:
            self._close_file()

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
        if self._driver is not None:
            await self._driver.flush()

    # -- emit: freeze -> enqueue, on the loop's thread -----------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = self._loop
            if self._closed:
                self._after_close(record)
            elif threading.get_ident() == self._loop_thread and loop is not None and loop.is_running():
                self._emit_item(self._items.freeze(record), record.levelno)
            elif loop is not None and loop.is_running() and self.belongs_here():
                item = self._items.freeze(record)
                try:
                    loop.call_soon_threadsafe(self._emit_item, item, record.levelno)
                except RuntimeError:  # the loop closed meanwhile
                    self._confirmed.write(self._items.finish(item, self.stats.record_limit))
            else:
                self._emit_without_loop(record)
        except Exception:
            self.handleError(record)

    def _emit_without_loop(self, record: logging.LogRecord) -> None:
        if not self.belongs_here():
            self._rebuild_in_child()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # No loop to protect: write before returning, nothing is lost.
            self._confirmed.write(self._items.finish_now(record, self.stats.record_limit))
            self.stats.sync_count += int(record.levelno >= self.sync_level)
            return
        if self._driver is not None and self._loop is not None and self._loop.is_closed():
            self._driver.abandon()  # a previous loop died with records: write them
            self._release_sockets()
            self._driver = None
        self.start()
        self._emit_item(self._items.freeze(record), record.levelno)

    def _emit_item(self, item: Any, levelno: int) -> None:
        driver = self._driver
        assert driver is not None
        if levelno >= self.sync_level or driver.stopping:
            self.stats.sync_count += int(levelno >= self.sync_level)
            if self.fallback_mode == "block" and levelno >= self.sync_level:
                self._confirmed.write(self._items.finish(item, self.stats.record_limit))
            else:
                driver.submit(self._confirmed.write, self._items.finish(item, self.stats.record_limit))  # never dropped
            return
        if len(self._queue) >= self.queue_size:
            self._queue_full(item, driver)
            return
        self._queue.append(item)
        self.stats.enqueued += 1
        driver.record_queued()

    def _queue_full(self, item: Any, driver: LoopDriver) -> None:
        mode = self.fallback_mode
        if mode == "block":
            self.stats.fallback_count += 1
            self._blocked_warnings += 1
            if self.block_warning and self._blocked_warnings % DROP_WARNING_EVERY == 1:
                self._confirmed.write(self._warning_line(
                    record_of(item), "queue full: blocking the event loop to write (%d so far)", self._blocked_warnings))
            self._confirmed.write(self._items.finish(item, self.stats.record_limit))
        elif mode == "nowait" and len(driver.overflow) < self.max_nowait:
            self.stats.fallback_count += 1
            driver.add_overflow(self._items.finish(item, self.stats.record_limit))
        else:
            self._drop(item, f"fallback_mode={mode!r}")

    def _wake(self) -> None:
        if self._driver is not None:
            self._driver.wake()

    # -- awaitable confirmation ---------------------------------------------------
    async def emit_wait(self, record: logging.LogRecord, timeout: Optional[float] = None) -> None:
        """Write ``record`` and return once it is in the file (daemon confirmed
        or fallback written). Raises asyncio.TimeoutError after ``timeout``
        (the write may still complete). Skips the queue, like sync records."""
        loop = asyncio.get_running_loop()
        if self._driver is None and not self._closed:
            self.start()
        line = self._items.finish_now(record, self.stats.record_limit)
        executor = self._driver.executor if self._driver is not None else None
        future = loop.run_in_executor(executor, self._confirmed.write, line)
        self.stats.sync_count += 1
        await asyncio.wait_for(future, timeout)

    emit_async = emit_wait  # the name in the original plan

    def get_async_logger(self, logger: Union[str, logging.Logger, None] = None) -> AsyncLogger:
        """An adapter whose ``await alog.info(...)`` returns once the record is written."""
        if not isinstance(logger, logging.Logger):
            logger = logging.getLogger(logger)
        return AsyncLogger(logger, self)

def create_async_concurrent_handler(
    filename: Union[str, "os.PathLike[str]"], use_timed: bool = False, **kwargs: Any
) -> AsyncConcurrentHandler:
    """Build a CLH handler for ``filename`` and wrap it (see create_nonblocking_handler)."""
    clh_kwargs, own = split_kwargs(ASYNC, kwargs)
    HandlerOptions.build(ASYNC, **own)  # refuse bad options before creating the file
    return AsyncConcurrentHandler(build_clh(filename, use_timed, clh_kwargs), **own)
