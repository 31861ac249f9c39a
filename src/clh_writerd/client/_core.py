"""The sender core both handlers drive (``_core``: the thread handler's
sender thread and the asyncio handler's ``LoopDriver`` are its drivers):
everything between "an item leaves
the queue" and "its line is acknowledged or written", without I/O.

``SenderCore`` finishes queued items (``ItemMaker.finish``; routing oversize records to the
fallback), feeds ``Delivery``, settles flush markers, applies the stop
deadline and retries failed direct writes. It never waits and never writes:
``step()`` returns the lines the driver must write through the fallback, and
the driver reports back with ``written()``. A driver is a loop of
``collect`` -> ``step`` -> write -> ``settled`` -> ``finished``? -> wait
``wait_time()``; the thread handler waits on a poller, the asyncio handler
on the event loop.
"""

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

from . import _notices
from ._delivery import Delivery
from ._direct import FINAL_LOCK_WAIT, LOCK_WAIT, describe, is_permanent
from ._items import ItemMaker
from ._plans import Item
from ._stats import ClientStats

log = logging.getLogger("clh_writerd.client")

# Pause before writing again lines whose fallback write failed (disk full).
RETRY_DELAY = 0.1
# Lines whose fallback write kept failing this long are counted as lost (the
# queue behind them would otherwise fill up and stay full for good).
GIVE_UP_AFTER = 10.0
# After the first, at most one loss notice per this many seconds (with the
# count since the last one): a full disk must not flood stderr.
LOSS_NOTICE_EVERY = 10.0
# Items taken per clock check when collecting under a time budget.
_BUDGET_STRIDE = 16


