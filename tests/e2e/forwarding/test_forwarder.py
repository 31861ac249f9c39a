"""The forwarding thread against a real rsyslogd on loopback, over real CLH files.

Rotation, gzip, retention and acknowledgements are driven by the real
concurrent-log-handler and the real imrelp; only the network is loopback
(the multi-host lab is test_multihost.py).
"""

import json
import logging
import os
import signal
import ssl

import pytest
from concurrent_log_handler import ConcurrentRotatingFileHandler

from support import check_sequences, per_writer_order, read_lines, seq_record, wait_for

from clh_writerd.daemon.config import config_from_mapping
from clh_writerd.forward import Forwarder, RelpClient, RelpError, options_from_config
from clh_writerd.forward.forwarder import CONFIGURED

from .certs import Certs, central_tls_args


@pytest.fixture
def forwarders():
    made = []

    def make(central, paths, state, **kw) -> Forwarder:
        # The configured keys go through the daemon's config loader (its defaults, its checks).
        section = {"target": central.target, "paths": [str(p) for p in paths], "state_file": str(state),
                   "hostname": "h1", **{k: v for k, v in kw.items() if k in CONFIGURED}}
        tuning = {"reconnect_interval": 0.2, "scan_interval": 0.2,
                  **{k: v for k, v in kw.items() if k not in CONFIGURED}}
        options = options_from_config(config_from_mapping({"forward": section}), **tuning)
        fw = Forwarder(options)
        made.append(fw)
        fw.start()
        return fw

    yield make
    for fw in made:
        fw.stop()


def clh_writer(path, max_bytes, backups, use_gzip=True):
    handler = ConcurrentRotatingFileHandler(str(path), maxBytes=max_bytes, backupCount=backups, use_gzip=use_gzip)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"fwtest.{path}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger, handler


def log(logger, writer, start, stop):
    for n in range(start, stop):
        logger.info(seq_record(writer, n, f"p{n}"))


def checkpoint_offsets(state):
    with open(state) as f:
        return {k: v["offset"] for k, v in json.load(f)["segments"].items()}


def live_file_held(fw, path) -> bool:
    held = set()
    for state in list(fw.checkpoint.segments.values()):
        try:
            held.add(os.stat(state.held).st_ino) if state.held else None
        except OSError:
            pass
    return os.stat(path).st_ino in held


def test_checkpoint_moves_only_over_acknowledged_records(central, forwarders, tmp_path):
    central.start()
    path = tmp_path / "app.log"
    logger, handler = clh_writer(path, 10**8, 1)
    log(logger, "w", 0, 100)
    fw = forwarders(central, [str(path)], tmp_path / "cp.json", window=50, timeout=2.0)
    wait_for(lambda: len(central.lines()) == 100, 20, "the first 100 records")
    wait_for(lambda: fw.checkpoint.saves and list(checkpoint_offsets(tmp_path / "cp.json").values()) == [path.stat().st_size],
             10, "the checkpoint to reach the end of the file")
    acked_size = path.stat().st_size
    central.freeze()  # the central accepts bytes (kernel) but acknowledges nothing
    try:
        log(logger, "w", 100, 1000)
        wait_for(lambda: fw.sent >= 150, 10, "a window of unacknowledged frames")
        assert list(checkpoint_offsets(tmp_path / "cp.json").values()) == [acked_size]
        wait_for(lambda: fw.reconnects >= 1, 10, "the ack timeout to drop the session")
        assert list(checkpoint_offsets(tmp_path / "cp.json").values()) == [acked_size]
    finally:
        central.signal(signal.SIGCONT)
    handler.close()
    report = check_sequences(central.lines(), {"w": 1000}, payloads=False)
    wait_for(lambda: check_sequences(central.lines(), {"w": 1000}, payloads=False).missing_count == 0, 30,
             "every record after the central thawed")
    report = check_sequences(central.lines(), {"w": 1000}, payloads=False)
    assert report.duplicates <= 50  # at most the window was in flight when the session dropped
    assert fw.resent >= report.duplicates


