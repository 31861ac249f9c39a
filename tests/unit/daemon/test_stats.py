"""What the daemon counts and shows: the latency window, the client LRU, the
stats document's schema (and that docs/stats.md documents every key), and
the table ``clh-writerd stats`` prints."""

import json
import os
import re
import time

import pytest

from clh_writerd import __version__, protocol
from clh_writerd.daemon.stats import (
    DAEMON_COUNTERS,
    STATS_SCHEMA,
    DaemonStats,
    GoneClients,
    FileStats,
    LatencyWindow,
)
from clh_writerd.daemon.view import render_table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
STATS_DOC = os.path.join(REPO, "docs", "stats.md")

DAEMON_KEYS = {"version", "pid", "host", "endpoint", "started", "uptime_s", "counters", "refused_uids", "limits"}
FILE_KEYS = {
    "path", "options", "queue_depth", "queue_capacity", "queue_bytes", "records_received", "bytes_received",
    "records_written", "bytes_written", "batches_written", "writes", "rotations", "write_errors",
    "last_error", "busy_refusals", "option_conflicts", "fsyncs", "write_latency_p50_ms",
    "write_latency_p99_ms",
}
CLIENT_KEYS = {
    "host", "pid", "program", "session", "first_seen", "last_seen", "records_received",
    "batches_received", "sync_records", "errors", "reported", "peer_uid", "peer_gid", "peer_pid", "peer_key",
    "file", "state", "last_error", "closed",
}


def client_id(n: int, program: str = "app") -> protocol.ClientId:
    return protocol.ClientId("host1", 1000 + n, program, f"session-{n}")


def populated() -> DaemonStats:
    stats = DaemonStats("ipc:///tmp/x/w.sock", max_clients=10)
    f = FileStats("/var/log/app/requests.log", {"maxBytes": 1024, "backupCount": 3}, capacity=256)
    f.records_received, f.records_written, f.bytes_written, f.batches_written = 1500, 1234, 56789, 15
    f.rotations, f.queue_depth = 2, 3
    for ms in (1, 2, 3, 4, 100):
        f.latency.add(ms / 1000)
    stats.files[f.path] = f
    c = stats.client(client_id(1, "billing-worker"))
    c.records, c.batches = 1234, 15
    c.reported.update({"dropped": 7, "fallback": 11, "resent": 13})
    stats.count("frames_received", 16)
    stats.count("forbidden_path")
    return stats


# -- LatencyWindow ------------------------------------------------------------
def test_empty_window_has_no_percentiles():
    assert LatencyWindow().percentile(50) is None
    assert LatencyWindow().percentile(99) is None


def test_single_sample_is_every_percentile():
    w = LatencyWindow()
    w.add(0.25)
    assert [w.percentile(p) for p in (0, 50, 99, 100)] == [0.25] * 4


def test_percentiles_of_a_known_distribution():
    w = LatencyWindow(size=1000)
    for v in reversed(range(1, 1001)):  # order of arrival must not matter
        w.add(float(v))
    assert w.percentile(0) == 1.0
    assert w.percentile(50) in (500.0, 501.0)
    assert w.percentile(99) in (990.0, 991.0)
    assert w.percentile(100) == 1000.0


def test_p99_sees_a_rare_slow_write():
    w = LatencyWindow(size=100)
    for _ in range(98):
        w.add(0.001)
    w.add(0.5)
    w.add(0.5)
    assert w.percentile(50) == 0.001
    assert w.percentile(99) == 0.5


def test_window_keeps_only_the_latest_samples():
    w = LatencyWindow(size=10)
    for _ in range(1000):
        w.add(9.0)
    for _ in range(10):
        w.add(1.0)
    assert w.percentile(100) == 1.0
    assert len(w._samples) == 10


# -- DaemonStats --------------------------------------------------------------
def test_client_entries_are_bounded_least_recently_seen_first():
    stats = DaemonStats("ipc:///x", max_clients=3)
    for n in range(3):
        stats.client(client_id(n)).records += 1
    stats.client(client_id(0))  # seen again: now the most recent
    stats.client(client_id(3))
    stats.client(client_id(4))
    assert list(stats.clients) == [client_id(0), client_id(3), client_id(4)]
    # The surviving entry kept its counts.
    assert stats.clients[client_id(0)].records == 1


