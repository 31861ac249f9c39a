"""`clh-writerd stats --watch` on a real terminal (tmux): the client view
shows the process that is dropping *now*, marked and in reverse video
(issue 15).

A daemon serves two real client processes: "flooder" drops (a queue of 10,
fallback_on_full=False, bursts of 200) and "steady" writes a few records
every few milliseconds. `stats --watch` runs in a detached tmux pane;
``capture-pane -e`` keeps the SGR attributes, so the highlighted row can be
read back. The plain capture is what docs/stats-watch.txt holds (shown in
docs/stats.md); CLH_WRITERD_UPDATE_DOCS=1 rewrites it from this run, and
the checked-in copy must keep the current headers and mark the flooder.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
from support.debian import require_debian_packages
from support import wait_for
from support.monitoring import TroubledClient, stop_all

REPO = Path(__file__).resolve().parents[2]
CAPTURE = REPO / "docs" / "stats-watch.txt"
REVERSE = "\x1b[7m"


class Tmux:
    """A private tmux server (-L) with one detached window; kill() ends it."""

    def __init__(self, command: List[str], width: int = 190, height: int = 30) -> None:
        self.socket = f"clh-watch-{uuid.uuid4().hex[:8]}"
        env = dict(os.environ, TERM=os.environ.get("TERM") or "xterm-256color")
        env.pop("TMUX", None)
        subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-s", "watch",
                        "-x", str(width), "-y", str(height), " ".join(command)], check=True, env=env, timeout=30)

    def capture(self, escapes: bool) -> str:
        argv = ["tmux", "-L", self.socket, "capture-pane", "-p", "-t", "watch"] + (["-e"] if escapes else [])
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def client_rows(screen: str) -> List[str]:
    lines = screen.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("CLIENTS"))
    return [line for line in lines[at + 2:] if line.strip() and not line.startswith(("gone:", "..."))]


def highlighted(screen_with_escapes: str) -> List[str]:
    """The client rows drawn in reverse video, escapes removed."""
    rows = []
    for line in screen_with_escapes.splitlines():
        if REVERSE in line:
            rows.append(re.sub(r"\x1b\[[0-9;]*m", "", line))
    return rows


@pytest.fixture
def short_workdir() -> Iterator[str]:
    # Short paths keep the captured rows readable in the docs.
    path = tempfile.mkdtemp(prefix="w", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_watch_highlights_the_dropping_client_on_a_terminal(start_daemon, short_workdir):
    require_debian_packages(["tmux"], ["tmux"])
    daemon = start_daemon(workdir=short_workdir, log_dir=os.path.join(short_workdir, "logs"))
    clients = [TroubledClient(short_workdir, "flooder", os.path.join(daemon.log_dir, "flood.log"), daemon.endpoint,
                              "drop"),
               TroubledClient(short_workdir, "steady", os.path.join(daemon.log_dir, "steady.log"), daemon.endpoint,
                              "steady")]
    tmux: Optional[Tmux] = None
    try:
        def both_reported() -> bool:
            seen = {c["program"]: c for c in daemon.stats()["clients"]}
            return "flooder" in seen and seen["flooder"]["reported"].get("dropped", 0) > 0 and \
                seen.get("steady", {}).get("records_received", 0) > 0

        wait_for(both_reported, timeout=30, what="the flooder dropping and the steady client writing")
        tmux = Tmux([sys.executable, "-m", "clh_writerd", "stats", "--endpoint", daemon.endpoint, "--watch",
                     "--interval", "1"])

        def frame_with_rates() -> Optional[str]:
            # The first frame has no rates (nothing to compare with): wait for a highlighted row.
            screen = tmux.capture(escapes=True)
            return screen if highlighted(screen) and "steady" in screen else None

        screen = wait_for(frame_with_rates, timeout=30, what="a --watch frame with a highlighted client",
                          interval=0.2)
        plain = tmux.capture(escapes=False)
    finally:
        if tmux is not None:
            tmux.kill()
        stop_all(clients)

    hot = highlighted(screen)
    assert len(hot) == 1 and hot[0].split()[:3] == ["!", socket.gethostname(), "flooder"], hot
    rows = client_rows(plain)
    assert rows[0].split()[2] == "flooder" and rows[0].startswith("!"), rows  # first, marked
    (steady,) = [r for r in rows if "steady" in r.split()[:3]]
    assert not steady.startswith("!"), rows
    dropping_now = float_units(rows[0].split()[7])  # drop/s
    assert dropping_now > 0, rows[0]

    frame = "\n".join(line.rstrip() for line in plain.rstrip("\n").splitlines()) + "\n"
    if os.environ.get("CLH_WRITERD_UPDATE_DOCS") == "1":
        CAPTURE.write_text(frame)
        embed(frame)
    checked_in = CAPTURE.read_text()
    # The docs show today's view: the same headers, the flooder marked first, and stats.md shows the capture.
    assert headers(checked_in) == headers(frame), "docs/stats-watch.txt is stale: CLH_WRITERD_UPDATE_DOCS=1"
    assert client_rows(checked_in)[0].startswith("!") and client_rows(checked_in)[0].split()[2] == "flooder"
    assert f"{BEGIN}\n```\n{checked_in}```\n{END}" in STATS_MD.read_text()


STATS_MD = REPO / "docs" / "stats.md"
BEGIN, END = "<!-- stats-watch.txt: begin -->", "<!-- stats-watch.txt: end -->"


def embed(frame: str) -> None:
    """Put ``frame`` between the markers of docs/stats.md."""
    text = STATS_MD.read_text()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    STATS_MD.write_text(text[:start] + f"{BEGIN}\n```\n{frame}```\n{END}" + text[stop:])


def headers(frame: str) -> List[str]:
    """The header lines of the file table and the client view."""
    return [line.split() for line in frame.splitlines()
            if line.startswith("path ") or line.startswith("CLIENTS") or line.lstrip().startswith("host ")]


def float_units(cell: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(cell[-1:], 1.0)
    return float(cell[:-1] if cell[-1:] in "kMG" else cell) * scale