def test_rotated_and_compressed_backlog_is_sent_oldest_first(central, forwarders, tmp_path):
    path = tmp_path / "app.log"
    fw = forwarders(central, [str(tmp_path / "*.log")], tmp_path / "cp.json")
    logger, handler = clh_writer(path, 20_000, 100)
    log(logger, "w", 0, 4000)  # ~70 KB: three .gz segments written while the central is down
    handler.close()
    wait_for(lambda: fw.last_error, 10, "a refused connection")
    assert len(list(tmp_path.glob("app.log.*.gz"))) >= 3
    central.start()
    wait_for(lambda: check_sequences(central.lines(), {"w": 4000}, payloads=False).missing_count == 0, 30,
             "the whole backlog at the central")
    report = check_sequences(central.lines(), {"w": 4000}, payloads=False)
    report.assert_complete()
    assert per_writer_order(central.lines()) == {"w": True}
    wait_for(lambda: fw.snapshot()["files"][0]["lag_bytes"] == 0, 10, "no lag")
    assert fw.snapshot()["lost_segments"] == 0


def test_restart_resumes_from_the_checkpoint_without_duplicates(central, forwarders, tmp_path):
    central.start()
    path = tmp_path / "app.log"
    logger, handler = clh_writer(path, 20_000, 100)
    log(logger, "w", 0, 1000)
    fw = forwarders(central, [str(path)], tmp_path / "cp.json")
    wait_for(lambda: len(central.lines()) == 1000, 20, "1000 records")
    fw.stop()  # a clean stop writes the checkpoint
    log(logger, "w", 1000, 2000)
    handler.close()
    forwarders(central, [str(path)], tmp_path / "cp.json")
    wait_for(lambda: len(central.lines()) >= 2000, 20, "2000 records")
    check_sequences(central.lines(), {"w": 2000}, payloads=False).assert_complete()


def test_segments_deleted_before_forwarding_are_counted_and_warned(central, forwarders, tmp_path, caplog):
    path = tmp_path / "app.log"
    logger, handler = clh_writer(path, 5_000, 2)
    log(logger, "w", 0, 50)
    fw = forwarders(central, [str(path)], tmp_path / "cp.json", retention_grace=0.3, hold_max_bytes=0)
    wait_for(lambda: fw.checkpoint.segments, 10, "the forwarder to see the file")
    with caplog.at_level(logging.WARNING, logger="clh_writerd.forward"):
        log(logger, "w", 50, 3000)  # many rotations, backupCount=2: old segments are deleted unforwarded
        handler.close()
        wait_for(lambda: fw.lost_segments >= 1, 10, "the loss to be counted")
    assert fw.snapshot()["lost_bytes"] > 0
    assert any("deleted before it was forwarded" in r.getMessage() for r in caplog.records)
    central.start()
    on_disk = read_lines(str(path))
    wait_for(lambda: set(on_disk) <= set(central.lines()), 20, "every record still on disk at the central")


def test_the_hold_keeps_deleted_segments_within_the_disk_budget(central, forwarders, tmp_path):
    path = tmp_path / "app.log"
    logger, handler = clh_writer(path, 5_000, 2)
    fw = forwarders(central, [str(path)], tmp_path / "cp.json", retention_grace=0.3)
    for start in range(0, 3000, 300):  # ~50 KB, ten rotations, while the central is down
        log(logger, "w", start, start + 300)
        wait_for(lambda: live_file_held(fw, path), 10, "the forwarder to hold the live segment")
    handler.close()
    assert len(list(tmp_path.glob("app.log.*.gz"))) == 2  # retention did delete the older ones
    central.start()
    wait_for(lambda: check_sequences(central.lines(), {"w": 3000}, payloads=False).missing_count == 0, 30,
             "every record, deleted segments included")
    check_sequences(central.lines(), {"w": 3000}, payloads=False).assert_complete()
    assert per_writer_order(central.lines()) == {"w": True}
    wait_for(lambda: fw.snapshot()["held_bytes"] == 0, 10, "forwarded segments to be released")
    assert fw.lost_segments == 0 and not fw.snapshot()["hold_disabled"]
    # Only the live file stays held (it is never finished); every forwarded segment is let go
    # (the last rotated one once the reader has seen it is no longer the live file).
    wait_for(lambda: [p.stat().st_ino for p in (tmp_path / "cp.json.hold").iterdir()] == [path.stat().st_ino], 10,
             "only the live file to be held")


