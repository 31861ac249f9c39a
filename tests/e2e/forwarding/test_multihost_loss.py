"""Loss in forwarding is never silent: each loss is counted, warned with its range, and its figures are exact.

Real processes in network namespaces (tests/e2e/forwarding/netlab.py): an app
logging through the real client with gzip rotation, a real clh-writerd with
[forward], the central rsyslogd running the generated config. The oracle reads
the central file and the host's own files; every record missing at the
central must be one the daemon named in a warning and counted, with the same
number of bytes.
"""

import re

import pytest

from support import seq_record, wait_for

pytestmark = pytest.mark.guarantee

GAP = re.compile(r"after segment ([0-9a-f]{10}) .* before segment ([0-9a-f]{10})")
LOST = re.compile(r"segment ([0-9a-f]{10}) \(.*\) was deleted before it was forwarded: (\d+) byte\(s\) lost")


def record_bytes(writer: str, n: int) -> int:
    """Bytes of record ``n`` in the host's file (tests/e2e/forwarding/app.py's line and its LF)."""
    return len(seq_record(writer, n, f"p{n}-" + "y" * (n % 50)).encode()) + 1


def seq(record) -> int:
    return int(record[3].split(" ")[2])


def caught_up(lab, host: int) -> bool:
    fwd = lab.forward_stats(host)
    return fwd["connected"] and fwd["in_flight"] == 0 and all(f["lag_bytes"] == 0 for f in fwd["files"])


@pytest.mark.parametrize("central_down", [False, True], ids=["central-up", "central-down-too"])
def test_a_daemon_outage_past_backupcount_is_one_named_gap(lab, guarantee, central_down):
    """The issue's row 1: the app rotates through its fallback (backupCount=3) while the daemon is dead.

    The segments written and deleted during the outage were never seen by the
    forwarder: after the restart it must find the break, count it once and
    name the two segments around it, and what the central lacks must be
    exactly the records between them.
    """
    lab = lab(hosts=1)
    daemon = lab.start_host(1)
    lab.start_app(1, "w", 6000, 1000, 20 * 1024, backups=3)  # ~70 KB/s: a rotation every ~0.3 s
    wait_for(lambda: lab.forward_stats(1)["acked"] > 800, 30, "records at the central before the outage")
    if central_down:
        lab.kill_central()
    daemon.kill()  # SIGKILL: daemon and forwarder die together
    lab.wait_apps()  # the outage: ~5 s of records through the fallback, ~15 rotations past backupCount=3
    if central_down:
        lab.start_central()
    lab.start_host(1)
    wait_for(lambda: caught_up(lab, 1), 60, "the host to forward everything it still has")

    fwd = lab.forward_stats(1)
    warnings = [line for line in daemon.stderr().splitlines() if "rotated away before the forwarder saw them" in line]
    assert len(warnings) == 1, warnings
    assert (fwd["gaps"], fwd["lost_segments"], fwd["lost_bytes"]) == (1, 0, 0), fwd
    before, after = GAP.search(warnings[0]).groups()
    records = lab.central_records()
    last_before = max(seq(r) for r in records if r[2].startswith(before + "."))
    first_after = min(seq(r) for r in records if r[2].startswith(after + "."))
    report = lab.central_report()
    guarantee("host daemon SIGKILLed while the app rotates past backupCount=3"
              + (" (central down too)" if central_down else ""), "central file over RELP", report.expected,
              report.missing_count, report.duplicates, "missing = exactly the range of the one gap counted and warned")
    assert first_after - last_before > 1, "the scenario must rotate segments away unseen"
    assert report.missing == {"w": list(range(last_before + 1, first_after))}
    assert not report.torn


def test_a_central_outage_past_the_hold_budget_is_counted_exactly(lab, guarantee):
    """The issue's rows 3 and 4: the hold lets segments go past its budget during a central outage.

    lag_bytes during the outage, lost_bytes and the warnings' figures must
    equal what the oracle measures, and last_error clears on reconnect.
    """
    lab = lab(hosts=1, hold_max_bytes=12_000)
    lab.kill_central()  # down from the start: nothing is acknowledged before the outage ends
    daemon = lab.start_host(1)
    count = 4000
    lab.start_app(1, "w", count, 1000, 20 * 1024, backups=2)
    lab.wait_apps()
    written = sum(record_bytes("w", n) for n in range(count))

    def lag_and_lost():
        fwd = lab.forward_stats(1)
        return fwd["files"][0]["lag_bytes"], fwd["lost_bytes"]

    # Everything written is either still to forward (lag) or counted as lost, to the byte.
    wait_for(lambda: sum(lag_and_lost()) == written, 20, f"lag + lost == {written} bytes written")
    lag, lost = lag_and_lost()
    fwd = lab.forward_stats(1)
    assert fwd["lost_segments"] >= 1 and fwd["gaps"] == 0, fwd
    assert fwd["held_bytes"] <= 12_000 and fwd["last_error"], fwd
    lab.start_central()
    wait_for(lambda: caught_up(lab, 1), 60, "the host to forward what the hold kept")

    report = lab.central_report()
    missing_bytes = sum(record_bytes("w", n) for n in report.missing.get("w", []))
    warned = [LOST.search(line) for line in daemon.stderr().splitlines() if "deleted before it was forwarded" in line]
    guarantee("central down, ~280 KB written, hold_max_bytes 12,000 (gzip)", "central file over RELP",
              report.expected, report.missing_count, report.duplicates,
              f"{fwd['lost_segments']} segments past the budget, counted: lost_bytes = missing bytes")
    assert missing_bytes == lost, f"lost_bytes {lost}, the oracle misses {missing_bytes} bytes"
    assert sum(int(m.group(2)) for m in warned) == lost and len(warned) == fwd["lost_segments"]
    assert written - missing_bytes == lag  # lag was exactly what then arrived
    assert report.duplicates == 0 and not report.torn
    after = lab.forward_stats(1)
    assert after["last_error"] == "" and after["lost_bytes"] == lost
