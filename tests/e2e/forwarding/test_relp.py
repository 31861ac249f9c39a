"""The RELP client: frame codec, and a session against the real rsyslogd (imrelp)."""

import signal

import pytest

from support import wait_for

from clh_writerd.forward.relp import FrameParser, RelpClient, RelpError, RelpProtocolError, encode_frame


# -- frames ------------------------------------------------------------------
def test_frames_survive_any_split():
    stream = encode_frame(1, b"rsp", b"200 OK") + encode_frame(0, b"serverclose") + encode_frame(2, b"rsp", b"x\ny")
    parser = FrameParser()
    frames = []
    for i in range(len(stream)):
        frames += parser.feed(stream[i:i + 1])
    assert frames == [(1, b"rsp", b"200 OK"), (0, b"serverclose", b""), (2, b"rsp", b"x\ny")]


def test_empty_data_has_no_space_before_the_trailer():
    assert encode_frame(7, b"close") == b"7 close 0\n"
    assert encode_frame(8, b"syslog", b"hi") == b"8 syslog 2 hi\n"


@pytest.mark.parametrize("garbage", [b"x" * 60, b"1 rsp 2 okX", b"1 rsp 0X", b"a b c d e f g h i j k l m n o p q r s t u v w",
                                     b"x" * 10, b" 1 rsp 0\n", b"1234567890 rsp 0\n", b"1 rsp 1234567890",
                                     b"1 rsp 65537 ", b"1 r5p 0\n"])
def test_malformed_and_oversized_frames_are_protocol_errors(garbage):
    """Refused as soon as the bytes seen say so: nothing is buffered for a frame that cannot be one."""
    with pytest.raises(RelpProtocolError):
        FrameParser().feed(garbage)


def test_the_parser_buffers_at_most_one_frame():
    parser = FrameParser(max_data=100)
    assert parser.feed(b"7 rsp 100 " + b"y" * 99) == []
    assert parser.feed(b"y\n") == [(7, b"rsp", b"y" * 100)]
    with pytest.raises(RelpProtocolError, match="101 bytes announced"):
        parser.feed(b"8 rsp 101 ")


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
