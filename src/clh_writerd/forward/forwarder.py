"""Forward the daemon's files to a central RELP server, at least once.

Pipeline stages, one method each: ``scan`` (find the segments of every
forwarded file, oldest first) -> ``read`` (whole lines from the oldest
unfinished segment) -> ``send`` (RELP ``syslog`` frames, at most ``window``
unacknowledged) -> ``ack`` (advance each segment's offset over the contiguous
acknowledged prefix only) -> ``commit`` (write the checkpoint atomically).

The local files stay the source of truth. A lost connection drops everything
in flight and re-reads from the checkpoint on the next session, so a record is
sent again rather than lost; the central side can de-duplicate on the MSGID
(``<segment id>.<byte offset>``), which is stable across restarts, renames
and compression.

Neighbours: segments.py (finding and reading segments), hold.py (the disk
budget), checkpoint.py (progress), relp.py (the wire), status.py (stats and
metrics), rsyslog.py (the central's configuration).
"""

import glob
import gzip
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import MISSING, dataclass, fields
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Set, Tuple

from .checkpoint import Checkpoint, SegmentState, fingerprint
from .hold import Hold
from .relp import RelpClient, RelpError, RelpProtocolError
from .segments import Candidate, SegmentReader, family, is_regular

log = logging.getLogger("clh_writerd.forward")

# syslog PRI of every forwarded line: facility local0, severity info.
PRI = 16 * 8 + 6


@dataclass(frozen=True)
class ForwardOptions:
    """What the ``[forward]`` section configures: one field per key, same
    name, no default here (the defaults are the config table's,
    daemon/options.py ``OPTIONS``; a test checks the two name the same keys);
    then the tuning the config file does not expose."""

    target: str
    paths: Tuple[str, ...]
    state_file: str
    hostname: str
    window: int
    checkpoint_interval: float
    timeout: float
    hold_max_bytes: int
    hold_dir: str  # "" = "<state_file>.hold"
    tls: bool
    tls_ca_file: str
    tls_cert_file: str
    tls_key_file: str
    reconnect_interval: float = 1.0
    scan_interval: float = 0.5
    retention_grace: float = 5.0
    max_line_bytes: int = 8000

    def address(self) -> Tuple[str, int]:
        """(host, port) of ``target`` ("HOST:PORT", "[v6]:PORT", optional relp:// prefix)."""
        target = self.target[len("relp://"):] if self.target.startswith("relp://") else self.target
        host, _, port = target.rpartition(":")
        return host.strip("[]"), int(port)

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file or None)
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file or None)
        return context


# The fields the [forward] section sets (config attribute "forward_<name>").
CONFIGURED = tuple(f.name for f in fields(ForwardOptions) if f.default is MISSING)


def options_from_config(config: Any, **tuning: Any) -> ForwardOptions:
    """The forwarder's options from the daemon's Config ([forward] section), plus any ``tuning``."""
    return ForwardOptions(**{name: getattr(config, "forward_" + name) for name in CONFIGURED}, **tuning)


