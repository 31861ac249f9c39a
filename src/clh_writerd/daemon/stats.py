"""What the daemon counts, and the document ``clh-writerd stats`` shows.

Each counter has exactly one writer thread (received: the main loop;
written: the file's writer thread), so plain attributes are enough under the
GIL. ``snapshot()`` builds the JSON document described in docs/stats.md.
"""

import os
import socket
import time
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, List, Optional

from .. import __version__
from ..protocol import ClientId

STATS_SCHEMA = 1


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


class FileStats:
    def __init__(self, path: str, options: Dict[str, Any], capacity: int) -> None:
        self.path = path
        self.options = options
        self.capacity = capacity
        self.queue_depth = 0
        self.records_received = 0
        self.bytes_received = 0
        self.records_written = 0
        self.bytes_written = 0
        self.batches_written = 0
        self.writes = 0
        self.rotations = 0
        self.write_errors = 0
        self.last_error = ""
        self.busy_refusals = 0
        self.option_conflicts = 0
        self.fsyncs = 0
        self.latency = LatencyWindow()

    def snapshot(self) -> Dict[str, Any]:
        p50, p99 = self.latency.percentile(50), self.latency.percentile(99)
        return {
            "path": self.path,
            "options": self.options,
            "queue_depth": self.queue_depth,
            "queue_capacity": self.capacity,
            "records_received": self.records_received,
            "bytes_received": self.bytes_received,
            "records_written": self.records_written,
            "bytes_written": self.bytes_written,
            "batches_written": self.batches_written,
            "writes": self.writes,
            "rotations": self.rotations,
            "write_errors": self.write_errors,
            "last_error": self.last_error,
            "busy_refusals": self.busy_refusals,
            "option_conflicts": self.option_conflicts,
            "fsyncs": self.fsyncs,
            "write_latency_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "write_latency_p99_ms": None if p99 is None else round(p99 * 1000, 3),
        }


class ClientStats:
    def __init__(self, client: ClientId) -> None:
        self.client = client
        self.first_seen = self.last_seen = time.time()
        self.records = 0
        self.batches = 0
        self.sync_records = 0
        self.errors = 0
        self.reported: Dict[str, int] = {}

    def snapshot(self) -> Dict[str, Any]:
        return {
            "host": self.client.host,
            "pid": self.client.pid,
            "program": self.client.program,
            "session": self.client.session,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "records_received": self.records,
            "batches_received": self.batches,
            "sync_records": self.sync_records,
            "errors": self.errors,
            "reported": dict(self.reported),
        }


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
    "reloads",
)


class DaemonStats:
    def __init__(self, endpoint: str, max_clients: int) -> None:
        self.endpoint = endpoint
        self.started = time.time()
        self.max_clients = max_clients
        self.counters: Dict[str, int] = dict.fromkeys(DAEMON_COUNTERS, 0)
        self.files: Dict[str, FileStats] = {}
        self.clients: "OrderedDict[ClientId, ClientStats]" = OrderedDict()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def client(self, client: ClientId) -> ClientStats:
        """The entry for ``client``, marked as just seen (LRU-bounded)."""
        entry = self.clients.get(client)
        if entry is None:
            entry = self.clients[client] = ClientStats(client)
            while len(self.clients) > self.max_clients:
                self.clients.popitem(last=False)
        else:
            self.clients.move_to_end(client)
            entry.last_seen = time.time()
        return entry

    def snapshot(self) -> Dict[str, Any]:
        return {
            "schema": STATS_SCHEMA,
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "endpoint": self.endpoint,
                "started": self.started,
                "uptime_s": round(time.time() - self.started, 3),
                "counters": self.counters.copy(),
            },
            # list() copies in one step: the metrics thread may read while
            # the main loop adds entries.
            "files": [f.snapshot() for f in list(self.files.values())],
            "clients": [c.snapshot() for c in list(self.clients.values())],
        }


def _ago(ts: float, now: float) -> str:
    return f"{max(0.0, now - ts):.1f}s ago"


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(headers: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [line(headers)] + [line(r) for r in rows]


def render_table(doc: Dict[str, Any]) -> str:
    """The human-readable form of a stats snapshot."""
    now = time.time()
    d = doc["daemon"]
    out = [
        f"clh-writerd {d['version']}  pid {d['pid']}  up {d['uptime_s']:.0f}s  endpoint {d['endpoint']}",
        "counters: " + ("  ".join(f"{k}={v}" for k, v in d["counters"].items() if v) or "none"),
        "",
        "FILES",
    ]
    file_rows = [
        [
            f["path"],
            f"{f['queue_depth']}/{f['queue_capacity']}",
            str(f["records_received"]),
            str(f["records_written"]),
            str(f["bytes_written"]),
            str(f["batches_written"]),
            str(f["rotations"]),
            str(f["write_errors"]),
            _ms(f["write_latency_p50_ms"]),
            _ms(f["write_latency_p99_ms"]),
        ]
        for f in doc["files"]
    ]
    out += _table(
        ["path", "queue", "recv", "written", "bytes", "batches", "rot", "errors", "p50ms", "p99ms"], file_rows
    )
    for f in doc["files"]:
        if f["last_error"]:
            out.append(f"  last error on {f['path']}: {f['last_error']}")
        if f["option_conflicts"]:
            out.append(f"  {f['option_conflicts']} conflicting option declaration(s) on {f['path']}")
    out += ["", "CLIENTS"]
    client_rows = [
        [
            f"{c['host']}:{c['pid']}",
            c["program"],
            _ago(c["last_seen"], now),
            str(c["records_received"]),
            str(c["reported"].get("dropped", 0)),
            str(c["reported"].get("fallback", 0)),
            str(c["reported"].get("resent", 0)),
        ]
        for c in doc["clients"]
    ]
    out += _table(["client", "program", "last seen", "records", "dropped", "fallback", "resent"], client_rows)
    if "forward" in doc:  # [forward] is on (docs/forwarding.md)
        from ..forward.status import render_forward

        out += ["", *render_forward(doc["forward"], _table)]
    return "\n".join(out) + "\n"


def render_watch(doc: Dict[str, Any], previous: Optional[Dict[str, Any]], elapsed: float) -> str:
    """One frame of `clh-writerd stats --watch`: rates since the previous frame."""
    d = doc["daemon"]
    before = {f["path"]: f for f in (previous or {}).get("files", [])}
    rate = lambda now, then: (now - then) / elapsed if previous and elapsed > 0 else 0.0  # noqa: E731
    errors = sum(v for k, v in d["counters"].items() if k not in ("frames_received", "reloads"))
    out = [
        f"clh-writerd {d['version']}  {d['endpoint']}  up {d['uptime_s']:.0f}s  "
        f"clients {len(doc['clients'])}  refused {errors}  {time.strftime('%H:%M:%S')}",
        "",
    ]
    rows = []
    for f in doc["files"]:
        old = before.get(f["path"], f)
        rows.append([
            f["path"],
            f"{rate(f['records_written'], old['records_written']):.0f}",
            f"{rate(f['bytes_written'], old['bytes_written']) / 1024:.1f}",
            f"{f['queue_depth']}/{f['queue_capacity']}",
            str(f["records_written"]),
            str(f["rotations"]),
            str(f["write_errors"]),
            _ms(f["write_latency_p99_ms"]),
        ])
    out += _table(["path", "rec/s", "KiB/s", "queue", "written", "rot", "errors", "p99ms"], rows)
    return "\n".join(out) + "\n"
