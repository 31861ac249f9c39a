"""The operator view (daemon/view.py): the client table's order and folding,
the --watch client view's rates and highlight, human units.

Documents are built as the daemon builds them (docs/stats.md, the issue 15
contract: per-client ``file``, ``state``, ``last_error``, ``reported``, and
``clients_gone`` groups), so these tests pin the rendering, not the data.
"""

import time
from typing import Any, Dict, Optional

import pytest

from clh_writerd.daemon.stats import DaemonStats
from clh_writerd.daemon.view import (
    HIGHLIGHT,
    NORMAL,
    human_bytes,
    human_count,
    render_table,
    render_watch,
    sorted_clients,
)


def client(pid: int, program: str = "web", last_seen: float = 0.0, state: Optional[str] = "daemon",
           file: Optional[str] = "/l/app.log", errors: int = 0, last_error: str = "", **reported: int
           ) -> Dict[str, Any]:
    return {"host": "h1", "pid": pid, "program": program, "session": f"s{pid}", "first_seen": 0.0,
            "last_seen": last_seen or time.time(), "records_received": 0, "batches_received": 0,
            "sync_records": 0, "errors": errors, "reported": dict(reported), "peer_uid": 1000, "peer_gid": 1000,
            "peer_pid": pid, "peer_key": None, "file": file, "state": state, "last_error": last_error,
            "closed": False}


def document(*clients: Dict[str, Any], gone: Any = ()) -> Dict[str, Any]:
    doc = DaemonStats("ipc:///tmp/x/w.sock", max_clients=100).snapshot()
    doc["clients"] = list(clients)
    doc["clients_gone"] = list(gone)
    return doc


def client_lines(text: str) -> list:
    lines = text.splitlines()
    at = lines.index("CLIENTS") if "CLIENTS" in lines else \
        next(i for i, line in enumerate(lines) if line.startswith("CLIENTS"))
    return lines[at + 2:]


def test_problems_come_first_then_the_most_recently_seen():
    now = time.time()
    quiet_old = client(1, last_seen=now - 50, sent=10, acked=10)
    quiet_new = client(2, last_seen=now - 1, sent=10, acked=10)
    failing = client(3, last_seen=now - 40, errors=2)
    falling = client(4, last_seen=now - 30, state="fallback", fallback=0)
    dropping = client(5, last_seen=now - 60, dropped=3)
    order = [c["pid"] for c in sorted_clients([quiet_old, quiet_new, failing, falling, dropping])]
    assert order == [5, 4, 3, 2, 1]
    rows = client_lines(render_table(document(quiet_old, quiet_new, failing, falling, dropping)))
    assert [int(r.split()[2]) for r in rows[:5]] == [5, 4, 3, 2, 1]


def test_client_rows_show_file_state_counters_and_errors():
    c = client(7, program="billing", file="/var/log/b.log", state="fallback", errors=1, last_error="forbidden_path",
               sent=100, acked=90, fallback=10, dropped=0, resent=4, write_errors=2)
    text = render_table(document(c))
    (row,) = [line for line in client_lines(text) if line.startswith("h1 ")]
    assert row.split() == ["h1", "billing", "7", "/var/log/b.log", "fallback", "0.0s", "ago", "0", "100", "90",
                           "10", "0", "4", "3"]
    assert "  last error of h1:7 billing: forbidden_path" in text


def test_gone_clients_are_a_folded_total_not_rows():
    gone = [{"program": "worker", "file": "/l/a.log", "clients": 40, "reported": {"dropped": 5, "sent": 100}},
            {"program": "(other)", "file": None, "clients": 2, "reported": {"fallback": 1}}]
    text = render_table(document(client(1), gone=gone))
    assert "gone: 42 client(s) in 2 program/file group(s)  sent=100  fallback=1  dropped=5" in text
    assert "worker" not in text  # folded, not listed
    assert "gone: 42" in render_watch(document(client(1), gone=gone), None, 0.0).splitlines()[-1]
    assert "(gone 42)" in render_watch(document(client(1), gone=gone), None, 0.0).splitlines()[0]


def test_a_document_without_the_new_keys_still_renders():
    # A daemon from before issue 15 (or a client that never reported).
    doc = DaemonStats("ipc:///x", max_clients=5).snapshot()
    doc["clients"] = [{k: v for k, v in client(1).items() if k not in ("file", "state", "last_error", "closed")}]
    (row,) = client_lines(render_table(doc))
    assert row.split()[3:5] == ["-", "-"]
    assert "h1" in render_watch(doc, doc, 1.0)


def test_watch_marks_and_highlights_the_client_dropping_now():
    now = time.time()
    before = document(client(1, program="steady", sent=100, dropped=50),  # dropped once, not any more
                      client(2, program="flood", sent=100, dropped=10),
                      client(3, program="idle"))
    after = document(client(1, program="steady", sent=300, dropped=50, last_seen=now),
                     client(2, program="flood", sent=200, dropped=2010, last_seen=now - 0.5),
                     client(3, program="idle"))
    frame = render_watch(after, before, 2.0, tty=True)
    rows = client_lines(frame)
    hot = [r for r in rows if r.startswith(HIGHLIGHT)]
    assert len(hot) == 1 and hot[0].endswith(NORMAL)
    cells = hot[0][len(HIGHLIGHT):].split()
    assert cells[:3] == ["!", "h1", "flood"] and cells[7] == "1.0k"  # 2000 drops in 2 s
    assert rows[0] == hot[0]  # first
    # Without a terminal: the same frame, the mark, no escape sequence.
    plain = render_watch(after, before, 2.0, tty=False)
    assert "\x1b" not in plain
    marked = [r for r in client_lines(plain) if r.startswith("!")]
    assert len(marked) == 1 and marked[0].split()[2] == "flood"


def test_the_first_frame_has_no_rates_and_marks_nobody():
    frame = render_watch(document(client(2, program="flood", dropped=10)), None, 0.0, tty=True)
    assert HIGHLIGHT not in frame and not any(r.startswith("!") for r in client_lines(frame))


def test_watch_lists_at_most_max_clients():
    doc = document(*(client(n) for n in range(30)))
    frame = render_watch(doc, doc, 1.0, max_clients=5)
    assert "... 25 more client(s): clh-writerd stats" in frame


@pytest.mark.parametrize("value, text", [(0, "0B"), (1023, "1023B"), (1536, "1.5KiB"), (5 * 1024 ** 2, "5.0MiB"),
                                         (3 * 1024 ** 4, "3.0TiB")])
def test_human_bytes(value, text):
    assert human_bytes(value) == text


@pytest.mark.parametrize("value, text", [(0, "0"), (12, "12"), (2.5, "2.5"), (1234, "1.2k"), (2_500_000, "2.5M")])
def test_human_count(value, text):
    assert human_count(value) == text