def test_a_forwarded_segment_without_a_name_for_a_moment_is_not_sent_again(central, forwarders, tmp_path):
    """While CLH compresses a segment it has no name the family lists; a forwarded segment must not
    be forgotten then and found again as new (it was sent again whole, duplicates at the central)."""
    central.start()
    path = tmp_path / "app.log"
    logger, handler = clh_writer(path, 10**8, 5)
    log(logger, "w", 0, 300)
    handler.doRollover()
    log(logger, "w", 300, 310)
    handler.close()
    fw = forwarders(central, [str(path)], tmp_path / "cp.json", retention_grace=30.0)
    wait_for(lambda: len(central.lines()) == 310 and fw.snapshot()["files"][0]["lag_bytes"] == 0, 20, "all sent")
    hidden = tmp_path / "compressing"
    os.rename(tmp_path / "app.log.1.gz", hidden)  # as between CLH's gzip and its rename to .1.gz
    scans = fw.scans
    wait_for(lambda: fw.scans >= scans + 2, 10, "two scans without the segment")
    os.rename(hidden, tmp_path / "app.log.1.gz")
    scans = fw.scans
    wait_for(lambda: fw.scans >= scans + 2, 10, "two scans with it again")
    logger, handler = clh_writer(path, 10**8, 5)
    handler.doRollover()  # the reader leaves the live file: a segment taken for new would be read next
    log(logger, "w", 310, 320)
    handler.close()
    wait_for(lambda: len(central.lines()) >= 320 and fw.snapshot()["files"][0]["lag_bytes"] == 0, 20, "320")
    check_sequences(central.lines(), {"w": 320}, payloads=False).assert_complete()
    assert fw.sent == 320


def held_alone_on_disk(hold_dir) -> int:
    """What the hold alone keeps, seen from the disk: held files with no other link."""
    return sum(st.st_size for st in (p.stat() for p in hold_dir.iterdir()) if st.st_nlink == 1)


