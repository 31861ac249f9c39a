"""Unit tests of the sans-I/O sender core and Delivery: a fake clock, a fake
daemon behind the Transport interface, a fallback that records what it
writes. No process, no socket, no sleep: each test runs in milliseconds.

The fakes are in-process on purpose: they reach states (a daemon that
answers pings but never acks, a write that fails until a deadline) that a
real daemon shows only after seconds, and only sometimes.
"""

import logging
from collections import deque
from typing import Any, Deque, Iterator, List, Optional

import pytest

from clh_writerd import protocol
from clh_writerd.client._delivery import Delivery
from clh_writerd.client._options import THREAD, HandlerOptions
from clh_writerd.client._direct import FINAL_LOCK_WAIT, LOCK_WAIT
from clh_writerd.client._core import GIVE_UP_AFTER, RETRY_DELAY, Flush, SenderCore
from clh_writerd.client._items import ItemMaker
from clh_writerd.client._stats import ClientStats
from clh_writerd.client._transport import CONNECTED, DISCONNECTED, SyncRefused

PATH = "/var/log/app/unit.log"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDaemon:
    """The Transport interface, with a daemon behind it whose behaviour a
    test sets: 'ack' (write and ack), 'busy' (refuse as busy), 'silent'
    (accept and never ack, as a wedged writer does)."""

    def __init__(self, connected: bool = True, batches: str = "ack", pings: bool = True, renders: bool = False) -> None:
        self.connected = connected
        self.daemon_renders = renders  # what its pong says (protocol 2)
        self.renders: Optional[bool] = None  # what Delivery told the transport
        self.batches = batches
        self.pings = pings
        self.replies: Deque[bytes] = deque()
        self.pending_events: List[Any] = []
        self.written: List[str] = []
        self.seqs: List[int] = []
        self.reports: List[protocol.Report] = []
        self.closed = False

    def usable(self) -> str:
        return ""  # no endpoint to check: always trusted

    def send(self, payload: bytes) -> bool:
        if not self.connected:
            return False
        request = protocol.decode_request(payload)
        if isinstance(request, protocol.Ping):
            if self.pings:
                info = {"max_message_bytes": 1 << 20}
                if self.daemon_renders:
                    info["protocol"] = protocol.PROTOCOL_VERSION
                self.replies.append(protocol.encode_ok(request.id, info))
        elif isinstance(request, protocol.Batch):
            self.seqs.append(request.seq)
            if self.batches == "ack":
                self.written += request.records
                self.replies.append(protocol.encode_ack(request.seq))
            elif self.batches == "busy":
                self.replies.append(protocol.encode_error(protocol.E_BUSY, "busy", seq=request.seq))
            elif self.batches in protocol.ERROR_CODES:  # refused for good (forbidden path, conflict, ...)
                self.replies.append(protocol.encode_error(self.batches, "refused", seq=request.seq))
        elif isinstance(request, protocol.Report):
            self.reports.append(request)
            if self.pings:  # the daemon's main loop answers reports as it answers pings
                self.replies.append(protocol.encode_ok(request.id))
        return True

    def recv(self) -> Optional[bytes]:
        return self.replies.popleft() if self.replies else None

    def events(self) -> Iterator[Any]:
        events, self.pending_events = self.pending_events, []
        return iter(events)

    def answered(self, renders: bool) -> None:
        self.renders = renders

    def close(self) -> None:
        self.closed = True

    def go_away(self) -> None:
        self.connected = False
        self.replies.clear()
        self.pending_events.append(DISCONNECTED)

    def come_back(self) -> None:
        self.connected = True
        self.pending_events.append(CONNECTED)


