"""Three hosts forward to one central rsyslogd over RELP: nothing is missing, duplicates stay bounded.

Each scenario runs real processes in network namespaces (tests/e2e/forwarding/netlab.py):
apps -> clh-writerd (files, rotation, gzip) -> forwarder thread -> RELP -> central
rsyslogd (the config `clh-writerd forward-config rsyslog` prints). The oracle reads
the central file. Duplicates the forwarding adds are the central's duplicates minus
those already in the hosts' own files (a killed daemon's clients replay), and must
stay within docs/forwarding.md's bound: per lost session, the frames in flight
(``window``); per forwarder crash, that plus what was acked since the last
checkpoint write.
"""

import glob
import os
import subprocess
import sys
import time

import pytest

from support import check_sequences, wait_for

from .certs import Certs, central_tls_args

pytestmark = pytest.mark.guarantee

HOSTS = (1, 2, 3)
RATE = 400        # records/s per app
COUNT = 3000      # per app: ~7.5 s of load
WINDOW = 256


def start_load(lab, apps_per_host: int = 2, count: int = COUNT, max_bytes: int = 10 * 1024 * 1024) -> None:
    for host in HOSTS:
        for a in range(apps_per_host):
            lab.start_app(host, f"h{host}a{a}", count, RATE, max_bytes)


def assert_forwarded(lab, guarantee, scenario: str, events: int, crash_slack: int = 0, counted: bool = True):
    """0 missing at the central; forwarding duplicates <= events * window (+ crash_slack); returns the report.

    ``counted``: no forwarder restarted, so every duplicate it added is in its ``resent`` counter.
    """
    lab.wait_apps()
    local = lab.local_report()
    local.assert_complete(allow_duplicates=True)
    report = lab.wait_central_complete()
    added = report.duplicates - local.duplicates
    bound = events * WINDOW + crash_slack
    guarantee(scenario, "central file over RELP", report.expected, report.missing_count, report.duplicates,
              f"{added} added by forwarding (bound {bound})")
    print(f"{scenario}: {report.expected} records, {report.missing_count} missing, {report.duplicates} duplicates"
          f" ({local.duplicates} already in the hosts' files, {added} added by forwarding; bound {bound})")
    report.assert_complete(allow_duplicates=True)
    assert 0 <= added <= bound, f"{added} duplicates added by forwarding, bound {bound}"
    for host in HOSTS:  # nothing lost means nothing counted as lost either: no false alarm
        fwd = lab.forward_stats(host)
        assert (fwd["gaps"], fwd["lost_segments"], fwd["protocol_errors"]) == (0, 0, 0), (host, fwd)
    if counted:
        resent = sum(lab.forward_stats(h)["resent"] for h in HOSTS)
        assert added <= resent, f"{added} duplicates but only {resent} counted as resent"
    return report


