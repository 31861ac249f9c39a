"""The delivery state machine both handlers drive (sans-I/O).

``Delivery`` decides what to send, when a batch is retired, when the daemon
counts as unreachable and when to go back to it. It reads the time from the
clock it is given and talks through a ``Transport`` whose ``send``/``recv``
never block (``BatchLane``, or a fake in tests), so it does no waiting and
no file I/O of its own: ``service()`` hands back the lines the driver must
write through the fallback.
"""

import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from .. import protocol
from ._options import HandlerOptions
from . import _notices as notices
from ._batching import Batcher, cannot_travel, Window
from ._plans import FieldPlan, Item, packed_records, plan_of, to_lines
from ._stats import (RECORD_LIMIT, STATE_CONNECTING, STATE_DAEMON, STATE_EMBEDDED, STATE_FALLBACK, STATE_STOPPED,
                     ClientStats)
from ._transport import CONNECTED, DISCONNECTED, Event, SyncRefused

try:
    from typing import Protocol
except ImportError:  # Python < 3.8: the interface is documentation only
    Protocol = object  # type: ignore[assignment]


class Transport(Protocol):
    """What Delivery needs from a connection to the daemon."""

    def usable(self) -> str: ...  # "" once connected to a trusted endpoint; else why not
    def send(self, payload: bytes) -> bool: ...  # False: not connected, nothing queued
    def recv(self) -> Optional[bytes]: ...  # None: nothing to read now
    def events(self) -> Iterator[Event]: ...  # CONNECTED / DISCONNECTED / SyncRefused since the last call
    def answered(self, renders: bool) -> None: ...  # a daemon answered a probe; it renders field values or not
    def close(self) -> None: ...


# Pause before sending again a batch the daemon refused as busy (doubling).
MIN_BUSY_BACKOFF = 0.01
MAX_BUSY_BACKOFF = 1.0
# The final report at stop: how long to wait for the daemon's answer at most
# (never past the stop deadline: close() keeps its drain_timeout bound).
FINAL_REPORT_WAIT = 1.0
# Report ids live above probe and ping ids: an answer to a report must not
# pass for the answer to a probe.
REPORT_IDS = 1 << 40
# Sync refusals that say the daemon will not take this file at all.
SYNC_REFUSALS_FOR_THE_FILE = frozenset((protocol.E_FORBIDDEN_PATH, protocol.E_OPTIONS_CONFLICT,
                                        protocol.E_UNAUTHORIZED))