class Flush:
    """A flush() waiting in the queue: released once everything queued
    before it is acknowledged or written."""

    __slots__ = ("release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release


class SyncItem:
    """A sync record queued behind the records before it (``sync_order``).
    Whoever claims it first handles it: the sender (it travels in a batch),
    or the waiting caller after ``sync_timeout`` (it writes it itself)."""

    __slots__ = ("item", "owner")
    lock = threading.Lock()  # held across fork() (_process), so a child finds it free

    def __init__(self, item: Any) -> None:
        self.item = item
        self.owner = ""

    def claim(self, owner: str) -> bool:
        with self.lock:
            if self.owner:
                return False
            self.owner = owner
            return True


class SenderCore:
    """Drives Delivery from queued items; see the module docstring."""

    def __init__(self, delivery: Delivery, items: ItemMaker, stats: ClientStats,
                 on_render_error: Callable[[Any], None], clock: Callable[[], float] = time.monotonic,
                 summary: Optional[Callable[[], Dict[str, Any]]] = None, monitor_interval: float = 0.0) -> None:
        self.delivery = delivery
        self.items = items
        self.stats = stats
        self.on_render_error = on_render_error
        self.clock = clock
        self.flushes: List[Flush] = []
        # Lines about the handler itself (drops), appended from any thread;
        # they go ahead of the queue.
        self.warnings: Deque[Item] = deque()
        self.pending: List[Item] = []  # to write through the fallback, in order
        self.retry_at = 0.0
        self.deadline: Optional[float] = None  # set by request_stop()
        self.failing_since: Optional[float] = None  # the first of the fallback writes failing since
        self.loss_notice_at = 0.0  # when the next loss notice may be logged
        self.unannounced = 0  # lost since the last loss notice
        # Lines handed out by step() and not reported back by written() yet:
        # a driver that takes over from a stuck sender writes them too.
        self.writing: List[Item] = []
        # Set by a thread that took over from a stuck driver (stop at its
        # deadline): the driver, if it ever goes on, must touch nothing more.
        self.taken_over = False
        # monitor_interval: log ``summary()`` (the handler's get_stats()) that often.
        self.summary = summary
        self.monitor_interval = monitor_interval
        self.monitor_at = clock() + self.monitor_interval if self.monitor_interval else None
        self.monitored = (stats.dropped_count, stats.fallback_written)
        # True while collect() holds items between the queue and Delivery
        # (read by callers deciding whether a sync record may skip the queue).
        self.collecting = False

    # -- requests from the handler (any thread) ---------------------------------
    def request_stop(self, timeout: float) -> None:
        """Drain what is queued, then finish; at ``timeout`` from now, stop
        waiting for the daemon and write every unacknowledged line through the
        fallback, whatever else is pending (a flush included)."""
        if self.deadline is None:
            self.deadline = self.clock() + timeout
            self.delivery.stop_at(self.deadline)

    @property
    def stopping(self) -> bool:
        return self.deadline is not None

    def warn(self, line: Item) -> None:
        self.warnings.append(line)

    def notify(self, level: int, message: str) -> None:
        """A notice for the ``clh_writerd.client`` logger, logged by the
        sender (any thread may call this: the caller's thread must not wait
        for stderr)."""
        self.delivery.notify(level, message)

    def log_notices(self) -> None:
        """Log what Delivery and the handler had to say (sender's thread)."""
        for level, message in self.delivery.take_notices():
            _notices.emit(level, message)

    def _monitor(self, now: float) -> None:
        """monitor_interval: the get_stats() summary, at WARNING when drops
        or fallback writes grew since the last one, else INFO."""
        assert self.monitor_interval
        self.monitor_at = now + self.monitor_interval
        if self.summary is None:
            return
        snap = self.summary()
        current = (snap["dropped_count"], snap["fallback_written"])
        grew = current[0] > self.monitored[0] or current[1] > self.monitored[1]
        self.monitored = current
        _notices.emit(logging.WARNING if grew else logging.INFO, "%s", _notices.summary_line(
            self.delivery.path, snap, self.monitor_interval))

    # -- the driver's loop ---------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """Whether the driver should hand more queued items now. Not while a
        flush waits (only what came before it is pending; stopping lifts
        that), nor while a failed write waits for its retry (the queue fills
        up and the handler's full-queue policy applies), nor past the window."""
        if self.pending or (self.flushes and self.deadline is None):
            return False
        return self.delivery.has_room

    def collect(self, queue: Deque[Any], budget: Optional[float] = None) -> int:
        """Take items from ``queue`` while accepting (for at most ``budget``
        seconds of rendering, if given); return how many were taken."""
        while self.warnings:  # before a pending flush settles: they precede it
            self.delivery.add(self.warnings.popleft())
        until = None if budget is None else self.clock() + budget
        take = self.take
        self.collecting = True
        try:
            return self._collect(queue, until, take)
        finally:
            self.collecting = False

    def _collect(self, queue: Deque[Any], until: Optional[float], take: Callable[[Any], None]) -> int:
        taken = 0
        while queue and self.accepting:
            # A run of items that cannot change ``accepting`` unless one is
            # a Flush or an oversize record: one check per run, not per item.
            run = min(len(queue), self.delivery.room, _BUDGET_STRIDE if until is not None else len(queue))
            for _ in range(run):
                item = queue.popleft()
                take(item)
                taken += 1
                if self.pending or isinstance(item, Flush):
                    break
            if until is not None and self.clock() > until:
                break
        return taken

    def take(self, item: Any) -> None:
        """One queued item: a Flush marker, or a prepared record to finish."""
        if isinstance(item, Flush):
            self.flushes.append(item)
            return
        if type(item) is SyncItem:
            if not item.claim("sender"):
                return  # its caller gave up waiting and wrote it
            item = item.item
        try:
            line = self.items.finish(item, self.stats.record_limit)
        except Exception:
            self.on_render_error(item)
            return
        reason = self.delivery.cannot_travel(line) if type(line) is str else ""  # (field values: checked)
        if reason:
            self.stats.count(reason)
            self.pending += self.delivery.take_unsent() + [line]
            return
        self.delivery.add(line)

    def step(self) -> List[Item]:
        """Read replies, send what fits, and return the lines the driver must
        write through the fallback now (then call ``written``)."""
        now = self.clock()
        self.pending += self.delivery.service(now, flushing=bool(self.flushes))
        self.log_notices()
        if self.monitor_at is not None and now >= self.monitor_at:
            self._monitor(now)
        if not self.pending or now < self.retry_at:
            return []
        lines, self.pending = self.pending, []
        self.writing = lines
        return lines

    def lock_wait(self) -> Callable[[], float]:
        """How long the next fallback write may wait for another process's
        lock, read again while it waits: LOCK_WAIT, and never more than
        FINAL_LOCK_WAIT past the drain's deadline (a stop requested
        meanwhile cuts the wait short)."""
        end = self.clock() + LOCK_WAIT

        def left() -> float:
            deadline = self.deadline
            return (end if deadline is None else min(end, deadline + FINAL_LOCK_WAIT)) - self.clock()

        return left

    def written(self, lines: List[Item], ok: bool, error: Optional[BaseException] = None) -> None:
        """The fallback wrote ``lines`` (ok) or failed with ``error``: keep
        them for a retry, unless the failure will not pass (a permission, a
        path), has lasted GIVE_UP_AFTER, or the stop deadline passed: then
        they are lost, counted and announced."""
        self.writing = []
        if ok:
            self.failing_since = None
            return
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        if ((error is not None and is_permanent(error)) or now - self.failing_since >= GIVE_UP_AFTER
                or (self.deadline is not None and now >= self.deadline)):
            self.lose(lines, describe(error) if error is not None else self.stats.last_error, error)
            return
        self.put_back(lines)
        self.retry_at = now + RETRY_DELAY

    def lose(self, lines: List[Item], cause: str, error: Optional[BaseException] = None) -> None:
        """Count ``lines`` as lost and announce it (on stderr whatever the
        logging configuration: the first loss with its traceback, then at
        most one notice per LOSS_NOTICE_EVERY)."""
        if not lines:
            return
        self.stats.lose(len(lines), cause)
        self.announce(len(lines), cause, error)

    def announce(self, count: int, cause: str, error: Optional[BaseException] = None) -> None:
        """Announce ``count`` records lost (already counted); see ``lose``."""
        self.unannounced += count
        now = self.clock()
        if now < self.loss_notice_at and self.deadline is None:
            return
        first = self.loss_notice_at == 0.0
        self.loss_notice_at = now + LOSS_NOTICE_EVERY
        count, self.unannounced = self.unannounced, 0
        _notices.announce_loss(self.delivery.path, count, self.stats.lost, cause, error if first else None)

    def put_back(self, lines: List[Item]) -> None:
        """Lines handed out by step() but not written: ahead of the rest."""
        self.pending = lines + self.pending

    def settled(self) -> List[Flush]:
        """Flush markers whose records are all written: release them."""
        if not self.flushes or not self.drained():
            return []
        out, self.flushes = self.flushes, []
        return out

    def drained(self) -> bool:
        return not self.pending and not self.warnings and self.delivery.drained()

    @property
    def lingering(self) -> bool:
        """Lines wait for a batch to fill (the delivery's linger): the driver
        will look again when it is due, without being woken."""
        return self.delivery.lingering

    def idle(self, queue: Deque[Any]) -> bool:
        """Nothing queued, being collected, pending or unacknowledged: every
        record handed to this core is in the file (any thread may ask: the
        order of the checks makes a record in transit count as busy)."""
        return not queue and not self.collecting and not self.flushes and self.drained()

    def finished(self, queue: Deque[Any]) -> bool:
        """Stopping, nothing is left anywhere, and the final report was
        answered (or its bounded wait is over): the driver may end."""
        if not (self.deadline is not None and not queue and self.drained()):
            return False
        done = self.delivery.final_report(self.clock())
        if done:
            self.log_notices()
        return done

    def wait_time(self) -> float:
        """How long the driver may sleep before something is due."""
        now = self.clock()
        due = self.delivery.wait_time(now)
        if self.pending:
            due = min(due, self.retry_at - now)
        if self.deadline is not None:
            due = min(due, self.deadline - now)
        if self.monitor_at is not None:
            due = min(due, self.monitor_at - now)
        return max(0.0, due)

    def salvage(self, queue: Deque[Any], writing: bool = False) -> List[Item]:
        """The driver cannot go on (crash, loop gone): every line it still
        holds and every queued record, oldest first; releases all waiters.
        ``writing``: also the lines of a write in progress (a driver stuck
        in it: if that write ends after all, they are there twice, counted
        as resent)."""
        held = self.writing if writing else []
        self.stats.resent += len(held)
        lines: List[Item] = [*held, *self.pending, *self.delivery.take_all(), *self.warnings]
        self.writing = []
        self.pending = []
        self.warnings.clear()
        while queue:
            item = queue.popleft()
            if isinstance(item, Flush):
                self.flushes.append(item)
                continue
            if type(item) is SyncItem:
                if not item.claim("sender"):
                    continue
                item = item.item
            try:
                lines.append(self.items.finish(item, self.stats.record_limit))
            except Exception:
                self.on_render_error(item)
        for flush in self.flushes:
            flush.release()
        self.flushes = []
        return lines

    def close(self) -> None:
        self.delivery.close()