def test_steady_load_reaches_the_central_exactly_once(lab, guarantee):
    lab = lab()
    for host in HOSTS:
        lab.start_host(host)
    start_load(lab)
    report = assert_forwarded(lab, guarantee, "steady load, 3 hosts", events=0)
    assert report.duplicates == 0
    records = lab.central_records()
    # Every record carries a stable id: no two distinct lines share (host, id).
    assert len({(r[0], r[2]) for r in records}) == len(records)
    stats = lab.forward_stats(1)
    wait_for(lambda: lab.forward_stats(1)["files"][0]["lag_bytes"] == 0, 10, "host 1 to report no lag")
    assert stats["connected"] and stats["acked"] >= 2 * COUNT and stats["resent"] == 0
    table = subprocess.run([sys.executable, "-m", "clh_writerd", "stats", "--config", lab.daemons[1].config_path],
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 0, table.stderr
    assert "FORWARD to 10.213.1.1:2514: connected" in table.stdout
    forward_block = table.stdout.split("FORWARD to", 1)[1]
    assert "protocol_errors=0" in forward_block and "lost_bytes=0 gaps=0" in forward_block, forward_block
    row = [line for line in forward_block.splitlines() if line.startswith(lab.host_log(1))]
    assert row and row[0].split()[1:] == ["0", "0.0"], forward_block  # lag bytes, lag seconds


def test_central_killed_mid_load_loses_nothing(lab, guarantee):
    lab = lab()
    for host in HOSTS:
        lab.start_host(host)
    start_load(lab)
    wait_for(lambda: len(lab.central_records()) > 3000, 30, "the central to receive records")
    lab.kill_central()
    wait_for(lambda: not lab.forward_stats(1)["connected"], 15, "host 1 to notice the central is gone")
    lab.start_central()
    assert_forwarded(lab, guarantee, "central rsyslogd SIGKILLed mid-load", events=len(HOSTS))
    assert all(lab.forward_stats(h)["reconnects"] >= 1 for h in HOSTS)


def test_forwarder_killed_mid_load_resends_from_the_checkpoint(lab, guarantee):
    lab = lab()
    for host in HOSTS:
        lab.start_host(host)
    start_load(lab, max_bytes=100 * 1024)  # segments rotate and gzip while the forwarder is down
    wait_for(lambda: lab.forward_stats(2)["acked"] > 1500, 30, "host 2 to forward records")
    lab.daemons[2].kill()  # SIGKILL: daemon and forwarder thread die together
    time.sleep(2.0)  # the outage itself: apps write through their fallback and rotate meanwhile
    lab.start_host(2)
    # Acked but not yet checkpointed: at most checkpoint_interval (0.2 s) of acks, 2 apps at RATE, plus slack.
    assert_forwarded(lab, guarantee, "host daemon + forwarder SIGKILLed mid-load", events=1,
                     crash_slack=2 * RATE, counted=False)


def test_link_down_for_ten_seconds(lab, guarantee):
    lab = lab()
    for host in HOSTS:
        lab.start_host(host)
    start_load(lab, count=5000)
    wait_for(lambda: lab.forward_stats(3)["acked"] > 1000, 30, "host 3 to forward records")
    down_at = time.monotonic()
    lab.link(3, up=False)
    wait_for(lambda: not lab.forward_stats(3)["connected"], 15, "host 3 to drop the dead session")
    wait_for(lambda: lab.forward_stats(3)["files"][0]["lag_bytes"] > 0, 10, "host 3 to fall behind")
    time.sleep(max(0.0, down_at + 10.0 - time.monotonic()))  # the outage itself lasts 10 s
    behind = lab.forward_stats(3)["files"][0]
    assert behind["lag_seconds"] >= 5, behind
    lab.link(3, up=True)
    assert_forwarded(lab, guarantee, "host link down ~10 s", events=1)


def test_rotation_with_gzip_under_load(lab, guarantee):
    lab = lab()
    for host in HOSTS:
        lab.start_host(host)
    start_load(lab, max_bytes=100 * 1024)
    report = assert_forwarded(lab, guarantee, "gzip rotation every 100 KB under load", events=0)
    assert report.duplicates == 0
    for host in HOSTS:
        assert len(glob.glob(lab.host_log(host) + ".*.gz")) >= 2, "the scenario must rotate"


def test_a_tls_central_accepts_only_the_hosts_it_names(lab, tmp_path):
    """Issue 29, row 2, across hosts: the central (generated with --tls --tls-permit) takes host 1's
    certificate; host 2's (a foreign CA, a permitted name) and host 3's (self-signed, a permitted
    name) are refused, and those hosts say so (not connected, everything still lagging)."""
    (tmp_path / "certs").mkdir()
    certs = Certs(tmp_path / "certs")
    ca, foreign = certs.ca("ca"), certs.ca("foreign-ca")
    server = certs.cert("central", dns=["central.lab"], ips=[f"10.213.{h}.1" for h in HOSTS], ca=ca)
    clients = {1: certs.cert("h1", dns=["h1.lab"], ca=ca), 2: certs.cert("h2", dns=["h2.lab"], ca=foreign),
               3: certs.cert("h3", dns=["h3.lab"])}
    lab = lab(central_args=central_tls_args(ca, server, [f"h{h}.lab" for h in HOSTS]))
    for host in HOSTS:
        lab.host_forward[host] = {"tls": True, "tls_ca_file": ca[0], "tls_cert_file": clients[host][0],
                                  "tls_key_file": clients[host][1]}
        lab.start_host(host)
        lab.start_app(host, f"h{host}a0", 500, RATE)
    lab.wait_apps()
    wait_for(lambda: check_sequences([r[3] for r in lab.central_records()], {"h1a0": 500},
                                     payloads=False).missing_count == 0, 30, "host 1's records")
    for host in (2, 3):
        wait_for(lambda h=host: lab.forward_stats(h)["last_error"], 20, f"host {host}'s refused session")
        wait_for(lambda h=host: lab.forward_stats(h)["files"][0]["lag_bytes"] == os.path.getsize(lab.host_log(h)),
                 10, f"host {host} to report its whole file as lagging")
        fwd = lab.forward_stats(host)
        assert not fwd["connected"] and fwd["acked"] == 0, fwd
    records = lab.central_records()
    assert {r[0] for r in records} == {"h1"}
    check_sequences([r[3] for r in records], {"h1a0": 500}, payloads=False).assert_complete()