class Delivery:
    """Batches, window, acks, probes and the daemon/fallback switch."""

    def __init__(self, options: HandlerOptions, stats: ClientStats, path: str, file_options: Dict[str, Any],
                 client_id: protocol.ClientId, transport: Optional[Transport],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.s = options
        self.stats = stats
        self.path = path
        self.options = file_options
        self.client_id = client_id
        self.clock = clock
        self.window = Window(options.window)
        self.batcher = Batcher(options.batch_size, options.batch_bytes, clock)
        stats.record_limit = RECORD_LIMIT  # until a daemon tells its own
        self.stop_deadline: Optional[float] = None  # stop_at()
        self.flushing = False  # a flush() waits: send without lingering (service())
        self.abandoned = False  # the stop deadline passed: everything goes to the fallback
        self.transport = transport
        self.fields_ok = False  # the daemon answering renders field values (protocol 2)
        now = clock()
        self.connect_started = now
        self.probe_at = 0.0
        self.probe_interval = 0.1
        self.probe_id = 0
        # A daemon that acks nothing for ack_timeout gets a ping: answered,
        # it is alive but slow (keep waiting, no duplicates); unanswered
        # within liveness_timeout, the fallback takes over.
        self.last_progress = now
        self.liveness_deadline: Optional[float] = None
        self.liveness_id = 0
        # The daemon said it is stopping: what it accepted before will still
        # be written and acked; what it refused goes to the fallback after.
        self.daemon_stopping = False
        self.resend_at = 0.0
        self.busy_backoff = MIN_BUSY_BACKOFF
        self.report_at = now + options.report_interval
        # The last report the daemon answered, and the one waiting for its answer.
        self.reported: Optional[Tuple[Any, ...]] = None
        self.report_pending: Optional[Tuple[Any, ...]] = None
        self.report_id = REPORT_IDS
        self.final_id = 0  # the final report's id, once sent
        self.final_deadline: Optional[float] = None
        self.final_answered = False
        # Warnings for the driver to log (level, message), oldest first;
        # appended from any thread (notify()), taken by the driver (take_notices()).
        self._notices: Deque[Tuple[int, str]] = deque()
        # A fallback episode that was warned about: it ends (with one more
        # warning) at the first batch the daemon acknowledges again, so a
        # daemon that answers pings but refuses the path warns once, not at
        # every probe.
        self.episode: Optional[str] = None
        self.episode_written = 0  # stats.fallback_written when it began
        self.episode_started = now
        stats.state = STATE_EMBEDDED if transport is None else STATE_CONNECTING

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- from the handler (any thread) -----------------------------------------
    def stop_at(self, deadline: float) -> None:
        """The stop deadline: batches stop lingering, acks are waited for
        until half a second before it; at it, everything unacknowledged goes
        to the fallback (service())."""
        self.stop_deadline = deadline

    def notify(self, level: int, message: str) -> None:
        """A notice for the driver to log (any thread: the caller's thread never waits for stderr)."""
        self._notices.append((level, message))

    def take_notices(self) -> List[Tuple[int, str]]:
        """The notices to log now, oldest first (the driver's thread)."""
        out = []
        while self._notices:
            out.append(self._notices.popleft())
        return out

    # -- feeding -----------------------------------------------------------
    @property
    def embedded(self) -> bool:
        return self.transport is None

    @property
    def has_room(self) -> bool:
        """Whether the driver should take more records from its queue."""
        return len(self.batcher.lines) < self.s.batch_size * self.s.window

    @property
    def room(self) -> int:
        """How many more lines the batcher takes before has_room turns false."""
        return max(0, self.s.batch_size * self.s.window - len(self.batcher.lines))

    def add(self, line: Item) -> None:
        self.batcher.add(line)

    def cannot_travel(self, line: Item) -> str:
        """Why ``line`` cannot travel to this daemon (``cannot_travel``): the
        driver writes it through the fallback instead, counted by the name returned."""
        return cannot_travel(line, self.stats.record_limit)

    def drained(self) -> bool:
        return not self.batcher.lines and not len(self.window)

    @property
    def lingering(self) -> bool:
        """Lines wait in a batch that is not full (sent when due: wait_time())."""
        return bool(self.batcher.lines)

    @property
    def in_flight(self) -> int:
        return len(self.window)

    def take_unsent(self) -> List[Item]:
        """Lines batched but not sent, oldest first (they go ahead of an oversize record)."""
        return self.batcher.take_all()

    def take_all(self) -> List[Item]:
        """Every line not acknowledged, oldest first (salvage: the fallback writes them)."""
        return self.window.take_all() + self.batcher.take_all()

    # -- the step ------------------------------------------------------------
    def service(self, now: float, flushing: bool = False) -> List[Item]:
        """Read replies, send what fits, and return lines the driver must
        write directly now, oldest first (fallback or embedded mode).
        ``flushing``: a flush() waits, so batches go without lingering."""
        self.flushing = flushing
        if (self.stop_deadline is not None and now >= self.stop_deadline and not self.abandoned
                and self.final_deadline is None):  # (drained, the final report sent: nothing to abandon)
            self.abandon("stop deadline reached: unacknowledged records go to the fallback")
        if self.transport is None:
            return self.batcher.take_all()
        self.on_readable()
        state = self.stats.state
        if state == STATE_CONNECTING:
            if now >= self.probe_at:
                self._probe(now)
            if now - self.connect_started > self.s.connect_timeout:
                self._enter_fallback("no daemon answered within connect_timeout")
        elif state == STATE_DAEMON:
            if self.daemon_stopping:
                if not self.window.batches:  # everything it accepted is acked
                    self._enter_fallback("the daemon is stopping", kind=notices.STOPPING)
            else:
                self._send_batches(now)
            self._check_liveness(now)
        direct: List[Item] = []
        if self.stats.state == STATE_FALLBACK:
            replayed = self.window.take_all()
            self.stats.resent += len(replayed)
            direct = replayed + self.batcher.take_all()
            if now >= self.probe_at and not self.abandoned:
                self._probe(now)
        if now >= self.report_at:
            self._report(now)
        return direct

    def _check_liveness(self, now: float) -> None:
        if not self.window.batches:
            self.last_progress = now
            self.liveness_deadline = None
            return
        if self.liveness_deadline is not None:
            if now > self.liveness_deadline:
                self._enter_fallback(f"no ack within {self.ack_timeout():.1f}s and no answer to a ping",
                                     kind=notices.NOT_ANSWERING)
            return
        if now - self.last_progress > self.ack_timeout():
            if self.stop_deadline is not None and now >= self.stop_deadline - 0.5:
                self._enter_fallback("stopping: no time left to wait for acks", kind=notices.STOP_DEADLINE)
                return
            self.liveness_id = self._next_id()
            self._ping(self.liveness_id)
            self.liveness_deadline = now + min(self.s.ack_timeout, self.s.liveness_timeout)

    def _next_id(self) -> int:
        self.probe_id += 1
        return self.probe_id

    def wait_time(self, now: float) -> float:
        """How long the driver may sleep before something is due."""
        due = [now + 0.5]
        if self.batcher.lines and (self.window.has_room or self.stats.state != STATE_DAEMON):
            due.append(self.batcher.first_at + (0 if self.flushing or self.stop_deadline else self.s.linger))
        if len(self.window):
            due.append(self.liveness_deadline or (self.last_progress + self.ack_timeout()))
            if self.window.refused:
                due.append(self.resend_at)
        if self.stats.state == STATE_FALLBACK:
            due.append(self.probe_at)
        elif self.stats.state == STATE_CONNECTING:
            due.append(min(self.probe_at, self.connect_started + self.s.connect_timeout))
        if self.final_deadline is not None and not self.final_answered:
            due.append(self.final_deadline)
        return max(0.0, min(due) - now)

    def ack_timeout(self) -> float:
        if self.stop_deadline is not None:
            # Stopping: leave time to write the window through the fallback.
            remaining = self.stop_deadline - self.clock() - 0.5
            return max(0.0, min(self.s.ack_timeout, remaining))
        return self.s.ack_timeout

    # -- daemon path -----------------------------------------------------------
    def _send_batches(self, now: float) -> None:
        window, batcher = self.window, self.batcher
        if not window.batches:
            self.last_progress = now  # the ack clock starts with the first batch out
        # Refused as busy: nothing of it was written, so sending it again can
        # not duplicate anything (it is counted in `busy`, not `resent`).
        for seq, batch in (window.ready_to_resend() if now >= self.resend_at else ()):
            if not self._send(batch.payload):
                window.refuse(seq)
                return
            window.resend(seq, batch)
        hurry = self.flushing or self.stop_deadline is not None
        while batcher.lines and window.has_room:
            if not batcher.full and not hurry and now - batcher.first_at < self.s.linger:
                return
            lines = batcher.take()
            payload = self.encode(window.next_seq, lines)
            if not self._send(payload):
                batcher.put_back(lines)  # written by the fallback, in order
                return
            window.add(lines, payload)
            self.stats.sent += len(lines)

    def encode(self, seq: int, items: Sequence[Item]) -> bytes:
        """A batch frame: field values go as they are when the daemon renders
        (with the format of the first of them; another format's are rendered
        here), else every item is rendered here."""
        plan: Optional[FieldPlan] = None
        if self.fields_ok:
            for item in items:
                if type(item) is not str:
                    plan = plan_of(item)  # type: ignore[arg-type]
                    break
        if plan is None:
            return protocol.encode_batch(self.client_id, seq, self.path, self.options, list(to_lines(items)))
        return protocol.encode_batch(self.client_id, seq, self.path, self.options, packed_records(plan, items),
                                     format=plan.format, packed=True)

    def _send(self, payload: bytes) -> bool:
        assert self.transport is not None
        if self.transport.send(payload):
            return True
        self._enter_fallback("daemon not connected")
        return False

    def abandon(self, reason: str) -> None:
        """Stop deadline: no more waiting for this daemon; every unacked and
        pending line goes to the fallback on the next service()."""
        self.abandoned = True
        self._enter_fallback(reason, kind=notices.STOP_DEADLINE)

    def on_readable(self) -> None:
        """Drain replies, then connection events, without blocking.

        Replies first: acks the daemon sent before it went away are already
        queued when the disconnect event arrives, and must retire their
        batches before the fallback decides what to write again."""
        self._replies()
        self._connection_events()

    def _replies(self) -> None:
        if self.transport is None:
            return
        while True:
            data = self.transport.recv()
            if data is None:
                return
            try:
                reply = protocol.decode_reply(data)
            except protocol.ProtocolError as exc:
                self.stats.last_error = f"bad reply from daemon: {exc}"
                continue
            if isinstance(reply, protocol.Ack):
                batch = self.window.ack(reply.seq)
                if batch is not None:
                    self.stats.acked += len(batch.lines)
                    self.last_progress = self.clock()
                    self.busy_backoff = MIN_BUSY_BACKOFF
                    if self.episode is not None:
                        self._back_on_daemon()
            elif isinstance(reply, protocol.Ok):
                if reply.id >= REPORT_IDS:
                    self._report_answered(reply.id)
                elif reply.id == self.liveness_id and self.liveness_deadline is not None:
                    self.last_progress = self.clock()  # slow, not gone: keep waiting
                    self.liveness_deadline = None
                elif reply.id == self.probe_id and self.stats.state != STATE_DAEMON:
                    self._enter_daemon(reply.data)
            elif isinstance(reply, protocol.Error):
                self._error(reply)

    def _error(self, reply: protocol.Error) -> None:
        if reply.code == protocol.E_BUSY and reply.seq is not None:
            self.stats.busy += 1
            self.window.refuse(reply.seq)
            # Back off before sending it again: an overloaded daemon should
            # not spend its time decoding frames it has to refuse.
            self.resend_at = self.clock() + self.busy_backoff
            self.busy_backoff = min(MAX_BUSY_BACKOFF, self.busy_backoff * 2)
            return
        if reply.code == protocol.E_SHUTTING_DOWN and reply.seq is not None:
            # It refuses this batch and every later one, but writes and acks
            # the earlier ones while draining: wait for those, then fall back.
            self.window.refuse(reply.seq)
            self.daemon_stopping = True
            return
        if reply.id is not None and reply.id >= REPORT_IDS:
            # A refused report (an older daemon, a malformed field): nothing
            # to write, and not a reason to leave the daemon.
            self._report_answered(reply.id)
            return
        self.stats.last_error = f"daemon error {reply.code}: {reply.message}"
        kind = notices.KIND_OF_ERROR.get(reply.code, notices.POLICY)
        if reply.code == protocol.E_UNAUTHORIZED:
            # This daemon does not admit this process (allowed_uids, peer_dirs),
            # even for a ping: the fallback writes; ask again rarely (a reload may admit it).
            self._enter_fallback(self.stats.last_error, probe_after=60.0, kind=kind)
            self.stats.last_error = f"daemon error {reply.code}: {reply.message}"
            return
        if reply.seq is None:
            return  # a refused ping: nothing to write
        if reply.code in protocol.RETRYABLE_ERRORS:
            self._enter_fallback(self.stats.last_error, kind=kind)
        else:
            # This daemon will never take the file: stay in fallback and ask
            # again rarely (a config reload may allow it later).
            self._enter_fallback(self.stats.last_error, probe_after=60.0, kind=kind)

    def _sync_refused(self, code: str, message: str) -> None:
        """A daemon that refuses this file's sync records (path, options,
        policy) refuses its batches too: the fallback writes, and warns once,
        as for a refused batch. A refusal about one record (too large, an
        encoding) or a passing one (write failed) changes nothing."""
        if code in SYNC_REFUSALS_FOR_THE_FILE and self.stats.state != STATE_FALLBACK:
            self.stats.last_error = f"daemon error {code}: {message}"
            self._enter_fallback(self.stats.last_error, probe_after=60.0,
                                 kind=notices.KIND_OF_ERROR.get(code, notices.POLICY))

    def _connection_events(self) -> None:
        assert self.transport is not None
        for event in self.transport.events():
            if type(event) is SyncRefused:
                self._sync_refused(event.code, event.message)
            elif event == DISCONNECTED and self.stats.state == STATE_DAEMON:
                self._enter_fallback("daemon disconnected")
            elif event == CONNECTED and self.stats.state != STATE_DAEMON:
                self.probe_at = 0.0  # a daemon is there: probe now

    def _ping(self, id: int) -> None:
        assert self.transport is not None
        self.transport.send(protocol.encode_ping(id))

    def _probe(self, now: float) -> None:
        assert self.transport is not None
        problem = self.transport.usable()
        if problem:
            # Never connected: write through the fallback, look again soon
            # (an lstat; the daemon may be starting).
            self._enter_fallback(problem, probe_after=min(0.5, self.s.max_probe_interval),
                                kind=notices.NO_DAEMON if problem.startswith("no daemon") else notices.UNTRUSTED)
            self.stats.last_error = problem
            return
        self._ping(self._next_id())
        self.probe_at = now + self.probe_interval
        self.probe_interval = min(self.s.max_probe_interval, self.probe_interval * 2)

    def _enter_daemon(self, info: Dict[str, Any]) -> None:
        if self.abandoned:
            return
        self.stats.state = STATE_DAEMON
        self.probe_interval = 0.1
        self.daemon_stopping = False
        self.liveness_deadline = None
        self.last_progress = self.clock()
        # A daemon answers (again): tell it everything now, even what the
        # previous one was told (a restarted daemon knows nothing).
        self.reported = None
        self.report_at = 0.0
        self.fields_ok = info.get("protocol") == protocol.PROTOCOL_VERSION
        limit = info.get("max_message_bytes")
        if isinstance(limit, int) and limit > 0:
            # Stay well under the daemon's frame limit (msgpack overhead).
            self.batcher.max_bytes = min(self.s.batch_bytes, max(1024, limit // 2))
            # A record the daemon would refuse (or libzmq cut off) is never sent.
            self.stats.record_limit = min(RECORD_LIMIT, limit // 2)
        if self.transport is not None:
            self.transport.answered(self.fields_ok)

    def _enter_fallback(self, reason: str, probe_after: Optional[float] = None,
                        kind: str = notices.NO_DAEMON) -> None:
        self.liveness_deadline = None
        self.daemon_stopping = False
        entering = self.stats.state != STATE_FALLBACK
        if entering:
            self.stats.last_error = reason
            self.report_at = 0.0  # a daemon that refused us should know at once
        self.stats.state = STATE_FALLBACK
        self.probe_at = self.clock() + (probe_after if probe_after is not None else self.probe_interval)
        if entering and self.episode is None:
            self.episode = kind
            self.episode_written = self.stats.fallback_written
            self.episode_started = self.clock()
            self._notices.append((logging.WARNING, notices.fallback_message(kind, reason, self.path)))

    def _back_on_daemon(self) -> None:
        """The daemon acknowledged a batch after a warned fallback episode."""
        written = self.stats.fallback_written - self.episode_written
        self._notices.append((logging.WARNING, (
            f"clh-writerd: {self.path}: back on the daemon after {self.clock() - self.episode_started:.1f}s in "
            f"the fallback ({self.episode}); {written} records were written directly meanwhile "
            f"({self.stats.resent} resent in all: records the daemon may also have written)")))
        self.episode = None

    # -- reports -------------------------------------------------------------------
    def _report_doc(self, final: bool = False) -> Tuple[Any, ...]:
        stats = self.stats
        return (stats.report(), STATE_STOPPED if final else stats.state, stats.last_error)

    def _send_report(self, doc: Tuple[Any, ...], final: bool = False) -> Optional[int]:
        """Send a report; its id, or None when no daemon is connected."""
        if self.transport is None:
            return None
        # Connect first if nothing did yet (the fallback may have begun
        # before the first probe: a refused sync record).
        if self.transport.usable():
            return None
        self.report_id += 1
        counters, state, error = doc
        payload = protocol.encode_report(self.client_id, counters, id=self.report_id, state=state,
                                         file=self.path, error=error, final=final)
        return self.report_id if self.transport.send(payload) else None

    def _report(self, now: float) -> None:
        """Every report_interval (and at once after a transition): the
        counters, state and last error, in every state, when they changed
        since the last report a daemon answered. Nothing connected: the send
        fails at once and the next interval tries again."""
        self.report_at = now + self.s.report_interval
        doc = self._report_doc()
        if doc == self.reported or self.final_deadline is not None:  # the final report is the last one
            return
        if self._send_report(doc) is not None:
            self.report_pending = doc

    def _report_answered(self, id: int) -> None:
        if id == self.final_id:
            self.final_answered = True
        elif id == self.report_id and self.report_pending is not None:
            self.reported, self.report_pending = self.report_pending, None

    def final_report(self, now: float) -> bool:
        """Stopping, everything written: send the final report once, then
        True once the daemon answered it or the bounded wait is over (or no
        daemon is connected: nothing to wait for)."""
        if self.final_deadline is None:
            sent = self._send_report(self._report_doc(final=True), final=True)
            wait = FINAL_REPORT_WAIT
            if self.stop_deadline is not None:
                wait = max(0.0, min(wait, self.stop_deadline - now))
            self.final_deadline = now if sent is None else now + wait
            self.final_id = sent or 0
        if not self.final_answered:
            self._replies()
        return self.final_answered or now >= self.final_deadline