def test_client_entry_is_reused_and_last_seen_moves():
    stats = DaemonStats("ipc:///x", max_clients=5)
    first = stats.client(client_id(1))
    first.last_seen = first.first_seen = time.time() - 60
    again = stats.client(client_id(1))
    assert again is first and len(stats.clients) == 1
    assert again.last_seen > again.first_seen + 59


def test_a_new_session_of_the_same_pid_is_a_new_client():
    stats = DaemonStats("ipc:///x", max_clients=5)
    stats.client(protocol.ClientId("h", 1, "app", "s1"))
    stats.client(protocol.ClientId("h", 1, "app", "s2"))
    assert len(stats.clients) == 2


def test_count_starts_every_known_counter_at_zero():
    stats = DaemonStats("ipc:///x", max_clients=5)
    assert stats.counters == dict.fromkeys(DAEMON_COUNTERS, 0)
    stats.count("bad_options")
    stats.count("bad_options", 2)
    assert stats.counters["bad_options"] == 3
    # Every protocol error code has its counter.
    assert set(protocol.ERROR_CODES) <= set(DAEMON_COUNTERS)


# -- the document -------------------------------------------------------------
def test_snapshot_has_the_documented_schema():
    doc = populated().snapshot()
    assert set(doc) == {"schema", "daemon", "files", "clients", "clients_gone"}
    assert doc["schema"] == STATS_SCHEMA == 1
    assert set(doc["daemon"]) == DAEMON_KEYS
    assert set(doc["daemon"]["counters"]) == set(DAEMON_COUNTERS)
    assert doc["daemon"]["version"] == __version__ and doc["daemon"]["pid"] == os.getpid()
    assert doc["daemon"]["counters"]["frames_received"] == 16
    [f] = doc["files"]
    assert set(f) == FILE_KEYS
    assert f["records_written"] == 1234 and f["queue_capacity"] == 256
    assert f["write_latency_p50_ms"] == 3.0 and f["write_latency_p99_ms"] == 100.0
    [c] = doc["clients"]
    assert set(c) == CLIENT_KEYS
    assert c["program"] == "billing-worker" and c["reported"]["dropped"] == 7
    # It travels as msgpack and prints as JSON unchanged.
    assert json.loads(json.dumps(doc)) == doc
    reply = protocol.decode_reply(protocol.encode_ok(0, doc))
    assert reply.data == doc


def test_snapshot_of_an_idle_daemon():
    doc = DaemonStats("ipc:///x", max_clients=5).snapshot()
    assert doc["files"] == [] and doc["clients"] == []
    assert doc["daemon"]["uptime_s"] >= 0
    f = FileStats("/l/a.log", {}, 4).snapshot()
    assert f["write_latency_p50_ms"] is None and f["write_latency_p99_ms"] is None


