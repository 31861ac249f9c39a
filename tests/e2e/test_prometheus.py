"""The shipped alert rules (deploy/prometheus/clh-writerd.rules.yml) against
promtool and against a real Prometheus scraping a live daemon (issue 15).

- ``promtool check rules`` and ``promtool test rules`` (the unit tests in
  clh-writerd.rules.test.yml pin every rule's expression *and* its ``for``
  on synthetic series);
- end to end: Prometheus (Debian's package) scrapes a daemon every second
  and evaluates the rules every second; a real client process that drops
  makes "ClhWriterdClientDropping" fire, one that falls back makes
  "ClhWriterdClientInFallback" fire, and nothing fires for the quiet one.
  The rules Prometheus loads are the shipped file with only ``for`` set to
  0s (waiting minutes is promtool's job above): the expressions are the
  shipped ones, over the daemon's real exposition.
"""

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import yaml
from support.debian import require_debian_packages
from support import free_tcp_port, seq_record, wait_for
from support.monitoring import TroubledClient, stop_all

from clh_writerd import protocol

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "clh-writerd.rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "clh-writerd.rules.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    require_debian_packages(["prometheus"], ["prometheus", "promtool"])
    return shutil.which("promtool") or "promtool"


def test_the_rules_pass_promtool_check(promtool):
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_the_rules_pass_their_unit_tests(promtool):
    result = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_cover_every_rule():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {case["alertname"] for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in t.get("alert_rule_test", [])}
    assert alerts == tested
    # docs/operations.md shows the shipped file's alerts by name.
    text = (REPO / "docs" / "operations.md").read_text()
    assert all(name in text for name in alerts)