class Source:
    """One forwarded file and its rotated segments."""

    def __init__(self, base: str, forwarder: "Forwarder") -> None:
        self.base = base
        self.app = "".join(c if 33 <= ord(c) < 127 else "_" for c in os.path.basename(base))[:48] or "-"
        self.fw = forwarder
        self.order: List[Tuple[SegmentState, Candidate]] = []
        self.reader: Optional[SegmentReader] = None
        self.read_through: Set[str] = set()  # keys read to their end in this session
        self.waiting = False
        self.held_only: Set[str] = set()  # segments readable only through the hold (last scan)
        self.caught_up_at = time.time()

    def scan(self, now: float) -> None:
        """Match the family's files to checkpoint states, hold them, check continuity, count what was lost."""
        cp = self.fw.checkpoint
        mine = {k: s for k, s in cp.segments.items() if s.source == self.base}
        lengths = sorted({s.fp_len for s in mine.values()}, reverse=True)
        listing = family(self.base)
        for _ in range(2):
            if listing.clean:
                break
            # A rotation ran during the listing (it takes milliseconds): list again, so that
            # continuity is decided now rather than after records of a new segment were sent.
            listing = family(self.base)
        named: Dict[str, Tuple[SegmentState, Candidate]] = {}
        for cand in listing.candidates:
            state = None
            for length in lengths:
                if len(cand.head) >= length:
                    state = mine.get(fingerprint(cand.head[:length]))
                    if state is not None:
                        break
            if state is None:
                key = fingerprint(cand.head)
                state = cp.segments[key] = mine[key] = SegmentState(key, self.base, cand.name,
                                                                     seen_seq=self.fw.next_seen_seq(), linked=False)
                lengths = sorted(set(lengths) | {state.fp_len}, reverse=True)
                self.fw.save_soon = True
            if state.key in named and not named[state.key][1].gz:
                continue
            state.name, state.missing_since = cand.name, None
            # Only the live file still grows; a rotated or compressed segment has its final size.
            state.size_seen, state.final = cand.size, cand.rank[0] != 2
            if not cand.gz:
                state.dev, state.ino = cand.dev, cand.ino
            if not state.done:
                # Held from the first sight, live file and a .rotate.* being compressed
                # included: a segment may be rotated, compressed and deleted between two scans.
                self.fw.hold.keep(state, cand)
            named[state.key] = (state, cand)
        self.link(listing.clean, named, mine)
        seen = dict(named)
        held_only: Set[str] = set()
        self.waiting = False
        current = self.reader.state.key if self.reader else None
        for key, state in mine.items():
            if key in named:
                continue
            if state.done and key != current:
                # Forgotten only once it stayed unnamed for the grace: while CLH compresses
                # it, a segment has no name the family lists (only .rotate.*.gz), and a
                # segment forgotten then would be found again as new and sent again whole.
                self.fw.hold.release(state)
                state.missing_since = state.missing_since or now
                if now - state.missing_since >= self.fw.options.retention_grace:
                    self.fw.forget_segment(key)
                continue
            if state.held and os.path.exists(state.held):
                # Retention deleted its names; the hold keeps it until it is forwarded.
                if not state.final:
                    state.size_seen, state.final = self.fw.hold.size(state), True
                held_only.add(key)
                if key != current and not state.done:
                    seen[key] = (state, self.fw.hold.candidate(state))
                continue
            if key == current:
                continue  # renamed under the reader, which still has it open
            state.missing_since = state.missing_since or now
            if now - state.missing_since < self.fw.options.retention_grace:
                self.waiting = True  # renamed or being compressed; don't skip ahead of it
                continue
            self.fw.count_lost(self, state)
            self.fw.forget_segment(key)
        self.held_only = held_only  # replaced whole: snapshot() reads it from another thread
        self.order = sorted(seen.values(), key=lambda sc: sc[1].rank)
        if self.lag() == 0:
            self.caught_up_at = time.time()

    def link(self, clean: bool, named: Dict[str, Tuple[SegmentState, Candidate]],
             mine: Dict[str, SegmentState]) -> None:
        """Check that segments first seen in this scan follow the ones seen before without a hole.

        A family is contiguous: if any of its named segments was already
        linked, every newer one follows it. If none is, every segment seen
        before was rotated away, and the ones written between the newest of
        them and the oldest named one may have been deleted unseen (the
        forwarder was down, or fewer than ``backupCount`` rotations apart
        between two scans): a gap, counted and warned with its range.
        """
        states = [sc[0] for sc in sorted(named.values(), key=lambda sc: sc[1].rank)]
        if all(s.linked for s in states):
            return
        if not any(s.linked for s in states):
            if not clean:
                return  # a rotation during the scan mixed names: decide on a clean listing
            before = [s for s in mine.values() if s.linked]
            if before:
                self.fw.count_gap(self, max(before, key=lambda s: s.seen_seq), states[0])
        for state in states:
            state.linked = True
        self.fw.mark_dirty()

    def forget(self, state: SegmentState) -> None:
        """A segment that can no longer be read (past the hold budget): count it as lost."""
        self.fw.count_lost(self, state)
        self.fw.forget_segment(state.key)
        self.order = [(s, c) for s, c in self.order if s.key != state.key]
        self.held_only = self.held_only - {state.key}

    def read(self, limit: int) -> List[Tuple[SegmentState, int, int, bytes]]:
        """The next lines to send, oldest segment first."""
        out: List[Tuple[SegmentState, int, int, bytes]] = []
        while len(out) < limit:
            if self.reader is None and not self._open_next():
                break
            reader = self.reader
            assert reader is not None
            lines = reader.read(limit - len(out))
            out += [(reader.state, s, e, line) for s, e, line in lines]
            if lines:
                continue
            if reader.is_live(self.base):
                break
            # Renamed away (or compressed): whatever was written before the
            # rename is there now; read it to the end, then move on.
            lines = reader.read(limit - len(out))
            if lines:
                out += [(reader.state, s, e, line) for s, e, line in lines]
                continue
            tail = reader.read_tail()
            if tail is not None:
                out.append((reader.state, *tail))
            self.fw.segment_read(reader.state, reader.pos)
            self.read_through.add(reader.state.key)
            self._close_reader()
        return out

    def _open_next(self) -> bool:
        if self.waiting:
            return False
        for state, cand in self.order:
            if state.done or state.key in self.read_through:
                continue
            try:
                self.reader = SegmentReader(state, cand.name, cand.gz, self.fw.options.max_line_bytes)
            except (OSError, EOFError, gzip.BadGzipFile):
                self.fw.rescan = True  # renamed under us: the next scan finds it
                return False
            return True
        return False

    def lag(self) -> int:
        """Bytes not yet acknowledged, over every segment of this file the forwarder knows.

        Sizes are uncompressed (a ``.gz``'s and a held file's included), as of
        the last scan; a segment being read or missing (renamed, within the
        grace) still counts until it is acknowledged or counted as lost.
        """
        return sum(s.unacked for s in list(self.fw.checkpoint.segments.values()) if s.source == self.base)

    def reset(self) -> None:
        """Forget everything read in this session: re-read from the checkpoint."""
        self._close_reader()
        self.read_through.clear()

    def _close_reader(self) -> None:
        if self.reader is not None:
            self.fw.split_lines += self.reader.split_lines
            self.reader.close()
            self.reader = None


