"""What the daemon counts, and the document ``clh-writerd stats`` shows.

Each counter has exactly one writer thread (received: the main loop;
written: the file's writer thread), so plain attributes are enough under the
GIL. ``snapshot()`` builds the JSON document described in docs/stats.md.
"""

import os
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields
from typing import Any, Deque, Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple

from .._version import __version__
from ..protocol import MAX_REPORT_ERROR_CHARS, REPORT_COUNTERS, ClientId

STATS_SCHEMA = 1
# The daemon's diagnostics that clients can provoke (refusals, failed
# writes, files opened): rate-limited (log_rate_limit); the lifecycle lines
# (start, reload, drain, stop) are never held back.
PEER_LOGGER = "clh_writerd.daemon.peers"
# Principals remembered per file (who may see it in the stats).
MAX_FILE_PRINCIPALS = 64
# What a stats document's entries are estimated to take beyond their strings
# (keys, numbers), for the stats_max_bytes budget; the encoded document is
# checked afterwards.
ENTRY_OVERHEAD_BYTES = 1024
# Groups of gone clients kept at most (per program and file); beyond, one
# "(other)" group takes the rest, so totals never go down.
MAX_GONE_GROUPS = 1000
OTHER_PROGRAM = "(other)"

# printable: control characters escaped (it lives with the wire contract:
# the client escapes what the daemon says with it too).
from ..protocol import printable  # noqa: E402,F401


class LatencyWindow:
    """The last ``size`` durations, for p50/p99 without unbounded memory."""

    def __init__(self, size: int = 2048) -> None:
        self._samples: Deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def percentile(self, p: float) -> Optional[float]:
        samples = sorted(self._samples)
        if not samples:
            return None
        return samples[min(len(samples) - 1, int(p / 100.0 * len(samples)))]


class FileCounter(NamedTuple):
    """A counter the daemon keeps per file, declared once: FileStats, its
    carry-over, the stats document and the Prometheus metrics read it."""

    name: str  # FileStats attribute and stats key
    help: str  # what it counts (the metric's help)
    metric: bool = True  # exported as clh_writerd_file_<name>_total


FILE_COUNTERS: Tuple[FileCounter, ...] = (
    FileCounter("records_received", "records received for the file"),
    FileCounter("bytes_received", "frame bytes received for the file"),
    FileCounter("records_written", "records written to the file"),
    FileCounter("bytes_written", "bytes written to the file"),
    FileCounter("batches_written", "batches written to the file"),
    FileCounter("writes", "write calls (each under one lock)", metric=False),
    FileCounter("rotations", "rotations done by the daemon"),
    FileCounter("write_errors", "writes that failed (not acknowledged)"),
    FileCounter("busy_refusals", "batches refused because the file's queue was full"),
    FileCounter("option_conflicts", "declarations with options different from the first"),
    FileCounter("fsyncs", "fsync calls"),
)


@dataclass(eq=False)
class FileStats:
    """One file's figures. Its counters are declared in FILE_COUNTERS (a typed
    attribute each here, checked equal to the table at import)."""

    path: str
    options: Dict[str, Any]
    capacity: int
    queue_depth: int = 0
    queue_bytes: int = 0
    last_error: str = ""
    records_received: int = 0
    bytes_received: int = 0
    records_written: int = 0
    bytes_written: int = 0
    batches_written: int = 0
    writes: int = 0
    rotations: int = 0
    write_errors: int = 0
    busy_refusals: int = 0
    option_conflicts: int = 0
    fsyncs: int = 0
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    # Who sent batches for the file (access.Peer.principal): who may see it in the stats. Bounded.
    principals: Set[Any] = field(default_factory=set)

    def seen_from(self, principal: Any) -> None:
        if principal not in self.principals and len(self.principals) < MAX_FILE_PRINCIPALS:
            self.principals.add(principal)

    def carry_over(self, old: "FileStats") -> None:
        """Keep the totals of the same file's previous (idle-closed) writer."""
        for counter in FILE_COUNTERS:
            setattr(self, counter.name, getattr(old, counter.name))
        self.last_error = old.last_error
        self.principals = set(old.principals)

    def snapshot(self) -> Dict[str, Any]:
        p50, p99 = self.latency.percentile(50), self.latency.percentile(99)
        doc = {"path": self.path, "options": self.options, "queue_depth": self.queue_depth,
               "queue_capacity": self.capacity, "queue_bytes": self.queue_bytes}
        doc.update((counter.name, getattr(self, counter.name)) for counter in FILE_COUNTERS)
        doc.update(last_error=self.last_error,
                   write_latency_p50_ms=None if p50 is None else round(p50 * 1000, 3),
                   write_latency_p99_ms=None if p99 is None else round(p99 * 1000, 3))
        return doc


