"""The RELP client in a session against the real rsyslogd (imrelp); the frame
codec: tests/unit/forward/test_relp.py."""

import signal

import pytest

from support import wait_for

from clh_writerd.forward.relp import RelpClient, RelpError


# -- a session against rsyslogd ---------------------------------------------
def read_all_acks(client: RelpClient, want: int):
    acked = []
    wait_for(lambda: acked.extend(client.read_acks(0.2)) or len(acked) >= want, 20, f"{want} acks")
    return acked


def test_open_syslog_rsp_close_against_rsyslogd(central):
    central.start()
    client = RelpClient("127.0.0.1", central.port)
    client.open()
    txnrs = client.send_many([b"<134>1 - h1 app - id%d - SEQ w %d p" % (n, n) for n in range(500)])
    assert txnrs == list(range(2, 502))  # txnr 1 was the open
    assert sorted(read_all_acks(client, 500)) == txnrs
    assert client.in_flight == 0
    client.close()
    assert not client.connected
    wait_for(lambda: len(central.lines()) == 500, 10, "500 lines at the central")
    assert central.lines()[0] == "SEQ w 0 p"


def test_a_killed_server_is_an_error_not_a_hang(central):
    central.start()
    client = RelpClient("127.0.0.1", central.port, timeout=2.0)
    client.open()
    central.proc.kill()
    central.proc.wait(10)
    with pytest.raises(RelpError):
        for _ in range(100):
            client.send_many([b"<134>1 - h1 app - - - lost?"])
            client.read_acks(0.1)


def test_open_against_nothing_is_a_relp_error(central):
    with pytest.raises(RelpError, match="cannot connect"):
        RelpClient("127.0.0.1", central.port, timeout=2.0).open()


def test_a_frozen_server_leaves_frames_unacked(central):
    central.start()
    client = RelpClient("127.0.0.1", central.port, timeout=2.0)
    client.open()
    central.freeze()
    try:
        client.send_many([b"<134>1 - h1 app - - - held"] * 10)
        assert client.read_acks(1.0) == []
        assert client.in_flight == 10
    finally:
        central.signal(signal.SIGCONT)
    assert len(read_all_acks(client, 10)) == 10
    client.close()


def test_a_sender_cannot_choose_a_path_outside_the_central_output(central, tmp_path):
    """HOSTNAME and APP-NAME name the central's files: "../" in them must not escape the output directory."""
    out = tmp_path / "out"
    central.output = str(out / "%HOSTNAME%" / "%APP-NAME%.log")
    central.start()
    client = RelpClient("127.0.0.1", central.port)
    client.open()
    client.send_many([b"<134>1 - ../../escaped ../x - id - SEQ w 0 p", b"<134>1 - h1 app.log - id - SEQ w 1 p"])
    read_all_acks(client, 2)
    client.close()
    wait_for(lambda: len([p for p in out.rglob("*") if p.is_file()]) == 2, 10, "two central files")
    assert not list(tmp_path.glob("escaped*")) and not (tmp_path.parent / "escaped").exists()
    assert all(out in p.parents for p in out.rglob("*"))