def test_a_large_document_is_cut_to_its_budget_with_trouble_first_and_totals_for_the_rest():
    import msgpack

    from clh_writerd.daemon.access import Peer

    stats = DaemonStats("ipc:///x", max_clients=5000)
    mallory, alice = Peer(1001, 1001, 7), Peer(1000, 1000, 8)
    for n in range(3000):  # the reports: long fields from thousands of sessions
        stats.report(protocol.ClientId("h" * 256, n, "p" * 256, f"s{n}"), {"sent": 1}, mallory, "daemon",
                     "/f" * 2000, "e" * 256)
    troubled = stats.client(protocol.ClientId("host", 1, "troubled", "t"), alice)
    troubled.reported["dropped"] = 3
    stats.client(protocol.ClientId("host", 2, "calm", "c"), alice)  # seen last, no trouble
    for n in range(500):
        f = FileStats(f"/logs/{'d' * 200}/{n}.log", {"encoding": "utf-8"}, 8)
        f.seen_from(mallory.principal)
        stats.files[f.path] = f
    alice_file = FileStats("/logs/alice.log", {}, 8)
    alice_file.seen_from(alice.principal)
    stats.files[alice_file.path] = alice_file
    whole = len(msgpack.packb(stats.snapshot()))
    assert whole > 14 * 1024 * 1024  # 3,000 of the 10,000 clients (51 MB)

    budget = 256 * 1024
    doc = stats.snapshot(budget=budget)
    assert len(msgpack.packb(doc)) <= budget
    assert doc["clients"][0]["program"] == "troubled" and doc["clients"][1]["program"] == "calm"
    cut = doc["truncated"]
    assert cut["clients"] == 3002 - len(doc["clients"]) > 0 and cut["files"] == 501 - len(doc["files"]) > 0
    assert cut["reported"]["sent"] == cut["clients"] and stats.counters["stats_truncated"] == 1
    # A peer sees its own clients and the files they wrote, nothing of the others'.
    own = stats.snapshot(scope=alice.principal, budget=budget)
    assert {c["program"] for c in own["clients"]} == {"troubled", "calm"}
    assert [f["path"] for f in own["files"]] == ["/logs/alice.log"] and "truncated" not in own
    assert own["clients_gone"] == [] and own["daemon"]["refused_uids"] == {}


def _documented_keys() -> set:
    with open(STATS_DOC) as f:
        text = f.read()
    # Keys are written as `name` in the document's tables.
    return set(re.findall(r"`([a-z0-9_]+)`", text))


def test_docs_stats_md_documents_every_key():
    documented = _documented_keys()
    every = {"schema", "daemon", "files", "clients", "clients_gone", "truncated"} | DAEMON_KEYS | FILE_KEYS | CLIENT_KEYS | set(DAEMON_COUNTERS)
    missing = sorted(every - documented)
    assert not missing, f"docs/stats.md does not document {missing}"


def test_docs_stats_md_names_the_table_columns_and_exit_codes():
    with open(STATS_DOC) as f:
        text = f.read()
    for column in ("path", "queue", "recv", "written", "bytes", "batches", "rot", "errors", "p50ms", "p99ms",
                   "host", "program", "pid", "file", "state", "last seen", "recv", "sent", "acked", "dropped", "fallback",
                   "resent", "rec/s", "bytes/s", "size", "recv/s", "drop/s", "fback/s", "resent/s"):
        assert f"`{column}`" in text, column
    for code in ("0", "1", "2"):
        assert re.search(rf"^\|\s*`?{code}`?\s*\|", text, re.M), f"exit code {code}"


# -- the table ----------------------------------------------------------------
def test_table_of_an_idle_daemon():
    doc = DaemonStats("ipc:///tmp/x/w.sock", max_clients=5).snapshot()
    text = render_table(doc)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[0].startswith(f"clh-writerd {__version__}  pid {os.getpid()}")
    assert "endpoint ipc:///tmp/x/w.sock" in lines[0]
    assert lines[1] == "counters: none"
    files_at, clients_at = lines.index("FILES"), lines.index("CLIENTS")
    # Headers and no rows.
    assert lines[files_at + 1].split() == ["path", "queue", "recv", "written", "bytes", "batches", "rot",
                                          "errors", "p50ms", "p99ms"]
    assert lines[files_at + 2] == ""
    assert lines[clients_at + 1].split() == ["host", "program", "pid", "file", "state", "last", "seen", "recv",
                                            "sent", "acked", "fallback", "dropped", "resent", "errors"]
    assert len(lines) == clients_at + 2


def test_table_shows_files_clients_and_nonzero_counters():
    stats = populated()
    stats.files["/var/log/app/requests.log"].last_error = "OSError: disk full"
    stats.files["/var/log/app/requests.log"].option_conflicts = 2
    text = render_table(stats.snapshot())
    lines = text.splitlines()
    assert lines[1] == "counters: frames_received=16  forbidden_path=1"
    row = next(line for line in lines if line.startswith("/var/log/app/requests.log"))
    assert row.split() == ["/var/log/app/requests.log", "3/256", "1500", "1234", "56789", "15", "2", "0",
                           "3.00", "100.00"]
    client = next(line for line in lines if line.startswith("host1 "))
    # No file (a client that never said), state "daemon" (it sent batches), sent/acked never reported: "-".
    assert client.split() == ["host1", "billing-worker", "1001", "-", "daemon", "0.0s", "ago", "1234", "-", "-", "11",
                              "7", "13", "0"]
    assert "last error on /var/log/app/requests.log: OSError: disk full" in text
    assert "2 conflicting option declaration(s) on /var/log/app/requests.log" in text


