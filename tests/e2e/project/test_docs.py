"""Every shell command and Python snippet in README.md and docs/*.md runs.

Each ```python and ```sh (bash, shell) block of README.md and of every page in
docs/ (new pages are picked up by themselves) runs as a user would paste it:
in a fresh working directory holding `logs/` and links to the checkout's
`client/`, `daemon/`, `docs/`, `systemd/` and `docker/`, with the installed
`clh-writerd` and `python` first on PATH. The block must exit 0 within
60 s. Absolute log paths under /var/log/ are moved into that directory. No
daemon runs, and the default endpoint is private to the block, so handlers
use their fallback.

A marker, an HTML comment on the line before the block (a blank line between
is fine), changes that:

    <!-- snippet: with daemon -->
        a clh-writerd runs at the block's default endpoint (also exported as
        CLH_WRITERD_ENDPOINT), allowed to write under logs/ and the moved
        /var/log/ paths
    <!-- snippet: not run: WHY -->
        the block is not run (it needs root, a container engine, a package
        that is not a dependency, or it is not a complete program); WHY is
        required and shows as the skip reason

An unmarked block that fails is a failure: mark it or fix it.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
from support import DaemonProcess, short_socket_dir

REPO = Path(__file__).resolve().parents[3]
RUNNABLE = {"python": "python", "py": "python", "sh": "sh", "bash": "sh", "shell": "sh"}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")
LINKED = ("client", "daemon", "docs", "systemd", "docker")
TIMEOUT = 60


@dataclass
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    kind: str  # "python" or "sh"
    body: str
    marker: Optional[str]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> List[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def snippets(path: Path) -> List[Snippet]:
    """The runnable fenced blocks of one Markdown file, with their markers."""
    lines = path.read_text(encoding="utf-8").split("\n")
    found: List[Snippet] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        end = i + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        if lang in RUNNABLE:
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
            before = i - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            marked = MARKER.match(lines[before]) if before >= 0 else None
            found.append(Snippet(path, i + 1, RUNNABLE[lang], body + "\n", marked.group(1) if marked else None))
        i = end + 1
    return found


ALL = [s for path in doc_files() for s in snippets(path)]


def test_the_collector_finds_blocks_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- snippet: not run: needs root -->\n\n```sh\nrm -rf /\n```\n\n"
                    "- a list\n\n  ```python\n  print(1)\n  ```\n\n```toml\nx = 1\n```\n")
    first, second = snippets(page)
    assert (first.kind, first.line, first.marker, first.body) == ("sh", 5, "not run: needs root", "rm -rf /\n")
    assert (second.kind, second.marker, second.body) == ("python", None, "print(1)\n")
    assert len(ALL) > 10 and {s.path.name for s in ALL} >= {"README.md", "client.md", "migration.md"}


def test_markers_are_known_and_give_a_reason():
    for snippet in ALL:
        if snippet.marker is None or snippet.marker == "with daemon":
            continue
        reason = snippet.marker[len("not run:"):].strip()
        assert snippet.marker.startswith("not run:") and len(reason) >= 10, \
            f"{snippet.id}: unknown marker or no reason: {snippet.marker!r}"


def _sandbox(tmp_path: Path, snippet: Snippet) -> Path:
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "var" / "log").mkdir(parents=True)
    # The log directories a block names exist, as they would on the reader's machine.
    for directory in set(re.findall(r"/var/log/([\w.-]+)/", snippet.body)):
        (work / "var" / "log" / directory).mkdir()
    for name in LINKED:
        os.symlink(REPO / name, work / name)
    return work


def _run(snippet: Snippet, work: Path, env: dict) -> subprocess.CompletedProcess:
    body = snippet.body.replace("/var/log/", f"{work}/var/log/")
    if snippet.kind == "python":
        script = work / "snippet.py"
        script.write_text(body)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", body]
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("snippet", ALL, ids=[s.id for s in ALL])
def test_snippet_runs(snippet, tmp_path):
    if snippet.marker and snippet.marker.startswith("not run:"):
        pytest.skip(f"{snippet.id}: {snippet.marker}")
    work = _sandbox(tmp_path, snippet)
    runtime = short_socket_dir()  # the block's default endpoint lives here
    env = {k: v for k, v in os.environ.items() if k not in ("CLH_WRITERD_ENDPOINT", "PYTHONPATH")}
    env.update(XDG_RUNTIME_DIR=runtime, PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    daemon = None
    try:
        if snippet.marker == "with daemon":
            daemon = DaemonProcess(str(tmp_path), log_dir=str(work / "logs"),
                                   endpoint=f"ipc://{runtime}/clh-writerd/writerd.sock",
                                   daemon={"allowed_dirs": [str(work / "logs"), str(work / "var" / "log")]},
                                   env={"XDG_RUNTIME_DIR": runtime})
            daemon.start()
            env["CLH_WRITERD_ENDPOINT"] = daemon.endpoint
        result = _run(snippet, work, env)
        assert result.returncode == 0, (
            f"{snippet.id} exited {result.returncode} (mark it `<!-- snippet: not run: WHY -->` if it cannot run "
            f"here)\n--- block\n{snippet.body}--- stdout\n{result.stdout[-3000:]}--- stderr\n{result.stderr[-3000:]}")
    finally:
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(runtime, ignore_errors=True)
