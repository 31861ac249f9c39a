"""The RELP frame codec (``clh_writerd.forward.relp``); a session against the real
rsyslogd (imrelp): tests/e2e/forwarding/test_relp.py."""

import pytest

from clh_writerd.forward.relp import FrameParser, RelpProtocolError, encode_frame


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
