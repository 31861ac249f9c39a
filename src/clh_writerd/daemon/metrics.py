"""Prometheus exposition of the stats document (optional: clh-writerd[metrics]).

A custom collector renders the same snapshot `clh-writerd stats` shows, at
scrape time, so there is one source of figures and nothing to keep in sync.
"""

from typing import Any, Callable, Dict, Iterator, List, Tuple

from .errors import StartupError

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
except ImportError:  # pragma: no cover - exercised only without the extra
    start_http_server = None  # type: ignore[assignment]

PREFIX = "clh_writerd_"

# stats key -> (metric name, help); counters get Prometheus' _total suffix.
FILE_COUNTERS = (
    ("records_received", "records received for the file"),
    ("bytes_received", "frame bytes received for the file"),
    ("records_written", "records written to the file"),
    ("bytes_written", "bytes written to the file"),
    ("batches_written", "batches written to the file"),
    ("rotations", "rotations done by the daemon"),
    ("write_errors", "writes that failed (not acknowledged)"),
    ("busy_refusals", "batches refused because the file's queue was full"),
    ("option_conflicts", "declarations with options different from the first"),
    ("fsyncs", "fsync calls"),
)
FILE_GAUGES = (
    ("queue_depth", "messages queued for the file"),
    ("queue_capacity", "batches the file's queue holds"),
)
CLIENT_REPORTED = ("dropped", "fallback", "resent", "queue_full", "sync_timeouts")


class StatsCollector:
    """Turns a stats snapshot into metric families on every scrape."""

    def __init__(self, snapshot: Callable[[], Dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        doc = self.snapshot()
        yield from self._daemon(doc["daemon"])
        yield from self._files(doc["files"])
        yield from self._clients(doc["clients"])
        if "forward" in doc:  # [forward] is on (docs/forwarding.md)
            from ..forward.status import forward_metrics

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

    def _clients(self, clients: List[Dict[str, Any]]) -> Iterator[Any]:
        # session too: every handler in a process is a client of its own, and
        # two series with the same labels make the exposition invalid.
        labels = ["host", "pid", "program", "session"]

        def ident(c: Dict[str, Any]) -> List[str]:
            return [c["host"], str(c["pid"]), c["program"], c["session"]]

        records = CounterMetricFamily(PREFIX + "client_records", "records received from the client", labels=labels)
        seen = GaugeMetricFamily(PREFIX + "client_last_seen_timestamp_seconds", "when the client was last heard",
                                 labels=labels)
        reported = CounterMetricFamily(PREFIX + "client_reported", "counters the client reports about itself",
                                       labels=labels + ["counter"])
        for c in clients:
            records.add_metric(ident(c), c["records_received"])
            seen.add_metric(ident(c), c["last_seen"])
            for name in CLIENT_REPORTED:
                reported.add_metric(ident(c) + [name], c["reported"].get(name, 0))
        yield records
        yield seen
        yield reported


class MetricsServer:
    """The HTTP endpoint; close() shuts it down."""

    def __init__(self, listen: str, snapshot: Callable[[], Dict[str, Any]]) -> None:
        if start_http_server is None:
            raise StartupError("metrics_listen needs prometheus-client: pip install 'clh-writerd[metrics]'")
        host, _, port = listen.rpartition(":")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(snapshot))  # type: ignore[arg-type]
        try:
            self._server, self._thread = _start(int(port), host.strip("[]"), self.registry)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {listen}: {exc}") from None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _start(port: int, addr: str, registry: Any) -> Tuple[Any, Any]:
    result = start_http_server(port, addr=addr, registry=registry)
    if result is None:  # pragma: no cover - prometheus-client < 0.17 returns nothing
        raise StartupError("prometheus-client >= 0.17 is required for metrics_listen")
    return result