assert [f.name for f in fields(FileStats) if f.type in (int, "int") and f.name not in (
    "capacity", "queue_depth", "queue_bytes")] == [counter.name for counter in FILE_COUNTERS]


# Seconds between checks that listed clients' processes still exist, and how
# long the entry of a client whose process is gone stays listed after it was
# last seen (long enough to see who just died; not clients_gone_after, 300 s).
LIVENESS_EVERY = 2.0
GONE_PROCESS_GRACE = 10.0


def process_start(pid: Optional[int]) -> Optional[bytes]:
    """When process ``pid`` started (field 22 of /proc/PID/stat, in clock
    ticks since boot): with the pid, a process's identity that survives pid
    reuse. None when it is gone, or not visible here (another pid namespace
    gives 0, or no /proc)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # the name (field 2) may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


class ClientEntry:
    """What the daemon knows of one client (one handler in one process):
    its peer, what it sent, and its latest report. The client's own
    counters are ``client._stats.ClientStats``; they reach this entry in
    reports (``reported``)."""

    def __init__(self, client: ClientId, peer: Any = None) -> None:
        self.client = client
        self.peer = peer  # access.Peer: from the kernel / the CURVE handshake, not from the client
        # The peer process's identity (ipc: its pid from the kernel), to
        # notice when it is gone: a pool worker killed by terminate() never
        # says goodbye.
        self.peer_start = process_start(getattr(peer, "pid", None))
        self.first_seen = self.last_seen = time.time()
        self.records = 0
        self.batches = 0
        self.sync_records = 0
        self.errors = 0
        self.reported: Dict[str, int] = {}
        # From the latest report (None / "" before any).
        self.file: Optional[str] = None
        self.state: Optional[str] = None
        self.last_error = ""
        self.closed = False  # a final report arrived

    def snapshot(self) -> Dict[str, Any]:
        return {
            "host": self.client.host,
            "pid": self.client.pid,
            "peer_uid": getattr(self.peer, "uid", None),
            "peer_gid": getattr(self.peer, "gid", None),
            "peer_pid": getattr(self.peer, "pid", None),
            "peer_key": getattr(self.peer, "key", "") or None,
            "program": self.client.program,
            "session": self.client.session,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "records_received": self.records,
            "batches_received": self.batches,
            "sync_records": self.sync_records,
            "errors": self.errors,
            "reported": dict(self.reported),
            "file": self.file,
            "state": self.state or "daemon",  # sent batches, never reported (an older client)
            "last_error": self.last_error,
            "closed": self.closed,
        }


class GoneClients:
    """Clients no longer listed (not seen for clients_gone_after, or evicted
    by max_clients), aggregated per (program, file): their reported totals
    are kept, so per-(program, file) totals never go down. Bounded."""

    def __init__(self, max_groups: int = MAX_GONE_GROUPS) -> None:
        self.max_groups = max_groups
        self.groups: Dict[Any, Dict[str, Any]] = {}

    def add(self, entry: ClientEntry) -> None:
        key: Any = (entry.client.program, entry.file)
        if key not in self.groups and len(self.groups) >= self.max_groups:
            key = (OTHER_PROGRAM, None)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = {"program": key[0], "file": key[1], "clients": 0, "records_received": 0,
                                        "reported": {}}
        group["clients"] += 1
        group["records_received"] += entry.records  # the metrics' records series never goes down
        totals = group["reported"]
        for name, value in entry.reported.items():
            totals[name] = totals.get(name, 0) + value

    def snapshot(self) -> List[Dict[str, Any]]:
        return [{**g, "reported": dict(g["reported"])} for g in list(self.groups.values())]


# Daemon-wide counters; the error ones are named after protocol error codes.
DAEMON_COUNTERS = (
    "frames_received",
    "malformed",
    "unsupported_version",
    "unknown_type",
    "too_large",
    "forbidden_path",
    "bad_options",
    "busy",
    "write_failed",
    "shutting_down",
    "internal",
    "options_conflict",
    "option_changes",  # files served with new options: every process that declared the old ones was gone
    "unauthorized",
    "reloads",
    "files_closed",  # idle files closed (LRU), their descriptors released
    "unknown_counters",  # report entries with a name outside protocol.REPORT_COUNTERS (ignored)
    "busy_map_evictions",  # per-session ordering entries dropped to keep that map bounded
    "connections_refused",  # connections shut down at once: descriptors were short
    "listener_paused",  # times the daemon stopped accepting connections until descriptors came back
    "auth_failures",  # tcp connections refused by CURVE (unknown key, or no CURVE)
    "replies_dropped",  # replies not queued: the peer had REPLY_HWM unread or unread_reply_bytes in its socket, or was gone
    "peer_files_refused",  # new files refused: the peer held peer_max_files files and none was idle
    "queue_bytes_refused",  # batches refused busy by a byte budget (queue_bytes, peer_queue_bytes, total_queue_bytes)
    "handshakes_incomplete",  # connections closed mid-handshake (handshake_timeout ran out, or shut down)
    "stats_truncated",  # stats documents cut to stats_max_bytes
    "log_lines_suppressed",  # diagnostic lines beyond log_rate_limit
)
# Refusals kept per peer uid at most (refused_uids in the stats document).
MAX_REFUSED_UIDS = 256


class DaemonStats:
    def __init__(self, endpoint: str, max_clients: int, clients_gone_after: float = 300.0) -> None:
        self.endpoint = endpoint
        self.clients_gone_after = clients_gone_after
        self.gone = GoneClients()
        self.started = time.time()
        self.max_clients = max_clients
        self.counters: Dict[str, int] = dict.fromkeys(DAEMON_COUNTERS, 0)
        self.files: "OrderedDict[str, FileStats]" = OrderedDict()
        # Keyed by what the client claims *and* who the transport says it is,
        # so no client can write into another's entry.
        self.clients: "OrderedDict[Any, ClientEntry]" = OrderedDict()
        self.refused_uids: Dict[str, int] = {}
        self.limits: Dict[str, int] = {}
        self._lock = threading.Lock()  # writer threads count refusals too
        self._liveness_at = 0.0

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def add_file(self, stats: FileStats, open_paths: Mapping[str, Any], keep: int) -> None:
        """Register a file's stats; entries of closed files beyond ``keep`` are forgotten, oldest first."""
        self.files.pop(stats.path, None)
        self.files[stats.path] = stats
        if len(self.files) > keep:
            for path in [p for p in self.files if p not in open_paths][: len(self.files) - keep]:
                del self.files[path]

    def report(self, client: ClientId, counters: Mapping[str, int], peer: Any = None, state: Optional[str] = None,
               file: Optional[str] = None, error: Optional[str] = None, final: bool = False) -> None:
        """A client's own counters (its cumulative totals: a report replaces
        the previous values, so a client that reconnects, or a daemon that
        restarted, loses nothing); only the protocol's names are kept (bounded)."""
        known = {k: v for k, v in counters.items() if k in REPORT_COUNTERS}
        if len(known) != len(counters):
            self.count("unknown_counters", len(counters) - len(known))
        entry = self.client(client, peer)
        entry.reported.update(known)
        if state is not None:
            entry.state = state
        if file is not None:
            entry.file = file
        if error is not None:
            entry.last_error = error[:MAX_REPORT_ERROR_CHARS]
        entry.closed = entry.closed or final

    def refused_peer(self, uid: Optional[int]) -> None:
        """One more refusal for ``uid`` ("unknown": no credentials); bounded."""
        key = "unknown" if uid is None else str(uid)
        with self._lock:
            if key in self.refused_uids or len(self.refused_uids) < MAX_REFUSED_UIDS:
                self.refused_uids[key] = self.refused_uids.get(key, 0) + 1
            else:
                self.counters["refused_uids_overflow"] = self.counters.get("refused_uids_overflow", 0) + 1

    def client(self, client: ClientId, peer: Any = None) -> ClientEntry:
        """The entry for ``client`` as sent by ``peer``, marked as just seen (LRU-bounded)."""
        key: Any = client if peer is None else (client, peer.identity)
        entry = self.clients.get(key)
        if entry is None:
            entry = self.clients[key] = ClientEntry(client, peer)
            while len(self.clients) > self.max_clients:
                self.gone.add(self.clients.popitem(last=False)[1])
        else:
            self.clients.move_to_end(key)
            entry.last_seen = time.time()
        return entry

    def fold_gone(self, now: Optional[float] = None) -> int:
        """Move clients not seen for clients_gone_after seconds (closed ones
        included), and every LIVENESS_EVERY those whose process no longer
        exists (quiet for GONE_PROCESS_GRACE), into the gone groups; how many. Called by the daemon's main
        loop (the only thread that changes the client table)."""
        now = time.time() if now is None else now
        cutoff = now - self.clients_gone_after
        old = []
        for key, entry in self.clients.items():  # least recently seen first
            if entry.last_seen > cutoff:
                break
            old.append(key)
        if now >= self._liveness_at:
            self._liveness_at = now + LIVENESS_EVERY
            listed = set(old)
            quiet = now - GONE_PROCESS_GRACE
            old += [key for key, entry in self.clients.items() if key not in listed and entry.last_seen < quiet
                    and entry.peer_start is not None and process_start(entry.peer.pid) != entry.peer_start]
        for key in old:
            self.gone.add(self.clients.pop(key))
        return len(old)

    def snapshot(self, scope: Any = None, budget: int = 0) -> Dict[str, Any]:
        """The stats document. ``scope``: a principal (access.Peer.principal)
        that sees only its own clients and the files they write; None: all.
        ``budget``: the document's largest size in bytes (0: no limit): past
        it, the clients in trouble and the most recent ones are listed and
        the rest summed under ``truncated``."""
        daemon: Dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "endpoint": self.endpoint,
            "started": self.started,
            "uptime_s": round(time.time() - self.started, 3),
            "counters": self.counters.copy(),
            "refused_uids": dict(self.refused_uids) if scope is None else {},
            "limits": dict(self.limits),
        }
        # list() copies in one step: the metrics thread may read while the
        # main loop adds entries.
        files = list(self.files.values())
        clients = list(self.clients.values())
        gone = self.gone.snapshot() if scope is None else []
        if scope is not None:
            files = [f for f in files if scope in f.principals]
            clients = [c for c in clients if _principal(c.peer) == scope]
        doc = {"schema": STATS_SCHEMA, "daemon": daemon}
        if not budget:
            doc.update(files=[f.snapshot() for f in files], clients=[c.snapshot() for c in clients],
                       clients_gone=gone)
            return doc
        left = budget - 4096  # the daemon part and the document's own keys
        # Files with a queue or errors first, then the most recently opened.
        files = sorted(reversed(files), key=lambda f: not (f.queue_depth or f.write_errors))
        # Files may take a third of the budget, clients most of the rest, gone groups what is left.
        kept_files, spare = _within(files, left // 3, lambda f: _size(f.path, repr(f.options)))
        left -= left // 3 - spare
        clients.sort(key=lambda c: (_trouble(c), c.last_seen), reverse=True)
        kept_clients, spare = _within(clients, left * 3 // 4, lambda c: _size(
            c.client.host, c.client.program, c.client.session, c.file or "", c.last_error))
        left -= left * 3 // 4 - spare
        kept_gone, left = _within(gone, left, lambda g: _size(g["program"], g["file"] or ""))
        doc.update(files=[f.snapshot() for f in kept_files], clients=[c.snapshot() for c in kept_clients],
                   clients_gone=kept_gone)
        omitted = clients[len(kept_clients):]
        if len(kept_files) < len(files) or omitted or len(kept_gone) < len(gone):
            self.count("stats_truncated")
            reported: Dict[str, int] = {}
            for c in omitted:
                for name, value in c.reported.items():
                    reported[name] = reported.get(name, 0) + value
            doc["truncated"] = {"files": len(files) - len(kept_files), "clients": len(omitted),
                                "clients_gone": len(gone) - len(kept_gone),
                                "records_received": sum(c.records for c in omitted), "reported": reported}
        return doc


def _principal(peer: Any) -> Any:
    return getattr(peer, "principal", None)


def _trouble(c: ClientEntry) -> bool:
    """Losing, dropping, falling back or refused: listed first when a document must be cut."""
    return bool(c.reported.get("lost") or c.reported.get("dropped") or c.reported.get("fallback") or c.errors
                or c.state == "fallback")


def _size(*texts: str) -> int:
    """An upper bound of the UTF-8 bytes of ``texts`` (exact for ASCII, which str knows in O(1))."""
    return sum(len(t) if t.isascii() else 4 * len(t) for t in texts)


def _within(entries: Iterable[Any], left: int, size: Any) -> Tuple[List[Any], int]:
    """The leading ``entries`` whose estimated size (``size`` + ENTRY_OVERHEAD_BYTES) fits in ``left``."""
    kept = []
    for entry in entries:
        cost = size(entry) + ENTRY_OVERHEAD_BYTES
        if cost > left:
            break
        kept.append(entry)
        left -= cost
    return kept, left