# -- a real Prometheus ---------------------------------------------------------------
class Prometheus:
    """``prometheus`` scraping ``target`` every second, with ``rules``; stop() ends it."""

    def __init__(self, workdir: Path, target: str, rules: Dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules.yml").write_text(yaml.safe_dump(rules))
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yml")],
            "scrape_configs": [{"job_name": "clh-writerd", "static_configs": [{"targets": [target]}]}],
        }))
        self.port = free_tcp_port()
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=log)
        wait_for(self._ready, timeout=60, what="prometheus ready", interval=0.1)

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return json.loads(response.read().decode()) if path.startswith("/api") else response.read()

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log()}")
        try:
            self._get("/-/ready")
            return True
        except OSError:
            return False

    def alerts(self) -> List[Dict[str, Any]]:
        """The active alerts (pending or firing), from /api/v1/alerts."""
        reply = self._get("/api/v1/alerts")
        assert reply["status"] == "success", reply
        return reply["data"]["alerts"]

    def firing(self, name: str) -> List[Dict[str, str]]:
        return [a["labels"] for a in self.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rules_without_for() -> Dict[str, Any]:
    """The shipped rules, with ``for`` 0s: the expressions unchanged."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    return rules


@pytest.fixture
def monitored(promtool, start_daemon, tmp_path) -> Iterator[Any]:
    """(daemon, prometheus, clients list): a daemon with metrics, a Prometheus scraping it."""
    pytest.importorskip("prometheus_client")
    port = free_tcp_port()
    daemon = start_daemon(daemon={"metrics_listen": f"127.0.0.1:{port}"})
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{port}", rules_without_for())
    clients: List[TroubledClient] = []
    try:
        yield daemon, prometheus, clients
    finally:
        stop_all(clients)
        prometheus.stop()


def _quiet_client(daemon: Any, raw_client: Any) -> None:
    """A client that writes and reports no trouble: no alert may name it."""
    quiet = raw_client(daemon.endpoint, "quiet")
    records = [seq_record("q", i) for i in range(5)]
    assert isinstance(quiet.write(os.path.join(daemon.log_dir, "quiet.log"), records), protocol.Ack)
    quiet.send_raw(protocol.encode_report(quiet.client, {"dropped": 0, "fallback": 0}, id=1))
    assert isinstance(quiet.recv(), protocol.Ok)


def test_client_dropping_alert_fires_for_the_dropping_client(monitored, raw_client, tmp_path):
    daemon, prometheus, clients = monitored
    _quiet_client(daemon, raw_client)
    path = os.path.join(daemon.log_dir, "flood.log")
    clients.append(TroubledClient(str(tmp_path), "flooder", path, daemon.endpoint, "drop"))
    firing = wait_for(lambda: prometheus.firing("ClhWriterdClientDropping"), timeout=60,
                      what="ClhWriterdClientDropping firing", interval=0.25)
    # The daemon's own view agrees: the flooder reported drops.
    (entry,) = [c for c in daemon.stats()["clients"] if c["program"] == "flooder"]
    assert entry["reported"]["dropped"] > 0
    # The file label is the handler's file once clients report it (issue 15 reports); Prometheus drops an empty label.
    assert [(a["program"], a.get("file", ""), a["severity"]) for a in firing] == \
        [("flooder", entry.get("file") or "", "critical")], firing
    assert not prometheus.firing("ClhWriterdClientInFallback")


def test_client_in_fallback_alert_fires_for_the_falling_back_client(monitored, raw_client, tmp_path):
    daemon, prometheus, clients = monitored
    _quiet_client(daemon, raw_client)
    # Outside allowed_dirs: the daemon answers forbidden_path and the handler writes the file itself.
    path = str(tmp_path / "elsewhere" / "app.log")
    clients.append(TroubledClient(str(tmp_path), "faller", path, daemon.endpoint, "fallback"))
    wait_for(lambda: os.path.exists(path) and os.path.getsize(path) > 0, timeout=30, what="fallback writes")

    def reports_fallback() -> bool:
        return any(c["program"] == "faller" and c.get("state") == "fallback" for c in daemon.stats()["clients"])

    # A forbidden path is still a daemon that answers: the client reports its fallback state.
    wait_for(reports_fallback, timeout=30, what="the daemon to hear the client's fallback state")
    firing = wait_for(lambda: prometheus.firing("ClhWriterdClientInFallback"), timeout=60,
                      what="ClhWriterdClientInFallback firing", interval=0.25)
    assert [(a["program"], a["severity"]) for a in firing] == [("faller", "warning")], firing
    assert firing[0]["file"] == path
    assert not prometheus.firing("ClhWriterdClientDropping")


# -- the scrape and `stats --json` agree --------------------------------------------------
def _scrape(port: int) -> Dict[Any, float]:
    parser = pytest.importorskip("prometheus_client.parser")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def _group_totals(doc: Dict[str, Any]) -> Dict[Any, float]:
    """What the metrics must show, summed from the stats document: per (program, file), live + gone."""
    totals: Dict[Any, float] = {}
    for entry in doc["clients"] + doc["clients_gone"]:
        labels = (("file", entry["file"] or ""), ("program", entry["program"]))
        key = ("clh_writerd_client_records_total", labels)
        totals[key] = totals.get(key, 0) + entry["records_received"]
        for name, value in entry["reported"].items():
            key = ("clh_writerd_client_reported_total", tuple(sorted(labels + (("counter", name),))))
            totals[key] = totals.get(key, 0) + value
    return totals


def test_the_scrape_shows_the_stats_totals_before_and_after_clients_are_folded(start_daemon, tmp_path):
    pytest.importorskip("prometheus_client")
    port = free_tcp_port()
    daemon = start_daemon(daemon={"metrics_listen": f"127.0.0.1:{port}", "clients_gone_after": 1.0})
    clients = [TroubledClient(str(tmp_path), "flooder", os.path.join(daemon.log_dir, "flood.log"), daemon.endpoint,
                              "drop"),
               TroubledClient(str(tmp_path), "steady", os.path.join(daemon.log_dir, "steady.log"), daemon.endpoint,
                              "steady")]
    try:
        def both() -> bool:
            seen = {c["program"]: c for c in daemon.stats()["clients"]}
            return bool(seen.get("flooder", {}).get("reported", {}).get("dropped")) and \
                seen.get("steady", {}).get("reported", {}).get("acked", 0) > 0

        wait_for(both, timeout=30, what="the flooder's drops and the steady client's acks reported")
    finally:
        stop_all(clients)  # killed: their last reports stand

    def agree() -> Any:
        doc = daemon.stats()
        totals, scraped = _group_totals(doc), _scrape(port)
        return (doc, scraped) if all(scraped.get(k) == v for k, v in totals.items()) else None

    doc, listed = wait_for(agree, timeout=10, what="the scrape to show the stats document's totals")
    assert doc["clients"] and any(v > 0 for (name, labels), v in listed.items()
                                  if name == "clh_writerd_client_reported_total" and ("counter", "dropped") in labels)
    # Not seen for clients_gone_after (1 s): folded into clients_gone, and the series do not move
    # (tests/unit/daemon/test_metrics.py shows that is the gone totals, not the exporter's held high).
    folded = wait_for(lambda: (lambda d: d if not d["clients"] and d["clients_gone"] else None)(daemon.stats()),
                      timeout=15, what="the killed clients folded into clients_gone")
    assert {g["program"] for g in folded["clients_gone"]} == {"flooder", "steady"}
    after = _scrape(port)
    for key, value in _group_totals(folded).items():
        assert after[key] == value == listed[key], key
    assert after[("clh_writerd_clients_gone", (("file", os.path.join(daemon.log_dir, "flood.log")),
                                               ("program", "flooder")))] == 1