class Driver:
    """What a handler does around the core, minus the waiting: the clock
    jumps to whatever is due next instead."""

    def __init__(self, transport: Optional[FakeDaemon], **options: Any) -> None:
        self.clock = Clock()
        self.stats = ClientStats()
        opts = HandlerOptions.build(THREAD, endpoint=None, **options)
        self.delivery = Delivery(opts, self.stats, PATH, {"maxBytes": 0}, protocol.new_client_id("unit"),
                                 transport, self.clock)
        formatter = logging.Handler()
        formatter.setFormatter(logging.Formatter("%(message)s"))
        self.items = ItemMaker(formatter)  # type: ignore[arg-type]
        self.render_errors: List[Any] = []
        self.core = SenderCore(self.delivery, self.items, self.stats, self.render_errors.append, self.clock,
                               monitor_interval=opts.monitor_interval)
        self.queue: Deque[Any] = deque()
        self.fallback: List[str] = []
        self.fallback_fails = False
        self.fallback_error: BaseException = OSError(28, "No space left on device")

    def log(self, *messages: str) -> None:
        for message in messages:
            self.queue.append(self.items.prepare(logging.makeLogRecord({"msg": message})))

    def flush_marker(self) -> List[bool]:
        released: List[bool] = []
        self.queue.append(Flush(lambda: released.append(True)))
        return released

    def turn(self) -> None:
        self.core.collect(self.queue)
        lines = self.core.step()
        if lines:
            ok = not self.fallback_fails
            if ok:
                self.fallback += lines
                self.stats.fallback_written += len(lines)  # as _direct.Fallback counts them
            self.core.written(lines, ok, None if ok else self.fallback_error)
        for flush in self.core.settled():
            flush.release()

    def run(self, until: Any, seconds: float, max_turns: int = 10000) -> None:
        """Turn, then jump the clock to the next due time, until ``until()``."""
        end = self.clock.now + seconds
        for _ in range(max_turns):
            self.turn()
            if until():
                return
            if self.clock.now >= end:
                break
            self.clock.now = min(end, self.clock.now + max(self.core.wait_time(), 0.001))
        raise AssertionError(f"not reached within {seconds}s of fake time: {self.stats}")