def test_table_columns_line_up():
    stats = populated()
    stats.files["/l/b.log"] = FileStats("/l/b.log", {}, 8)
    lines = render_table(stats.snapshot()).splitlines()
    at = lines.index("FILES")
    block = lines[at + 1:at + 4]
    # The right-aligned last column ends at the same place on every line.
    assert len({len(line) for line in block}) == 1, block


@pytest.mark.parametrize("missing", ["dropped", "fallback", "resent"])
def test_table_shows_a_dash_for_counters_a_client_never_reported(missing):
    # "0" would be a false all-clear for a client that never reported (issue 15).
    stats = populated()
    entry = next(iter(stats.clients.values()))
    del entry.reported[missing]
    lines = render_table(stats.snapshot()).splitlines()
    cells = next(line for line in lines if line.startswith("host1 ")).split()
    column = {"fallback": 10, "dropped": 11, "resent": 12}[missing]
    assert cells[column] == "-"

# -- reports and gone clients (issue 15) -----------------------------------------------------
def test_a_report_keeps_state_file_error_and_closed_and_replaces_the_totals():
    stats = DaemonStats("ipc:///x", max_clients=5)
    stats.report(client_id(1), {"fallback": 10, "sent": 3}, state="fallback", file="/l/a.log",
                 error="daemon error forbidden_path: " + "x" * 500)
    stats.report(client_id(1), {"fallback": 12, "sent": 3}, state="stopped", final=True)
    [c] = stats.snapshot()["clients"]
    assert c["reported"] == {"fallback": 12, "sent": 3}  # totals, not increments
    assert c["state"] == "stopped" and c["file"] == "/l/a.log" and c["closed"] is True
    assert len(c["last_error"]) == protocol.MAX_REPORT_ERROR_CHARS
    stats.client(client_id(2))  # sent a batch, never reported (an older client)
    never = stats.snapshot()["clients"][1]
    assert never["state"] == "daemon" and never["file"] is None and never["closed"] is False


def test_gone_clients_are_folded_per_program_and_file_and_totals_never_go_down():
    stats = DaemonStats("ipc:///x", max_clients=3, clients_gone_after=60.0)
    for n in range(5):  # two evicted by max_clients at once
        stats.report(client_id(n, "api"), {"dropped": n}, file="/l/api.log")
        stats.client(client_id(n, "api")).records += 10
    assert len(stats.clients) == 3
    for entry in stats.clients.values():
        entry.last_seen -= 120
    assert stats.fold_gone() == 3
    doc = stats.snapshot()
    assert doc["clients"] == []
    assert doc["clients_gone"] == [{"program": "api", "file": "/l/api.log", "clients": 5, "records_received": 50,
                                    "reported": {"dropped": 0 + 1 + 2 + 3 + 4}}]
    stats.report(client_id(9, "api"), {"dropped": 1}, file="/l/api.log")  # a recent one stays listed
    assert stats.fold_gone() == 0 and len(stats.snapshot()["clients"]) == 1


def test_gone_groups_are_bounded_by_an_other_group():
    gone = GoneClients(max_groups=2)
    stats = DaemonStats("ipc:///x", max_clients=10)
    for n in range(4):
        stats.report(client_id(n, f"p{n}"), {"fallback": 1}, file=f"/l/{n}.log")
        gone.add(stats.clients[client_id(n, f"p{n}")])
    groups = gone.snapshot()
    assert len(groups) == 3 and groups[-1]["program"] == "(other)" and groups[-1]["clients"] == 2
    assert sum(g["reported"]["fallback"] for g in groups) == 4