class InFlight(NamedTuple):
    txnr: int
    state: SegmentState
    end: int


class Forwarder:
    """The forwarding thread: files -> RELP -> checkpoint."""

    def __init__(self, options: ForwardOptions) -> None:
        self.options = options
        self.hostname = (options.hostname or socket.gethostname()).encode("ascii", "replace")
        self.checkpoint = Checkpoint(options.state_file)
        self.hold_seq = max((s.held_seq for s in self.checkpoint.segments.values()), default=0)
        self.seen_seq = max((s.seen_seq for s in self.checkpoint.segments.values()), default=0)
        self.hold = Hold(options.hold_dir or options.state_file + ".hold", options.hold_max_bytes, self)
        self.hold.sweep()
        self.sources: Dict[str, Source] = {}
        self.client: Optional[RelpClient] = None
        self.in_flight: Deque[InFlight] = deque()
        self._acked_early: Set[int] = set()
        self._sent_high: Dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._dirty = False
        self.rescan = False
        self.save_soon = False
        self.scans = 0  # scans done (tests wait on it)
        self._last_save = 0.0
        self._last_progress = 0.0
        self.lock = threading.Lock()  # guards the counters read by snapshot()
        self.sent = self.acked = self.resent = self.reconnects = self.split_lines = 0
        self.lost_segments = self.lost_bytes = self.gaps = self.protocol_errors = 0
        self.connected_since: Optional[float] = None
        self.last_error = ""

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Run the forwarding loop in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("forwarder already started")
        self._thread = threading.Thread(target=self.run, name="clh-forwarder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the session politely, save the checkpoint; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """The loop: scan, read, send, ack, commit, until stop()."""
        next_scan = next_connect = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_scan or self.rescan:
                    self.rescan = False
                    self.scan()
                    next_scan = now + self.options.scan_interval
                if self.client is None:
                    if now < next_connect or not self.connect():
                        if now >= next_connect:
                            next_connect = now + self.options.reconnect_interval
                        self.commit(force=False)
                        self._stop.wait(0.1)
                        continue
                try:
                    assert self.client is not None
                    sent = self.send(self.read())
                    full = len(self.in_flight) >= self.options.window
                    self.ack(self.client.read_acks(0.5 if full else (0.0 if sent else 0.1)))
                    if self.in_flight and time.monotonic() - self._last_progress > self.options.timeout:
                        raise RelpError(f"no acknowledgement for {self.options.timeout:.1f}s")
                except RelpError as exc:
                    self.disconnect(exc)
                    next_connect = time.monotonic() + self.options.reconnect_interval
                self.commit(force=False)
        except Exception:  # pragma: no cover - a bug must not kill the daemon silently
            log.exception("forwarder stopped by an unexpected error")
            self.last_error = "crashed; see the daemon log"
        finally:
            if self.client is not None:
                # Acks that arrive while closing still move the checkpoint.
                self.ack(self.client.close())
                self.client = None
            for source in self.sources.values():
                source.reset()
            self.commit(force=True)

    # -- stages ----------------------------------------------------------------
    def scan(self) -> None:
        """Find forwarded files (glob patterns) and their segments."""
        matches: Set[str] = set()
        for pattern in self.options.paths:
            matches.update(os.path.abspath(p) for p in glob.glob(pattern) if is_regular(p))
        # Rotated names (app.log.1.gz) of a matched file are its segments, not files.
        bases = {m for m in matches if not any(m.startswith(o + ".") for o in matches if o != m)}
        for base in bases - set(self.sources):
            self.sources[base] = Source(base, self)
        now = time.time()
        for source in self.sources.values():
            source.scan(now)
        self.hold.enforce({s.reader.state.key for s in self.sources.values() if s.reader is not None},
                          {k for s in self.sources.values() for k in s.held_only})
        if self.save_soon:
            # A new segment is in the checkpoint (and its hold link kept) before any
            # of its records is sent: a crash from now on cannot forget it.
            self.save_soon = False
            self._dirty = True
            self.commit(force=True)
        self.scans += 1

    def connect(self) -> bool:
        host, port = self.options.address()
        client = RelpClient(host, port, self.options.timeout, self.options.ssl_context())
        try:
            client.open()
        except RelpError as exc:
            if isinstance(exc, RelpProtocolError):
                self.protocol_errors += 1
            if self.last_error != str(exc):
                log.warning("forward: %s", exc)
            self.last_error = str(exc)
            return False
        self.client = client
        self.last_error = ""  # what went wrong before is no longer the central's state
        self.connected_since = time.time()
        self._last_progress = time.monotonic()
        log.info("forward: connected to %s:%d", host, port)
        return True

    def read(self) -> List[Tuple[SegmentState, int, int, bytes]]:
        """Lines to fill the window, taken round-robin from the files."""
        room = self.options.window - len(self.in_flight)
        out: List[Tuple[SegmentState, int, int, bytes]] = []
        sources = list(self.sources.values())
        if room <= 0 or not sources:
            return out
        share = max(room // len(sources), 1)
        for source in sources:
            out += source.read(min(share, room - len(out)))
            if len(out) >= room:
                break
        return out

    def send(self, lines: List[Tuple[SegmentState, int, int, bytes]]) -> int:
        """One RELP syslog frame per line; MSGID = segment id + byte offset (stable)."""
        assert self.client is not None
        if not lines:
            return 0
        if not self.in_flight:
            self._last_progress = time.monotonic()  # the ack clock starts with the first frame in flight
        messages = []
        for state, start, _end, line in lines:
            app = self.sources[state.source].app.encode()
            msgid = b"%s.%d" % (state.short_id.encode(), start)
            messages.append(b"<%d>1 - %s %s - %s - %s" % (PRI, self.hostname, app, msgid, line))
        txnrs = self.client.send_many(messages)
        for (state, start, end, _), txnr in zip(lines, txnrs):
            self.in_flight.append(InFlight(txnr, state, end))
            high = self._sent_high.get(state.key, 0)
            if start < high:
                self.resent += 1
            else:
                self._sent_high[state.key] = end
        self.sent += len(lines)
        return len(lines)

    def ack(self, txnrs: List[int]) -> None:
        """Advance offsets over the contiguous acknowledged prefix only."""
        if not txnrs:
            return
        self._last_progress = time.monotonic()
        self._acked_early.update(txnrs)
        while self.in_flight and self.in_flight[0].txnr in self._acked_early:
            entry = self.in_flight.popleft()
            self._acked_early.discard(entry.txnr)
            state = entry.state
            if entry.end > state.offset:
                state.offset = entry.end
            if state.end is not None and state.offset >= state.end and not state.done:
                state.done = True
                self.hold.release(state)
            self.acked += 1
            self._dirty = True

    def commit(self, force: bool) -> None:
        """Write the checkpoint if offsets moved (at most every checkpoint_interval)."""
        now = time.monotonic()
        if self._dirty and (force or now - self._last_save >= self.options.checkpoint_interval):
            self._dirty = False
            self._last_save = now
            try:
                self.checkpoint.save()
            except OSError as exc:
                self._dirty = True
                log.error("forward: cannot write checkpoint %s: %s", self.checkpoint.path, exc)
            else:
                self.hold.saved()

    # -- events from sources -----------------------------------------------------
    def segment_read(self, state: SegmentState, end: int) -> None:
        """A rotated segment was read to its end: it is done once acked up to ``end``."""
        state.end = end
        state.size_seen, state.final = end, True
        if state.offset >= end:
            state.done = True
            self.hold.release(state)
        self._dirty = True

    def forget_segment(self, key: str) -> None:
        """A segment left the family (forwarded and deleted, or lost): drop its state."""
        self.checkpoint.segments.pop(key, None)
        self._sent_high.pop(key, None)
        self._dirty = True

    def mark_dirty(self) -> None:
        """The checkpoint changed outside the ack path (a new hold, a link)."""
        self._dirty = True

    def next_seen_seq(self) -> int:
        """Order number of a segment seen for the first time."""
        self.seen_seq += 1
        return self.seen_seq

    def held_only_keys(self) -> Set[str]:
        """Segments that only the hold keeps (no name left in their family), as of the last scan."""
        return set().union(*[source.held_only for source in list(self.sources.values())])

    def count_lost(self, source: Source, state: SegmentState) -> None:
        """A segment the forwarder knew is gone before it was acknowledged: count and warn, never silent.

        The bytes are exact when the segment's final size is known (it was
        seen rotated or compressed, read to its end, or held); a live file
        that was rotated, compressed and deleted between two scans without a
        hold is counted with the size last seen, and the warning says "at least".
        """
        lost = state.unacked
        self.lost_segments += 1
        self.lost_bytes += lost
        self._dirty = True
        log.warning("forward: %s: segment %s (%s) was deleted before it was forwarded: %s%d byte(s) lost "
                    "(bytes %d-%d of the segment)", source.base, state.short_id, state.name,
                    "" if state.final else "at least ", lost, state.offset, state.offset + lost)

    def count_gap(self, source: Source, before: SegmentState, after: SegmentState) -> None:
        """Segments were rotated away before the forwarder ever saw them: count the gap and name its range."""
        self.gaps += 1
        self._dirty = True
        log.warning("forward: %s: the segment(s) written after segment %s (last seen as %s) and before segment "
                    "%s (now %s) were rotated away before the forwarder saw them (it was stopped, or more "
                    "than backupCount rotations happened between two scans); their records are not at the "
                    "central and how many there were is unknown: make backupCount cover the longest outage "
                    "(docs/forwarding.md, sizing)", source.base, before.short_id, before.name, after.short_id,
                    after.name)

    def disconnect(self, error: RelpError) -> None:
        """Drop the session and everything in flight; the next session re-reads from the checkpoint."""
        why = str(error)
        if isinstance(error, RelpProtocolError):
            self.protocol_errors += 1
        log.warning("forward: connection lost (%s); %d record(s) in flight will be sent again",
                    why, len(self.in_flight))
        self.last_error = why
        if self.client is not None:
            self.client.abort()
            self.client = None
        self.connected_since = None
        self.in_flight.clear()
        self._acked_early.clear()
        self.reconnects += 1
        for source in self.sources.values():
            source.reset()

    def snapshot(self) -> Dict[str, Any]:
        """The ``forward`` part of the stats document (docs/forwarding.md)."""
        now = time.time()
        files = []
        for source in list(self.sources.values()):
            lag = source.lag()
            if lag == 0:
                source.caught_up_at = now
            # caught_up_at is also refreshed by every scan, so this is right without readers of stats.
            files.append({"path": source.base, "lag_bytes": lag,
                          "lag_seconds": round(now - source.caught_up_at, 3)})
        return {
            "target": self.options.target,
            "connected": self.client is not None,
            "connected_since": self.connected_since,
            "last_error": self.last_error,
            "sent": self.sent, "acked": self.acked, "resent": self.resent,
            "in_flight": len(self.in_flight), "reconnects": self.reconnects,
            "lost_segments": self.lost_segments, "lost_bytes": self.lost_bytes, "gaps": self.gaps,
            "protocol_errors": self.protocol_errors,
            "split_lines": self.split_lines, "checkpoint_saves": self.checkpoint.saves,
            "held_bytes": self.hold.used(), "hold_released": self.hold.released, "hold_disabled": self.hold.disabled,
            "files": files,
        }
