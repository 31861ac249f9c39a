"""What ``clh-writerd stats`` prints: the table and the ``--watch`` frames.

The data (``DaemonStats.snapshot()``, docs/stats.md) lives in stats.py; this
module only turns a snapshot, or two of them, into text. Plain aligned
columns, no terminal library: the only terminal feature used is one SGR
attribute (reverse video) on the rows of clients in trouble, and only when
the caller says the output is a terminal, so piped output stays stable for
scripts. (rich would be 4 packages and ~14 MB installed next to a daemon
whose dependencies are pyzmq, msgpack and concurrent-log-handler.)
"""

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..protocol import CLIENT_COUNTERS, printable

# Counters a client reports about itself that the client table shows.
CLIENT_COLUMNS = tuple(c.wire for c in CLIENT_COUNTERS if c.column)
# Reverse video, and back to normal: the highlight of a client in trouble now.
HIGHLIGHT, NORMAL = "\x1b[7m", "\x1b[0m"
# The mark in the first column of a client in trouble (visible without colours).
MARK = "!"


def printable_doc(value: Any) -> Any:
    """Every string of a stats document (paths, hosts, programs, errors came from clients) escaped."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): printable_doc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_doc(v) for v in value]
    return value


# -- units ----------------------------------------------------------------------
def human_bytes(n: float) -> str:
    """1536 -> '1.5KiB' (binary units, as du -h; no space, so a row still splits on whitespace)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024.0
    return f"{n:.1f}TiB"


def human_count(n: float) -> str:
    """1234567 -> '1.2M': a count or a rate per second in 5 characters or so."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}" if n == int(n) or abs(n) >= 100 else f"{n:.1f}"


def _ago(ts: float, now: float) -> str:
    return f"{max(0.0, now - ts):.1f}s ago"


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(headers: List[str], rows: List[List[str]], left: int = 1) -> List[str]:
    """Aligned columns: the first ``left`` (names, paths, states) left-aligned, the numbers right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: List[str]) -> str:
        text = "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        # A left-aligned last column would pad with spaces; the file table never did.
        return text.rstrip() if left > 1 else text

    return [line(headers)] + [line(r) for r in rows]


# -- clients ----------------------------------------------------------------------
def _reported(c: Dict[str, Any], name: str) -> int:
    return int(c.get("reported", {}).get(name, 0))


def client_errors(c: Dict[str, Any]) -> int:
    """Messages the daemon refused from the client plus the client's own write errors."""
    return int(c.get("errors", 0)) + _reported(c, "write_errors")


def problem_rank(c: Dict[str, Any]) -> int:
    """0 losing or dropping, 1 falling back (now or ever), 2 errors, 3 the rest: the table's order."""
    if _reported(c, "dropped") or _reported(c, "lost"):
        return 0
    if _reported(c, "fallback") or c.get("state") == "fallback":
        return 1
    if client_errors(c):
        return 2
    return 3


def sorted_clients(clients: List[Dict[str, Any]],
                   rank: Callable[[Dict[str, Any]], int] = problem_rank) -> List[Dict[str, Any]]:
    """Problems first, then by last seen, most recent first."""
    return sorted(clients, key=lambda c: (rank(c), -float(c.get("last_seen", 0.0))))


def _cell(c: Dict[str, Any], name: str) -> str:
    """A reported counter; '-' when the client never reported it (an old client, or no report yet)."""
    reported = c.get("reported", {})
    return str(reported[name]) if name in reported else "-"


def gone_line(doc: Dict[str, Any]) -> Optional[str]:
    """The folded total of the clients no longer seen (``clients_gone``), or None."""
    groups = doc.get("clients_gone") or []
    if not groups:
        return None
    totals: Dict[str, int] = {}
    for g in groups:
        for name, value in g.get("reported", {}).items():
            totals[name] = totals.get(name, 0) + int(value)
    clients = sum(int(g.get("clients", 0)) for g in groups)
    shown = "  ".join(f"{k}={totals[k]}" for k in CLIENT_COLUMNS if totals.get(k))
    return (f"gone: {clients} client(s) in {len(groups)} program/file group(s)"
            + (f"  {shown}" if shown else ""))


