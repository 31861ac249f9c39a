"""Round two (issue 25): what stats tell whom, and how much the daemon says.

alice writes her file through the daemon; mallory, an admitted user of the
same group, asks `stats` and scrapes /metrics: she must see her own clients
and files and nothing of alice's. Root (a stats admin) sees everything. A
scrape with 10,000 clients is built within stats_max_bytes. And a client
that provokes a warning per message cannot flood the daemon's log.
"""

import encodings.idna  # noqa: F401 (before the forks: an attacker child cannot read the stdlib under /root)
import os
import socket
import time
import uuid

import pytest

from clh_writerd import protocol
from clh_writerd.client.control import request
from support import RawClient, free_tcp_port, wait_for

from .conftest import HonestClient, PingMonitor, describe_resources, resources, sigterm_within
from .test_budgets import DRAIN, crowd, serve, signal_file  # noqa: F401 (the module-scoped users)

pytest.importorskip("prometheus_client")


def scrape(port: int) -> str:
    """GET /metrics over a plain socket (nothing lazily imported in a forked child)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:200]
    return body.decode()


def test_stats_and_metrics_show_a_peer_only_its_own(crowd, start_daemon, base_dir, security_row):  # noqa: F811
    port = free_tcp_port()
    budget = 256 * 1024
    daemon = serve(start_daemon, base_dir, crowd, daemon={"metrics_listen": f"127.0.0.1:{port}"},
                   limits={"stats_max_bytes": budget, "max_clients": 10000})
    endpoint, logs = daemon.endpoint, daemon.log_dir
    alice_path = os.path.join(logs, "alice-secret-project.log")
    seen = signal_file(base_dir, "mallory-saw")

    def alice() -> None:
        client = RawClient(endpoint, "alice-app")
        try:
            assert isinstance(client.write(alice_path, ["alice 0"]), protocol.Ack)
        finally:
            client.close()

    def mallory() -> None:
        client = RawClient(endpoint, "mallory-app")
        try:
            mine = os.path.join(logs, "mallory.log")
            assert isinstance(client.write(mine, ["mallory 0"]), protocol.Ack)
            for start in range(0, 10000, 500):  # the issue: one scrape with 10k clients was 747 MB
                for n in range(start, start + 500):
                    who = protocol.ClientId("h" * 64, n, f"p{n}", uuid.uuid4().hex)
                    client.send_raw(protocol.encode_report(who, {"sent": n}, id=n, file="/f" * 500))
                for _ in range(500):
                    assert isinstance(client.recv(), protocol.Ok)
            reply = request(endpoint, protocol.encode_stats_request(), 10.0)
            assert isinstance(reply, protocol.Ok), reply
            text = scrape(port)
            with open(seen, "w") as f:
                f.write(repr(reply.data) + "\n" + text)
        finally:
            client.close()

    crowd.alice.run(alice)
    before = resources(daemon.proc.pid)
    with PingMonitor(endpoint) as pings:
        crowd.mallory.run(mallory)
        full = scrape(port)  # as root: a stats admin
        pings.stop()
    with open(seen) as f:
        hers = f.read()
    assert "alice" not in hers and "mallory.log" in hers.split("\n", 1)[0]  # her stats: her own
    assert "clh_writerd_events_total" in hers and "mallory.log" not in hers.split("\n", 1)[1]  # /metrics: daemon-wide
    doc = daemon.stats()
    assert {f["path"] for f in doc["files"]} >= {alice_path, os.path.join(logs, "mallory.log")}
    assert "alice-secret-project.log" in full and doc["truncated"]["clients"] > 0
    assert len(full.encode()) < 2 * budget, len(full)
    after = resources(daemon.proc.pid)
    took = sigterm_within(daemon, DRAIN)
    held = pings.assert_held()
    security_row("an admitted user asks stats and scrapes /metrics (loopback) while another user writes; "
                 "10,000 clients reported (was: every path shown to anyone, one scrape 747 MB, daemon at 2.26 GB)",
                 "a peer sees its own clients and files; /metrics gives a non-admin scraper the daemon-wide series "
                 "(its uid from the kernel's socket table); a scrape built within stats_max_bytes",
                 f"her stats and scrape without alice's path; root's scrape {len(full.encode()) // 1024} KiB with "
                 f"{doc['truncated']['clients']} clients summed (stats_max_bytes {budget // 1024} KiB); {held}; "
                 f"SIGTERM {took:.2f} s", 0, describe_resources(before, after))


def test_a_client_cannot_flood_the_daemons_log(crowd, start_daemon, base_dir, security_row):  # noqa: F811
    rate = 50
    daemon = serve(start_daemon, base_dir, crowd, daemon={"log_rate_limit": rate})
    endpoint, logs = daemon.endpoint, daemon.log_dir
    count = 5000
    outside = "/etc/clh-\x1b[31mforged\nline.log"

    def attack() -> None:
        client = RawClient(endpoint, "mallory")
        try:
            for _window in range(count // 500):
                for _ in range(500):
                    client.send_batch(outside, ["x"])
                for _ in range(500):
                    client.recv()
        finally:
            client.close()

    lines_before = len(daemon.stderr().splitlines())
    with HonestClient(endpoint, os.path.join(logs, "honest.log")) as honest, PingMonitor(endpoint) as pings:
        started = time.monotonic()
        crowd.mallory.run(attack)
        elapsed = time.monotonic() - started
        pings.stop()
        honest.stop()
    counters = daemon.stats()["daemon"]["counters"]
    wait_for(lambda: counters["forbidden_path"] == count, what="every refusal counted")
    log = daemon.stderr().splitlines()[lines_before:]
    took = sigterm_within(daemon, DRAIN)
    held = pings.assert_held()
    refused = [line for line in log if "refused a message" in line]
    assert len(refused) <= rate * (elapsed + 2), (len(refused), elapsed)
    assert counters["log_lines_suppressed"] >= count - len(refused) - rate
    assert any("suppressed by log_rate_limit" in line for line in log)
    assert not any("\x1b" in line for line in log) and not any(line.startswith("line.log") for line in log)
    security_row(f"{count} refused batches in {elapsed:.1f} s whose path holds an ESC sequence and a newline "
                 "(was: 50 MB of daemon log in 10 s)",
                 f"at most log_rate_limit ({rate}) lines a second, the rest counted (log_lines_suppressed) and "
                 "announced; control characters escaped",
                 f"{len(refused)} lines written, {counters['log_lines_suppressed']} suppressed, no raw ESC, no forged "
                 f"line; {held}; SIGTERM {took:.2f} s; honest client {honest.acked} records", honest.lost())
