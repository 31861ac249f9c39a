"""Prometheus exposition of the stats document (optional: clh-writerd[metrics]).

A custom collector renders the same snapshot `clh-writerd stats` shows, at
scrape time, so there is one source of figures and nothing to keep in sync.

Who sees what: the per-file and per-client series (file paths, program
names) go only to a scraper the daemon knows to be a stats admin - a
loopback connection whose owner (the kernel's /proc/net/tcp says which uid
owns the scraper's end) is root, the daemon's user or in ``stats_admins`` -
or to every scraper with ``metrics_public = true``. The others get the
daemon-wide series. A scrape is built from a document of at most
``stats_max_bytes`` / METRICS_SHARE (a client group is some 18 series,
each repeating its labels), so it stays about stats_max_bytes.
"""

import ipaddress
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .. import protocol
from ..forward.status import forward_metrics
from .errors import StartupError
from .stats import FILE_COUNTERS as DAEMON_FILE_COUNTERS
from .stats import OTHER_PROGRAM

try:
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
except ImportError:  # pragma: no cover - exercised only without the extra
    make_wsgi_app = None  # type: ignore[assignment]

PREFIX = "clh_writerd_"

# stats key -> help; counters get Prometheus' _total suffix (stats.FILE_COUNTERS).
FILE_COUNTERS = tuple((counter.name, counter.help) for counter in DAEMON_FILE_COUNTERS if counter.metric)
FILE_GAUGES = (
    ("queue_depth", "messages queued for the file"),
    ("queue_bytes", "bytes queued for the file (characters + 64 per record)"),
    ("queue_capacity", "batches the file's queue holds"),
)
# What clients report about themselves (protocol.CLIENT_COUNTERS); a name a
# client never sent shows as 0.
CLIENT_REPORTED = protocol.REPORT_COUNTERS
# The states a client reports (client/_stats.py); every group shows all of
# them, 0 included, so an alert on state="fallback" has a series to look at.
CLIENT_STATES = ("connecting", "daemon", "fallback", "embedded", "stopped")
# A scrape repeats an entry's labels in every series (18 for a client group):
# it is built from a document of stats_max_bytes / METRICS_SHARE.
METRICS_SHARE = 16
# Series whose highest value _monotonic() remembers at most.
MAX_REMEMBERED = 100_000


# Whether the scrape being answered (on this HTTP thread) may see the per-file and per-client series.
_scrape = threading.local()