def records(n: int, prefix: str = "r") -> List[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_acked_batches_reach_the_daemon_once_and_nothing_goes_to_the_fallback():
    daemon = FakeDaemon()
    d = Driver(daemon, batch_size=10)
    d.log(*records(95))
    d.run(lambda: d.core.drained() and d.stats.acked == 95, seconds=2)
    assert daemon.written == records(95)
    assert d.fallback == []
    assert d.stats.state == "daemon" and d.stats.sent == 95


def test_no_daemon_within_connect_timeout_means_the_fallback_writes_everything():
    d = Driver(FakeDaemon(connected=False), connect_timeout=0.5)
    d.log(*records(20))
    d.run(lambda: d.core.drained(), seconds=2)
    assert d.fallback == records(20)
    assert d.stats.state == "fallback"
    assert d.clock.now - 1000.0 >= 0.5  # it waited for connect_timeout, no longer than it had to
    assert d.clock.now - 1000.0 < 0.7


def test_embedded_mode_writes_every_line_directly_in_order():
    d = Driver(None)
    d.log(*records(50))
    d.run(lambda: d.core.drained(), seconds=1)
    assert d.fallback == records(50)


def test_busy_batches_are_sent_again_in_order_and_counted_as_busy_not_resent():
    daemon = FakeDaemon(batches="busy")
    d = Driver(daemon, batch_size=5, window=2)
    d.log(*records(20))
    d.run(lambda: d.stats.busy >= 3, seconds=2)
    daemon.batches = "ack"
    d.run(lambda: d.core.drained(), seconds=5)
    assert daemon.written == records(20)  # busy refusals wrote nothing: no duplicate
    assert d.fallback == [] and d.stats.resent == 0


def test_daemon_gone_replays_unacked_lines_through_the_fallback_then_it_is_used_again():
    daemon = FakeDaemon(batches="silent")
    d = Driver(daemon, batch_size=5, ack_timeout=60)
    d.log(*records(10))
    d.run(lambda: len(daemon.seqs) == 2, seconds=1)
    daemon.go_away()
    d.run(lambda: d.core.drained(), seconds=1)
    assert d.fallback == records(10) and d.stats.resent == 10
    daemon.batches = "ack"
    daemon.come_back()
    d.run(lambda: d.stats.state == "daemon", seconds=10)
    d.log(*records(3, "later"))
    d.run(lambda: d.core.drained(), seconds=1)
    assert daemon.written == records(3, "later")


def test_daemon_that_answers_pings_but_never_acks_is_waited_for_while_it_answers():
    daemon = FakeDaemon(batches="silent")
    d = Driver(daemon, ack_timeout=1.0)
    d.log(*records(5))
    d.run(lambda: bool(daemon.seqs), seconds=1)
    start = d.clock.now
    with pytest.raises(AssertionError):
        d.run(lambda: bool(d.fallback), seconds=10)  # alive (pings answered): no duplicates
    assert d.clock.now - start >= 10 and d.stats.state == "daemon"
    daemon.pings = False
    d.run(lambda: d.core.drained(), seconds=5)  # neither acks nor pings: the fallback takes over
    assert d.fallback == records(5) and d.stats.resent == 5


def test_stop_while_a_flush_is_pending_writes_every_unacked_record_by_the_deadline():
    """The regression: a flush() timed out against a daemon that answers
    pings but never acks, then close(). The stop deadline must hold whatever
    else is pending: every unacknowledged record goes to the fallback."""
    daemon = FakeDaemon(batches="silent")
    d = Driver(daemon, batch_size=10, ack_timeout=5.0)
    d.log(*records(50))
    flushed = d.flush_marker()
    d.log(*records(5, "after-flush"))  # queued behind the flush: must be written too
    with pytest.raises(AssertionError):
        d.run(lambda: bool(flushed), seconds=5)  # flush() gives up after drain_timeout
    assert d.stats.sent == 50 and d.stats.acked == 0
    d.core.request_stop(5.0)
    deadline = d.clock.now + 5.0
    d.run(lambda: d.core.finished(d.queue), seconds=6)
    assert d.clock.now <= deadline + 0.01
    assert d.fallback == records(50) + records(5, "after-flush")
    assert d.stats.resent == 55 and flushed == [True]


def test_stop_drains_to_an_acking_daemon_without_the_fallback():
    daemon = FakeDaemon()
    d = Driver(daemon, batch_size=10)
    d.log(*records(30))
    d.core.request_stop(5.0)
    d.run(lambda: d.core.finished(d.queue), seconds=1)
    assert daemon.written == records(30) and d.fallback == []


def test_oversize_record_goes_to_the_fallback_after_the_lines_before_it():
    daemon = FakeDaemon(batches="silent")  # keep earlier lines unacked and unsent
    d = Driver(daemon, linger=10.0, batch_size=100)
    d.run(lambda: d.stats.state == "daemon", seconds=1)
    big = "x" * (d.stats.record_limit + 1)
    d.log("a", "b", big, "c")
    d.turn()
    assert d.fallback == ["a", "b", big]
    assert d.stats.oversize == 1


def test_a_line_that_is_not_utf8_goes_to_the_fallback_after_the_lines_before_it():
    daemon = FakeDaemon(batches="silent")
    d = Driver(daemon, linger=10.0, batch_size=100)
    d.run(lambda: d.stats.state == "daemon", seconds=1)
    bad = "caf\udce9.txt"  # os.fsdecode() of undecodable bytes: msgpack refuses it
    d.log("a", "b", bad, "c")
    d.turn()
    assert d.fallback == ["a", "b", bad]
    assert d.stats.unencodable == 1 and d.stats.oversize == 0


def test_a_failed_fallback_write_is_retried_and_given_up_only_at_the_stop_deadline():
    d = Driver(None)
    d.fallback_fails = True
    d.log(*records(3))
    d.turn()
    assert d.core.pending == records(3) and not d.core.accepting  # the queue fills up meanwhile
    assert d.core.wait_time() == pytest.approx(RETRY_DELAY)
    d.clock.now += RETRY_DELAY
    d.fallback_fails = False
    d.turn()
    assert d.fallback == records(3)
    d.fallback_fails = True
    d.log("doomed")
    d.core.request_stop(1.0)
    d.run(lambda: d.core.finished(d.queue), seconds=2)
    assert d.stats.lost == 1 and "No space" in d.stats.loss_cause


def test_a_fallback_write_waits_for_the_lock_within_bounds_and_still_at_the_stop_deadline():
    """LOCK_WAIT while running; a stop cuts it to FINAL_LOCK_WAIT past the
    drain's deadline, never to nothing: at the deadline the daemon may be
    mid-write, and a write with no time to wait for its lock loses the
    unacknowledged records it was meant to save (seen under load in CI)."""
    d = Driver(None)
    running = d.core.lock_wait()
    assert running() == pytest.approx(LOCK_WAIT)
    d.core.request_stop(2.0)
    assert running() == pytest.approx(2.0 + FINAL_LOCK_WAIT)  # read again while it waits
    d.clock.now += 2.0  # the deadline: the write that saves the window starts now
    assert d.core.lock_wait()() == pytest.approx(FINAL_LOCK_WAIT)
    d.clock.now += FINAL_LOCK_WAIT
    assert d.core.lock_wait()() <= 0.0


def test_a_write_failing_for_good_is_lost_at_once_counted_and_announced(capsys):
    """A permission or a missing directory will not pass: no retry until
    exit (exit stalled for drain_timeout), the records are lost now, counted,
    and said on stderr with the error's traceback and what to do."""
    d = Driver(None)
    d.fallback_fails = True
    d.fallback_error = PermissionError(13, "Permission denied", "/var/log/app/unit.log")
    d.log(*records(3))
    d.turn()
    assert d.stats.lost == 3 and not d.core.pending and d.core.accepting
    err = capsys.readouterr().err
    assert "3 records could not be written" in err and "PermissionError" in err
    assert "let this process's user write /var/log/app" in err
    d.log(*records(2))
    d.turn()
    assert d.stats.lost == 5
    assert "could not be written" not in capsys.readouterr().err  # the next notice comes later, with the count since


def test_a_write_failing_for_a_while_is_retried_then_given_up():
    """A full disk may pass: retried every RETRY_DELAY, then lost after
    GIVE_UP_AFTER (the queue behind would otherwise stay full for good)."""
    d = Driver(None)
    d.fallback_fails = True
    d.log(*records(2))
    d.turn()
    assert d.core.pending == records(2) and d.stats.lost == 0
    d.run(lambda: d.stats.lost == 2, seconds=GIVE_UP_AFTER + 1)
    assert d.clock.now - 1000.0 >= GIVE_UP_AFTER and not d.core.pending


def test_drop_warnings_go_ahead_of_queued_records_and_before_a_flush_settles():
    d = Driver(None)
    d.log("queued")
    flushed = d.flush_marker()
    d.core.warn("warning")
    d.turn()
    assert d.fallback == ["warning", "queued"] and flushed == [True]


def test_render_errors_are_reported_and_do_not_stop_the_sender():
    class Picky(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            if record.getMessage() == "bad":
                raise ValueError("cannot format")
            return super().format(record)

    d = Driver(None)
    d.items.handler.setFormatter(Picky("%(message)s"))  # type: ignore[attr-defined]
    d.log("bad", "good")
    d.run(lambda: d.core.drained() and not d.queue, seconds=1)
    assert len(d.render_errors) == 1 and d.fallback == ["good"]


def test_salvage_returns_everything_in_order_and_releases_every_flush():
    daemon = FakeDaemon(batches="silent")
    d = Driver(daemon, batch_size=2, window=1)
    d.log(*records(6))
    flushed = d.flush_marker()
    d.run(lambda: bool(daemon.seqs), seconds=1)
    lines = d.core.salvage(d.queue)
    assert lines == records(6) and flushed == [True]
    assert not d.queue and d.core.drained()


def test_collect_stops_at_a_flush_and_at_the_window_bound():
    daemon = FakeDaemon(batches="silent")
    d = Driver(daemon, batch_size=2, window=2, linger=10.0)
    d.run(lambda: d.stats.state == "daemon", seconds=1)
    d.log("a", "b")
    d.flush_marker()
    d.log("c")
    assert d.core.collect(d.queue) == 3  # a, b and the marker; c waits behind the flush
    assert len(d.queue) == 1 and not d.core.accepting
    d2 = Driver(FakeDaemon(batches="silent"), batch_size=2, window=2, linger=10.0)
    d2.log(*records(10))
    assert d2.core.collect(d2.queue) == 4 and len(d2.queue) == 6  # batch_size * window lines at most


# -- reports and warnings (issue 15) ------------------------------------------------------
def notices(d: Driver) -> List[str]:
    return [message for _, message in d.logged]


def monitored(options: Any = None, **kwargs: Any) -> Driver:
    """A Driver whose core's notices are captured instead of logged."""
    d = Driver(**kwargs) if options is None else Driver(options, **kwargs)
    d.logged = []
    d.core.log_notices = lambda: d.logged.extend(d.delivery.take_notices())  # type: ignore[assignment]
    return d




def test_a_refused_path_warns_once_and_reports_in_fallback_until_the_final_report():
    daemon = FakeDaemon(batches=protocol.E_FORBIDDEN_PATH)
    d = monitored(daemon, report_interval=1.0)
    d.log(*records(10))
    d.run(lambda: d.core.drained() and d.stats.state == "fallback", seconds=2)
    # Probes keep succeeding (pings are answered) and batches keep being refused:
    # the episode is one warning, not one per probe.
    for round in range(3):
        d.run(lambda: d.stats.state == "daemon", seconds=120)
        d.log(*records(5, f"later{round}"))
        d.run(lambda: d.core.drained() and d.stats.state == "fallback", seconds=5)
    assert len(notices(d)) == 1 and "forbidden path" in notices(d)[0] and "allowed_dirs" in notices(d)[0]
    # Reports travel in the fallback state, carrying the file and the error.
    d.run(lambda: daemon.reports[-1].counters["fallback"] == 25, seconds=2)
    in_fallback = [r for r in daemon.reports if r.state == "fallback"]
    assert in_fallback and in_fallback[-1].file == PATH and "forbidden_path" in in_fallback[-1].error
    assert in_fallback[-1].counters["fallback"] == d.stats.fallback_written
    d.core.request_stop(5.0)
    d.run(lambda: d.core.finished(d.queue), seconds=6)
    final = daemon.reports[-1]
    assert final.final and final.state == "stopped" and final.counters["fallback"] == 25


def test_back_on_the_daemon_is_warned_at_the_first_ack_with_the_direct_writes():
    daemon = FakeDaemon(batches="silent")
    d = monitored(daemon, batch_size=5, ack_timeout=60)
    d.log(*records(10))
    d.run(lambda: len(daemon.seqs) == 2, seconds=1)
    daemon.go_away()
    d.run(lambda: d.core.drained(), seconds=1)
    daemon.batches = "ack"
    daemon.come_back()
    d.run(lambda: d.stats.state == "daemon", seconds=10)
    assert len(notices(d)) == 1  # answering a ping is not yet being back
    d.log(*records(3, "later"))
    d.run(lambda: d.core.drained(), seconds=1)
    fallback, back = notices(d)
    assert "no daemon" in fallback and "daemon disconnected" in fallback
    assert "back on the daemon" in back and "10 records were written directly" in back


def test_unchanged_counters_are_reported_once_and_again_to_a_daemon_met_again():
    daemon = FakeDaemon()
    d = monitored(daemon, report_interval=1.0)
    d.log(*records(5))
    d.run(lambda: len(daemon.reports) >= 1 and d.core.drained(), seconds=3)
    d.run(lambda: False if d.clock.now < 1010 else True, seconds=20)
    settled = len(daemon.reports)
    assert settled <= 3  # nothing changed: no report every interval
    daemon.go_away()
    d.run(lambda: d.stats.state == "fallback", seconds=3)
    daemon.come_back()
    d.run(lambda: len(daemon.reports) > settled and daemon.reports[-1].state == "daemon", seconds=10)
    assert daemon.reports[-1].counters["acked"] == 5  # a restarted daemon learns the totals


def test_the_final_report_waits_for_no_daemon_and_at_most_until_the_deadline():
    d = monitored(FakeDaemon(connected=False), connect_timeout=0.5)
    d.log(*records(3))
    d.core.request_stop(5.0)
    d.run(lambda: d.core.finished(d.queue), seconds=2)
    assert d.clock.now - 1000.0 < 1.0  # nothing connected: no wait at all
    mute = FakeDaemon(pings=False)  # connected, never answers anything
    d = monitored(mute)
    d.core.request_stop(0.3)
    d.run(lambda: d.core.finished(d.queue), seconds=2)
    assert [r.final for r in mute.reports] == [True]  # the last word, and only once
    assert d.clock.now <= 1000.3 + 1e-6
    assert notices(d) == []  # nothing was pending at the deadline: no transition to warn about


def test_drops_are_warned_at_the_first_and_every_thousandth():
    from clh_writerd.client._notices import drop_message

    message = drop_message(PATH, 1, "fallback_on_full=False", "thread")
    assert "1 records dropped" in message and "fallback_on_full=True" in message
    assert "max_nowait" in drop_message(PATH, 1000, "fallback_mode='nowait'", "async")


@pytest.mark.parametrize("renders", [False, True])
def test_the_transport_is_told_whether_the_daemon_answering_renders_field_values(renders):
    """The sync lane sends field values only to a daemon that said it renders
    them (its pong's protocol); to any other it sends the line."""
    daemon = FakeDaemon(renders=renders)
    d = Driver(daemon)
    d.log(*records(3))
    d.run(lambda: d.core.drained() and d.stats.acked == 3, seconds=2)
    assert daemon.renders is renders


def test_a_refused_sync_record_sends_the_file_to_the_fallback_only_when_the_refusal_is_about_the_file():
    """Sync refusals reach Delivery as transport events, on the driver's
    thread: one about a record (too large) changes nothing; one about the
    file (forbidden path) sends its batches to the fallback with one warning."""
    daemon = FakeDaemon()
    d = monitored(daemon)
    d.log(*records(5))
    d.run(lambda: d.core.drained() and d.stats.acked == 5, seconds=2)
    daemon.pending_events.append(SyncRefused(protocol.E_TOO_LARGE, "record too large"))
    d.log(*records(5, "after-too-large"))
    d.run(lambda: d.core.drained() and d.stats.acked == 10, seconds=2)
    assert d.stats.state == "daemon" and not d.fallback and not notices(d)
    daemon.pending_events += [SyncRefused(protocol.E_FORBIDDEN_PATH, "outside allowed_dirs")] * 2
    d.log(*records(5, "after-forbidden"))
    d.run(lambda: d.core.drained() and len(d.fallback) == 5, seconds=2)
    assert d.stats.state == "fallback" and d.stats.acked == 10
    assert len(notices(d)) == 1 and "forbidden" in notices(d)[0]
