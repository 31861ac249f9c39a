"""The metrics collector's client series (issue 15): per (program, file),
live clients plus the gone groups, counters that never go down, clients per
state, and the metrics_per_client opt-in. Scrapes of a live daemon are in
tests/e2e/test_operations.py and tests/e2e/test_prometheus.py."""

import copy
from typing import Any, Dict, Tuple

import pytest

pytest.importorskip("prometheus_client")

from clh_writerd.daemon.metrics import StatsCollector  # noqa: E402
from clh_writerd.daemon.stats import DaemonStats  # noqa: E402


def client(pid: int, program: str, file: str, state: str = "daemon", records: int = 0, **reported: int
           ) -> Dict[str, Any]:
    return {"host": "h1", "pid": pid, "program": program, "session": f"s{pid}", "file": file, "state": state,
            "records_received": records, "last_seen": 1000.0 + pid, "reported": dict(reported)}


def collect(collector: StatsCollector) -> Dict[str, Dict[Tuple[Tuple[str, str], ...], float]]:
    samples: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]] = {}
    for family in collector.collect():
        for sample in family.samples:
            series = samples.setdefault(sample.name, {})
            key = tuple(sorted(sample.labels.items()))
            assert key not in series, f"duplicate series {sample.name}{key}"
            series[key] = sample.value
    return samples


def value(samples: Dict[str, Any], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def base() -> Dict[str, Any]:
    doc = DaemonStats("ipc:///x", max_clients=10).snapshot()
    doc["clients"] = [client(1, "web", "/l/a.log", records=100, dropped=5, sent=100),
                      client(2, "web", "/l/a.log", records=50, dropped=1, sent=60),
                      client(3, "cron", "/l/c.log", state="fallback", fallback=7)]
    doc["clients_gone"] = [{"program": "web", "file": "/l/a.log", "clients": 3, "records_received": 300,
                            "reported": {"dropped": 10, "sent": 300}}]
    return doc


def test_client_series_are_per_program_and_file_with_the_gone_clients():
    doc = base()
    samples = collect(StatsCollector(lambda: doc))
    assert value(samples, "clh_writerd_client_records_total", program="web", file="/l/a.log") == 450
    assert value(samples, "clh_writerd_client_reported_total", program="web", file="/l/a.log",
                 counter="dropped") == 16
    assert value(samples, "clh_writerd_client_reported_total", program="web", file="/l/a.log", counter="sent") == 460
    assert value(samples, "clh_writerd_client_reported_total", program="cron", file="/l/c.log",
                 counter="fallback") == 7
    assert value(samples, "clh_writerd_clients", program="web", file="/l/a.log", state="daemon") == 2
    assert value(samples, "clh_writerd_clients", program="web", file="/l/a.log", state="fallback") == 0
    assert value(samples, "clh_writerd_clients", program="cron", file="/l/c.log", state="fallback") == 1
    assert value(samples, "clh_writerd_clients_gone", program="web", file="/l/a.log") == 3
    assert value(samples, "clh_writerd_client_last_seen_timestamp_seconds", program="web", file="/l/a.log") == 1002.0
    # No pid or session anywhere by default: the series count is that of (program, file) pairs.
    assert not any(name.startswith("clh_writerd_process_") for name in samples)
    assert all("pid" not in dict(labels) for name, series in samples.items() if "client" in name
               for labels in series)


def test_a_worker_restart_adds_no_series_and_no_counter_goes_down():
    doc = base()
    collector = StatsCollector(lambda: doc)
    before = collect(collector)
    # Worker 1 exits and the daemon folds it into the gone group; a new worker (pid 4) starts.
    gone = doc["clients"].pop(0)
    doc["clients_gone"][0]["clients"] += 1
    doc["clients_gone"][0]["records_received"] += gone["records_received"]
    doc["clients_gone"][0]["reported"]["dropped"] += gone["reported"]["dropped"]
    doc["clients_gone"][0]["reported"]["sent"] += gone["reported"]["sent"]
    doc["clients"].append(client(4, "web", "/l/a.log", records=0))
    after = collect(StatsCollector(lambda: doc))  # a fresh collector: the totals, not a held high
    assert collect(collector) == after
    assert set(after["clh_writerd_client_records_total"]) == set(before["clh_writerd_client_records_total"])
    assert value(after, "clh_writerd_client_records_total", program="web", file="/l/a.log") == 450
    assert value(after, "clh_writerd_client_reported_total", program="web", file="/l/a.log", counter="dropped") == 16


def test_a_client_between_the_list_and_the_gone_groups_does_not_make_a_counter_go_down():
    doc = base()
    collector = StatsCollector(lambda: doc)
    collect(collector)
    doc["clients"].pop(0)  # evicted, and (in this made-up snapshot) not folded yet
    held = collect(collector)
    assert value(held, "clh_writerd_client_records_total", program="web", file="/l/a.log") == 450
    doc["clients"][0]["records_received"] += 200  # the group passes its old high
    assert value(collect(collector), "clh_writerd_client_records_total", program="web", file="/l/a.log") == 550


def test_a_client_without_file_or_state_is_in_the_empty_file_group_as_daemon():
    doc = base()
    doc["clients"] = [{k: v for k, v in client(9, "old", "").items() if k not in ("file", "state")}]
    doc["clients_gone"] = []
    samples = collect(StatsCollector(lambda: doc))
    assert value(samples, "clh_writerd_clients", program="old", file="", state="daemon") == 1


def test_metrics_per_client_adds_one_series_per_process():
    doc = base()
    doc["clients"].append(copy.deepcopy(doc["clients"][0]))  # another uid copying the claims: one series
    samples = collect(StatsCollector(lambda: doc, per_client=True))
    records = samples["clh_writerd_process_records_total"]
    assert sorted((dict(k)["pid"], v) for k, v in records.items()) == [("1", 100), ("2", 50), ("3", 0)]
    assert value(samples, "clh_writerd_process_reported_total", host="h1", pid="3", program="cron",
                 session="s3", file="/l/c.log", counter="fallback") == 7
    # The aggregated series are unchanged by the opt-in.
    assert value(samples, "clh_writerd_client_records_total", program="web", file="/l/a.log") == 550