class StatsCollector:
    """Turns a stats snapshot into metric families on every scrape."""

    def __init__(self, snapshot: Callable[[], Dict[str, Any]], per_client: bool = False) -> None:
        self.snapshot = snapshot
        self.per_client = per_client  # [daemon] metrics_per_client: pid/session series too
        self._high: Dict[Tuple[str, ...], float] = {}
        self._lock = threading.Lock()  # the HTTP server may answer two scrapes at once

    def collect(self) -> Iterator[Any]:
        doc = self.snapshot()
        yield from self._daemon(doc["daemon"])
        if not getattr(_scrape, "full", True):
            return  # a scraper that is not a stats admin: the daemon-wide series only
        yield from self._files(doc["files"])
        yield from self._clients(doc)
        if "forward" in doc:  # [forward] is on (docs/forwarding.md)
            yield from forward_metrics(doc["forward"], PREFIX)

    def _daemon(self, d: Dict[str, Any]) -> Iterator[Any]:
        info = InfoMetricFamily(PREFIX + "build", "clh-writerd version and endpoint")
        info.add_metric([], {"version": d["version"], "endpoint": d["endpoint"]})
        yield info
        uptime = GaugeMetricFamily(PREFIX + "uptime_seconds", "seconds since the daemon started")
        uptime.add_metric([], d["uptime_s"])
        yield uptime
        events = CounterMetricFamily(PREFIX + "events", "daemon events: frames received, refusals by error code, reloads",
                                     labels=["event"])
        for name, value in sorted(d["counters"].items()):
            events.add_metric([name], value)
        yield events

    def _files(self, files: List[Dict[str, Any]]) -> Iterator[Any]:
        for key, doc in FILE_COUNTERS:
            family = CounterMetricFamily(PREFIX + "file_" + key, doc, labels=["path"])
            for f in files:
                family.add_metric([f["path"]], f[key])
            yield family
        for key, doc in FILE_GAUGES:
            gauge = GaugeMetricFamily(PREFIX + "file_" + key, doc, labels=["path"])
            for f in files:
                gauge.add_metric([f["path"]], f[key])
            yield gauge
        latency = GaugeMetricFamily(PREFIX + "file_write_latency_seconds",
                                    "write latency over the last 2048 writes", labels=["path", "quantile"])
        for f in files:
            for quantile, key in (("0.5", "write_latency_p50_ms"), ("0.99", "write_latency_p99_ms")):
                if f[key] is not None:
                    latency.add_metric([f["path"], quantile], f[key] / 1000.0)
        yield latency

    def _clients(self, doc: Dict[str, Any]) -> Iterator[Any]:
        """Client series per (program, file): live clients plus the ``clients_gone`` groups.

        A worker restart makes a new client (new pid, new session) but no new
        series, and a client that goes away is folded into its group, so the
        group's counters never go down (and ``increase()`` sees no reset).
        """
        groups: Dict[Tuple[str, str], Dict[str, Any]] = {}

        def group(program: str, file: Optional[str]) -> Dict[str, Any]:
            key = (program, file or "")
            if key not in groups:
                groups[key] = {"records": 0, "reported": dict.fromkeys(CLIENT_REPORTED, 0), "last_seen": None,
                               "states": dict.fromkeys(CLIENT_STATES, 0), "gone": 0}
            return groups[key]

        for c in doc["clients"]:
            g = group(c["program"], c.get("file"))
            g["records"] += c["records_received"]
            for name in CLIENT_REPORTED:
                g["reported"][name] += c["reported"].get(name, 0)
            g["last_seen"] = max(g["last_seen"] or 0.0, c["last_seen"])
            state = c.get("state") or "daemon"  # a client that never said: it sends batches
            g["states"][state] = g["states"].get(state, 0) + 1
        cut = doc.get("truncated")
        if cut:  # clients left out of a document cut to its budget: summed, so the totals stay whole
            g = group(OTHER_PROGRAM, None)
            g["records"] += cut.get("records_received", 0)
            for name in CLIENT_REPORTED:
                g["reported"][name] += cut.get("reported", {}).get(name, 0)
        for gone in doc.get("clients_gone") or []:
            g = group(gone["program"], gone.get("file"))
            g["records"] += gone.get("records_received", 0)
            for name in CLIENT_REPORTED:
                g["reported"][name] += gone.get("reported", {}).get(name, 0)
            g["gone"] += gone.get("clients", 0)

        labels = ["program", "file"]
        records = CounterMetricFamily(PREFIX + "client_records", "records received from the clients of the group",
                                      labels=labels)
        reported = CounterMetricFamily(PREFIX + "client_reported",
                                       "counters the clients of the group report about themselves",
                                       labels=labels + ["counter"])
        states = GaugeMetricFamily(PREFIX + "clients", "clients seen recently, by the state they last reported",
                                   labels=labels + ["state"])
        gone_clients = GaugeMetricFamily(PREFIX + "clients_gone", "clients no longer seen, folded into the group",
                                         labels=labels)
        seen = GaugeMetricFamily(PREFIX + "client_last_seen_timestamp_seconds",
                                 "when a client of the group was last heard", labels=labels)
        for (program, file), g in sorted(groups.items()):
            ident = [program, file]
            records.add_metric(ident, self._monotonic(("records",) + tuple(ident), g["records"]))
            for name in CLIENT_REPORTED:
                reported.add_metric(ident + [name],
                                    self._monotonic(("reported", program, file, name), g["reported"][name]))
            for state, n in g["states"].items():
                states.add_metric(ident + [state], n)
            gone_clients.add_metric(ident, g["gone"])
            if g["last_seen"] is not None:
                seen.add_metric(ident, g["last_seen"])
        yield from (records, reported, states, gone_clients, seen)
        if self.per_client:
            yield from self._processes(doc["clients"])

    def _monotonic(self, key: Tuple[str, ...], value: float) -> float:
        """``value``, or the highest value this series showed before.

        A group's total dips when a client leaves the live list before the
        daemon has folded it into ``clients_gone`` (or when a gone group is
        folded into "(other)"): a Prometheus counter that goes down reads as a
        reset and ``increase()`` would invent a jump. Bounded: past
        MAX_REMEMBERED series the memory starts over.
        """
        with self._lock:
            if len(self._high) > MAX_REMEMBERED:
                self._high.clear()
            high = max(self._high.get(key, 0), value)
            self._high[key] = high
            return high

    def _processes(self, clients: List[Dict[str, Any]]) -> Iterator[Any]:
        """metrics_per_client = true: one series per live client (pid and session labels)."""
        labels = ["host", "pid", "program", "session", "file"]

        def ident(c: Dict[str, Any]) -> List[str]:
            return [c["host"], str(c["pid"]), c["program"], c["session"], c.get("file") or ""]

        records = CounterMetricFamily(PREFIX + "process_records", "records received from one client process",
                                      labels=labels)
        reported = CounterMetricFamily(PREFIX + "process_reported", "counters one client process reports",
                                       labels=labels + ["counter"])
        seen = GaugeMetricFamily(PREFIX + "process_last_seen_timestamp_seconds", "when the client was last heard",
                                 labels=labels)
        done = set()
        for c in clients:
            # Two daemon entries may share the claims (another uid copied them):
            # one series each would make the exposition invalid; the first wins.
            key = tuple(ident(c))
            if key in done:
                continue
            done.add(key)
            records.add_metric(ident(c), c["records_received"])
            seen.add_metric(ident(c), c["last_seen"])
            for name in CLIENT_REPORTED:
                reported.add_metric(ident(c) + [name], c["reported"].get(name, 0))
        yield from (records, reported, seen)