# recv: what the daemon received from the client (its own count, also for a client that never reports).
CLIENT_HEADERS = ["host", "program", "pid", "file", "state", "last seen", "recv", *CLIENT_COLUMNS, "errors"]


def _client_row(c: Dict[str, Any], now: float) -> List[str]:
    return [
        c["host"], c["program"], str(c["pid"]), c.get("file") or "-", c.get("state") or "-",
        _ago(c["last_seen"], now), str(c.get("records_received", 0)), *(_cell(c, k) for k in CLIENT_COLUMNS),
        str(client_errors(c)),
    ]


def _client_errors_lines(clients: List[Dict[str, Any]]) -> List[str]:
    return [f"  last error of {c['host']}:{c['pid']} {c['program']}: {c['last_error']}"
            for c in clients if c.get("last_error")]


# -- the table ----------------------------------------------------------------------
def render_table(doc: Dict[str, Any]) -> str:
    """The human-readable form of a stats snapshot (client-supplied text escaped)."""
    doc = printable_doc(doc)
    now = time.time()
    d = doc["daemon"]
    out = [
        f"clh-writerd {d['version']}  pid {d['pid']}  up {d['uptime_s']:.0f}s  endpoint {d['endpoint']}",
        "counters: " + ("  ".join(f"{k}={v}" for k, v in d["counters"].items() if v) or "none"),
        *([("refused uids: " + "  ".join(f"{k}={v}" for k, v in d["refused_uids"].items()))]
          if d.get("refused_uids") else []),
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
    out += table(["path", "queue", "recv", "written", "bytes", "batches", "rot", "errors", "p50ms", "p99ms"],
                 file_rows)
    for f in doc["files"]:
        if f["last_error"]:
            out.append(f"  last error on {f['path']}: {f['last_error']}")
        if f["option_conflicts"]:
            out.append(f"  {f['option_conflicts']} conflicting option declaration(s) on {f['path']}")
    clients = sorted_clients(doc["clients"])
    out += ["", "CLIENTS"]
    out += table(CLIENT_HEADERS, [_client_row(c, now) for c in clients], left=5)
    out += _client_errors_lines(clients)
    gone = gone_line(doc)
    if gone:
        out.append(gone)
    if "forward" in doc:  # [forward] is on (docs/forwarding.md)
        from ..forward.status import render_forward

        out += ["", *render_forward(doc["forward"], table)]
    return "\n".join(out) + "\n"


# -- the --watch frame -----------------------------------------------------------
def client_key(c: Dict[str, Any]) -> Tuple[Any, ...]:
    """One client entry across two snapshots."""
    return (c.get("host"), c.get("pid"), c.get("program"), c.get("session"), c.get("file"),
            c.get("peer_uid"), c.get("peer_key"))


class ClientRates:
    """Per-second rates of one client between two snapshots (0 for a new client)."""

    def __init__(self, now: Dict[str, Any], before: Optional[Dict[str, Any]], elapsed: float) -> None:
        def rate(name: str) -> float:
            if before is None or elapsed <= 0:
                return 0.0
            return max(0.0, (_reported(now, name) - _reported(before, name)) / elapsed)

        def received() -> float:
            if before is None or elapsed <= 0:
                return 0.0
            return max(0.0, (now.get("records_received", 0) - before.get("records_received", 0)) / elapsed)

        self.received = received()
        self.dropped = rate("dropped")
        self.fallback = rate("fallback")
        self.resent = rate("resent")
        self.errors = 0.0 if before is None or elapsed <= 0 else \
            max(0.0, (client_errors(now) - client_errors(before)) / elapsed)

    @property
    def in_trouble(self) -> bool:
        """Dropping, falling back or failing right now (in this frame)."""
        return bool(self.dropped or self.fallback or self.errors)

    def rank(self, c: Dict[str, Any]) -> int:
        """Problems *now* first: dropping, fallback (rate or state), errors; then the rest."""
        if self.dropped:
            return 0
        if self.fallback or c.get("state") == "fallback":
            return 1
        if self.errors:
            return 2
        return 3


def render_watch(doc: Dict[str, Any], previous: Optional[Dict[str, Any]], elapsed: float,
                 tty: bool = False, max_clients: int = 20) -> str:
    """One frame of `clh-writerd stats --watch`: rates since the previous frame.

    The client view lists the ``max_clients`` clients in trouble now first
    (dropping, falling back, failing: from the difference between the two
    snapshots), marked ``!`` and, on a terminal (``tty``), in reverse video.
    """
    doc = printable_doc(doc)
    previous = printable_doc(previous) if previous else previous
    d = doc["daemon"]
    before = {f["path"]: f for f in (previous or {}).get("files", [])}
    rate = lambda now, then: (now - then) / elapsed if previous and elapsed > 0 else 0.0  # noqa: E731
    errors = sum(v for k, v in d["counters"].items() if k not in ("frames_received", "reloads"))
    gone = sum(int(g.get("clients", 0)) for g in doc.get("clients_gone") or [])
    out = [
        f"clh-writerd {d['version']}  {d['endpoint']}  up {d['uptime_s']:.0f}s  "
        f"clients {len(doc['clients'])} (gone {gone})  refused {errors}  {time.strftime('%H:%M:%S')}",
        "",
    ]
    rows = []
    for f in doc["files"]:
        old = before.get(f["path"], f)
        rows.append([
            f["path"],
            human_count(rate(f["records_written"], old["records_written"])),
            human_bytes(rate(f["bytes_written"], old["bytes_written"])) + "/s",
            f"{f['queue_depth']}/{f['queue_capacity']}",
            human_count(f["records_written"]),
            human_bytes(f["bytes_written"]),
            str(f["rotations"]),
            str(f["write_errors"]),
            _ms(f["write_latency_p99_ms"]),
        ])
    out += table(["path", "rec/s", "bytes/s", "queue", "written", "size", "rot", "errors", "p99ms"], rows)

    old_clients = {client_key(c): c for c in (previous or {}).get("clients", [])}
    rates = {id(c): ClientRates(c, old_clients.get(client_key(c)), elapsed if previous else 0.0)
             for c in doc["clients"]}
    clients = sorted(doc["clients"], key=lambda c: (rates[id(c)].rank(c), -float(c.get("last_seen", 0.0))))
    now = time.time()
    client_rows, marked = [], []
    for c in clients[:max_clients]:
        r = rates[id(c)]
        client_rows.append([
            MARK if r.in_trouble else " ", c["host"], c["program"], str(c["pid"]), c.get("file") or "-",
            c.get("state") or "-",
            human_count(r.received), human_count(r.dropped), human_count(r.fallback),
            human_count(r.resent), human_count(_reported(c, "dropped")), human_count(_reported(c, "fallback")),
            str(client_errors(c)), _ago(c["last_seen"], now),
        ])
        marked.append(r.in_trouble)
    lines = table([" ", "host", "program", "pid", "file", "state", "recv/s", "drop/s", "fback/s",
                         "resent/s", "dropped", "fallback", "errors", "last seen"], client_rows, left=6)
    out += ["", "CLIENTS  (! = dropping, falling back or failing now)", lines[0]]
    for line, hot in zip(lines[1:], marked):
        out.append(HIGHLIGHT + line + NORMAL if hot and tty else line)
    if len(clients) > max_clients:
        out.append(f"... {len(clients) - max_clients} more client(s): clh-writerd stats")
    gone_text = gone_line(doc)
    if gone_text:
        out.append(gone_text)
    return "\n".join(out) + "\n"
