"""The forwarder's figures for `clh-writerd stats` (table) and the Prometheus metrics."""

from typing import Any, Dict, Iterator, List


def render_forward(fwd: Dict[str, Any], table: Any) -> List[str]:
    """The FORWARD block of ``clh-writerd stats`` (``table`` is the stats module's column formatter)."""
    state = "connected" if fwd["connected"] else f"DISCONNECTED ({fwd['last_error'] or 'not yet connected'})"
    out = [
        f"FORWARD to {fwd['target']}: {state}",
        f"  sent={fwd['sent']} acked={fwd['acked']} resent={fwd['resent']} in_flight={fwd['in_flight']} "
        f"reconnects={fwd['reconnects']} protocol_errors={fwd['protocol_errors']}",
        f"  lost_segments={fwd['lost_segments']} lost_bytes={fwd['lost_bytes']} gaps={fwd['gaps']} "
        f"held_bytes={fwd['held_bytes']}",
    ]
    rows = [[f["path"], str(f["lag_bytes"]), f"{f['lag_seconds']:.1f}"] for f in fwd["files"]]
    return out + table(["path", "lag bytes", "lag s"], rows)


FORWARD_COUNTERS = ("sent", "acked", "resent", "reconnects", "protocol_errors", "lost_segments", "lost_bytes",
                    "gaps", "split_lines")


def forward_metrics(fwd: Dict[str, Any], prefix: str) -> Iterator[Any]:
    """Prometheus families for the ``forward`` stats object (used by daemon/metrics.py)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    connected = GaugeMetricFamily(prefix + "forward_connected", "1 while a RELP session to the central is open",
                                  labels=["target"])
    connected.add_metric([fwd["target"]], 1.0 if fwd["connected"] else 0.0)
    yield connected
    events = CounterMetricFamily(prefix + "forward_events", "forwarding counters (docs/forwarding.md)",
                                 labels=["event"])
    for name in FORWARD_COUNTERS:
        events.add_metric([name], fwd[name])
    yield events
    for key, doc in (("in_flight", "RELP frames waiting for an ack"),
                     ("held_bytes", "bytes kept alive only by the hold (disk budget in use)")):
        gauge = GaugeMetricFamily(prefix + "forward_" + key, doc)
        gauge.add_metric([], fwd[key])
        yield gauge
    for key, doc in (("lag_bytes", "bytes of the file not yet acknowledged by the central"),
                     ("lag_seconds", "seconds since the file was last fully acknowledged")):
        gauge = GaugeMetricFamily(prefix + "forward_" + key, doc, labels=["path"])
        for f in fwd["files"]:
            gauge.add_metric([f["path"]], f[key])
        yield gauge
