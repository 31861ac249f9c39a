"""Segment reading (``clh_writerd.forward.segments``) over real files renamed as CLH rotates them;
the forwarder over real rotation against rsyslogd: tests/e2e/forwarding/test_forwarder.py."""

import os

import pytest


def test_a_name_that_now_holds_another_segment_is_not_read_as_the_old_one(tmp_path):
    """The race found under load: a scan pairs segment B with "app.log", CLH rotates, the
    reader then opens "app.log" (now segment C). It must refuse instead of sending C's lines under B's id."""
    from clh_writerd.forward.checkpoint import SegmentState, fingerprint
    from clh_writerd.forward.segments import SegmentMoved, SegmentReader

    path = tmp_path / "app.log"
    path.write_bytes(b"SEQ w 0 segment-b\n" * 100)
    state = SegmentState(fingerprint(path.read_bytes()[:1024]), str(path), str(path), offset=18)
    reader = SegmentReader(state, str(path), False, 8000)
    assert reader.read(1)[0] == (18, 36, b"SEQ w 0 segment-b")
    reader.close()
    os.rename(path, tmp_path / "app.log.1")
    path.write_bytes(b"SEQ w 1 segment-c\n" * 100)
    with pytest.raises(SegmentMoved):
        SegmentReader(state, str(path), False, 8000)