class MetricsServer:
    """The HTTP endpoint; close() shuts it down. ``sees_all(uid)``: whether a
    loopback scraper running as ``uid`` is a stats admin; ``public``: every
    scraper sees everything."""

    def __init__(self, listen: str, snapshot: Callable[[], Dict[str, Any]], per_client: bool = False,
                 sees_all: Callable[[int], bool] = lambda uid: True, public: bool = True) -> None:
        if make_wsgi_app is None:
            raise StartupError("metrics_listen needs prometheus-client: pip install 'clh-writerd[metrics]'")
        host, _, port = listen.rpartition(":")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(snapshot, per_client))  # type: ignore[arg-type]
        exposition = make_wsgi_app(self.registry)
        self.sees_all, self.public = sees_all, public

        def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
            _scrape.full = self.public or self._admin(environ)
            return exposition(environ, start_response)

        try:
            self._server, self._thread = _start(int(port), host.strip("[]"), app)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {listen}: {exc}") from None

    def _admin(self, environ: Dict[str, Any]) -> bool:
        try:
            uid = scraper_uid(environ["REMOTE_ADDR"], int(environ["REMOTE_PORT"]), environ["SERVER_NAME_ADDR"],
                              int(environ["SERVER_PORT"]))
        except (KeyError, ValueError):
            return False
        return uid is not None and self.sees_all(uid)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _Handler(WSGIRequestHandler):
    """Quiet (no access log on stderr), and tells the app both ends of the connection."""

    def get_environ(self) -> Dict[str, Any]:
        environ = super().get_environ()
        environ["REMOTE_PORT"] = str(self.client_address[1])
        environ["SERVER_NAME_ADDR"] = self.connection.getsockname()[0]
        return environ

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _start(port: int, addr: str, app: Any) -> Tuple[Any, Any]:
    family = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

    httpd = make_server(addr, port, app, Server, handler_class=_Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    return httpd, thread


def _proc_address(ip: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} spells it: the address's 32-bit words in host order, then the port."""
    packed = ipaddress.ip_address(ip).packed
    words = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
    return f"{words.hex().upper()}:{port:04X}"


def scraper_uid(remote_ip: str, remote_port: int, local_ip: str, local_port: int) -> Optional[int]:
    """The uid owning the scraper's end of a loopback tcp connection (from the kernel's socket
    table, as identd answers), or None: not loopback, or not found."""
    try:
        if not ipaddress.ip_address(remote_ip).is_loopback:
            return None
    except ValueError:
        return None
    # IPv4 mapped into IPv6 (a dual-stack listener) shows in tcp6 with the mapped form.
    wanted = {(_proc_address(remote_ip, remote_port), _proc_address(local_ip, local_port))}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if (fields[1], fields[2]) in wanted:
                        return int(fields[7])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None