@pytest.mark.parametrize("use_gzip", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("short", [0, 1], ids=["just-enough", "one-byte-short"])
def test_the_hold_budget_at_its_edge(central, forwarders, tmp_path, use_gzip, short):
    """docs/forwarding.md: no loss while the segments retention deleted before they were forwarded fit
    in hold_max_bytes at their size on disk (compressed with gzip); past it, the oldest is let go,
    counted with its exact size. At the edge: a budget of exactly that loses nothing; one byte less
    loses exactly the oldest segment, and lost_bytes is the bytes of the records the central lacks."""
    path = tmp_path / "app.log"
    logger, handler = clh_writer(path, 5_000, 1, use_gzip)
    first = forwarders(central, [str(path)], tmp_path / "cp.json", retention_grace=0.3)  # central down
    for start in range(0, 3000, 300):  # ~55 KB, about ten rotations; backupCount=1 deletes most
        log(logger, "w", start, start + 300)
        wait_for(lambda: live_file_held(first, path), 10, "the forwarder to hold the live segment")
    handler.close()
    hold = tmp_path / "cp.json.hold"
    wait_for(lambda: first.snapshot()["held_bytes"] == held_alone_on_disk(hold) > 0, 10,
             "the hold's count to match the disk (no plain copy of a named .gz)")
    need = first.snapshot()["held_bytes"]
    written = sum(len(seq_record("w", n, f"p{n}")) + 1 for n in range(3000))
    assert need < written / (3 if use_gzip else 1)  # with gzip the budget is spent on compressed bytes
    first.stop()
    fw = forwarders(central, [str(path)], tmp_path / "cp.json", retention_grace=0.3, hold_max_bytes=need - short)
    central.start()
    wait_for(lambda: fw.snapshot()["files"][0]["lag_bytes"] == 0 and fw.snapshot()["in_flight"] == 0, 30,
             "everything kept to be forwarded")
    report = check_sequences(central.lines(), {"w": 3000}, payloads=False)
    snap = fw.snapshot()
    assert report.duplicates == 0 and not report.torn and snap["gaps"] == 0
    if not short:
        report.assert_complete()
        assert (snap["lost_segments"], snap["lost_bytes"], snap["hold_released"]) == (0, 0, 0)
        return
    missing = report.missing["w"]
    assert missing == list(range(missing[-1] + 1)), "the oldest segment (the first records) and only it"
    assert (snap["lost_segments"], snap["hold_released"]) == (1, 1)
    assert snap["lost_bytes"] == sum(len(seq_record("w", n, f"p{n}")) + 1 for n in missing)


def test_a_planted_symlink_is_not_forwarded(central, forwarders, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("SEQ secret 0 do-not-forward\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "app.log"
    logger, handler = clh_writer(path, 10**8, 5)
    log(logger, "w", 0, 100)
    handler.close()
    # A client that can write in the log directory plants rotated-looking and live-looking links.
    os.symlink(secret, logs / "app.log.7")
    os.symlink(secret, logs / "other.log")
    central.start()
    fw = forwarders(central, [str(logs / "*.log")], tmp_path / "cp.json")
    wait_for(lambda: len(central.lines()) >= 100, 20, "the real records")
    wait_for(lambda: fw.checkpoint.saves >= 1 and fw.snapshot()["in_flight"] == 0, 10, "quiet")
    check_sequences(central.lines(), {"w": 100}, payloads=False).assert_complete()
    assert not any("secret" in line for line in central.lines())
    assert [f["path"] for f in fw.snapshot()["files"]] == [str(path)]


def test_relp_over_tls_with_certificates(central, forwarders, tmp_path):
    certs = Certs(tmp_path)
    ca = certs.ca("ca")
    server = certs.cert("server", dns=["central.test"], ips=["127.0.0.1"], ca=ca)
    client = certs.cert("client", dns=["h1.clients.test"], ca=ca)
    central.extra_args = central_tls_args(ca, server, ["h1.clients.test"])
    central.start()
    path = tmp_path / "app.log"
    logger, handler = clh_writer(path, 10**8, 1)
    log(logger, "w", 0, 200)
    handler.close()
    # Without a client certificate imrelp refuses the session: nothing is acknowledged.
    anonymous = forwarders(central, [str(path)], tmp_path / "anon.json", tls=True, tls_ca_file=ca[0])
    wait_for(lambda: anonymous.last_error, 20, "the refused session")
    anonymous.stop()
    assert anonymous.acked == 0 and central.lines() == []
    fw = forwarders(central, [str(path)], tmp_path / "cp.json", tls=True, tls_ca_file=ca[0],
                    tls_cert_file=client[0], tls_key_file=client[1])
    wait_for(lambda: len(central.lines()) >= 200, 20, "200 records over TLS")
    check_sequences(central.lines(), {"w": 200}, payloads=False).assert_complete()
    assert fw.snapshot()["connected"]


def test_the_tls_central_refuses_every_certificate_it_does_not_name(central, tmp_path):
    """`forward-config --tls` must not accept what `certvalid` accepted (issue 29): a foreign CA's
    certificate, a self-signed one, or one of our CA's for a name not permitted, with a real rsyslogd."""
    certs = Certs(tmp_path)
    ca, foreign_ca = certs.ca("ca"), certs.ca("foreign-ca")
    server = certs.cert("server", dns=["central.test"], ips=["127.0.0.1"], ca=ca)
    clients = {
        "permitted": certs.cert("permitted", dns=["h1.clients.test"], ca=ca),
        "foreign CA, permitted name": certs.cert("foreign", dns=["h1.clients.test"], ca=foreign_ca),
        "self-signed, permitted name": certs.cert("self", dns=["h1.clients.test"]),
        "our CA, other name": certs.cert("other", dns=["h2.clients.test"], ca=ca),
    }
    central.extra_args = central_tls_args(ca, server, ["h1.clients.test"])
    central.start()
    def attempt(what: str, pem: str, key: str) -> str:
        context = ssl.create_default_context(cafile=ca[0])
        context.load_cert_chain(pem, key)
        client = RelpClient("127.0.0.1", central.port, 5.0, context)
        acked: list = []
        try:
            client.open()
            client.send_many([f"<134>1 - h1 app - - - SEQ w 0 {what}".encode()])
            wait_for(lambda: acked.extend(client.read_acks(0.2)) or acked, 10, f"the ack for {what}")
            client.close()
        except RelpError as exc:
            return f"refused ({exc})"
        return "accepted"

    outcome = {what: attempt(what, *files) for what, files in clients.items()}
    assert outcome["permitted"] == "accepted"
    assert all(v.startswith("refused") for k, v in outcome.items() if k != "permitted"), outcome
    wait_for(lambda: central.lines(), 10, "the permitted record")
    assert [line.split(" ", 3)[3] for line in central.lines()] == ["permitted"]


def test_the_forwarder_checks_the_central_certificate_name(central, tmp_path):
    """The daemon's side: a central whose certificate does not name the target is refused."""
    certs = Certs(tmp_path)
    ca = certs.ca("ca")
    server = certs.cert("server", dns=["central.test"], ips=["127.0.0.1"], ca=ca)
    client = certs.cert("client", dns=["h1.clients.test"], ca=ca)
    central.extra_args = central_tls_args(ca, server, ["h1.clients.test"])
    central.start()
    context = ssl.create_default_context(cafile=ca[0])
    context.load_cert_chain(*client)
    with pytest.raises(RelpError, match="certificate verify failed"):
        RelpClient("localhost", central.port, 5.0, context).open()  # the certificate names central.test, 127.0.0.1
    good = RelpClient("127.0.0.1", central.port, 5.0, context)
    good.open()
    good.close()
