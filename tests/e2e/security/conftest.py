"""Fixtures of the attack tests: a real second user, an honest client writing
alongside every attack, resource snapshots and the rows of docs/security.md.

`python scripts/guarantees.py --doc security` runs these tests with
CLH_SECURITY_OUT set and renders the table of docs/security.md from the rows.
"""

import json
import os
import pwd
import subprocess
import threading
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from clh_writerd import protocol
from support import RawClient, check_sequences, fd_count, read_lines, rss_kib, seq_record, wait_for

SECURITY_ENV = "CLH_SECURITY_OUT"


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "security: an attack test; its row goes into docs/security.md")


def pytest_collection_modifyitems(items: List[Any]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.security)


# -- a real second user -------------------------------------------------------
class User:
    def __init__(self, name: str) -> None:
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid

    def run(self, action: Callable[[], None]) -> None:
        """Run ``action`` in a child process with this user's uid and gid (a real unprivileged process)."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                # Its supplementary groups from the user database, as a login would set them.
                os.setgroups(os.getgrouplist(self.name, self.gid))
                os.setgid(self.gid)
                os.setuid(self.uid)
                action()
                code = 0
            except BaseException as exc:
                try:
                    os.write(2, f"as {self.name}: {type(exc).__name__}: {exc}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the action as {self.name} failed"


@pytest.fixture(scope="session")
def attacker() -> Iterator[User]:
    """A real unprivileged local user (created with useradd, removed after the session)."""
    if os.geteuid() != 0:
        pytest.skip("the attack tests need root to create a second user (CI runs as root)")
    name = f"clhsec{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield User(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def base_dir() -> Iterator[str]:
    """A work directory the second user can reach (pytest's tmp_path is 0700 root)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="clh-sec-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def shared_log_dir(path: str) -> str:
    """The log directory as deployments share it: every writer may create files in it (the fallback does)."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o777)
    return path


# -- the honest client --------------------------------------------------------
class HonestClient:
    """Writes sequenced batches to its own file while an attack runs, waiting for each ack
    (retrying on busy), so the oracle can prove that the attack cost it nothing."""

    def __init__(self, endpoint: str, path: str, writer: str = "honest", batch: int = 20) -> None:
        self.path, self.writer, self.batch = path, writer, batch
        self.client = RawClient(endpoint, program="honest")
        self.acked = 0
        self.resent = 0  # batches sent again after no reply: may duplicate, never lose
        self.errors: List[protocol.Error] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="honest-client", daemon=True)

    def __enter__(self) -> "HonestClient":
        self._thread.start()
        wait_for(lambda: self.acked > 0, what="the honest client's first ack")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            records = [seq_record(self.writer, self.acked + i) for i in range(self.batch)]
            seq = self.client.send_batch(self.path, records)
            reply = None
            while reply is None or getattr(reply, "seq", seq) != seq:
                reply = self.client.try_recv(5.0)
                if reply is None:  # connection dropped (a paused listener): send it again, as clients do
                    self.resent += 1
                    seq = self.client.send_batch(self.path, records)
            if isinstance(reply, protocol.Ack):
                self.acked += len(records)
            else:
                self.errors.append(reply)
                if not (isinstance(reply, protocol.Error) and reply.retryable):
                    return
                self._stop.wait(0.05)

    def lost(self) -> int:
        """Records the honest client had acked that are not in its file (must be 0)."""
        report = check_sequences(read_lines(self.path), {self.writer: self.acked})
        report.assert_complete(allow_duplicates=self.resent > 0)
        assert report.duplicates <= self.resent * self.batch
        assert not self.errors, self.errors
        return report.missing_count


# -- resource figures -----------------------------------------------------------
def threads_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def resources(pid: int) -> Dict[str, Optional[int]]:
    return {"rss_kib": rss_kib(pid), "threads": threads_of(pid), "fds": fd_count(pid)}


def describe_resources(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    return (f"RSS {before['rss_kib'] // 1024} -> {after['rss_kib'] // 1024} MiB, "
            f"threads {before['threads']} -> {after['threads']}, fds {before['fds']} -> {after['fds']}")


# -- rows of docs/security.md ---------------------------------------------------
@pytest.fixture
def security_row(request) -> Callable[..., None]:
    """security_row(attack, expected, observed, lost, resources=""): one row of docs/security.md."""

    def record(attack: str, expected: str, observed: str, lost: int, resources: str = "") -> None:
        out = os.environ.get(SECURITY_ENV)
        if not out:
            return
        row = {"nodeid": request.node.nodeid, "attack": attack, "expected": expected, "observed": observed,
               "lost": lost, "resources": resources}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")

    return record


# -- what every attack of round two must leave standing (issue 25) -------------
PING_BOUND = 0.5  # seconds: a ping is answered within this during every attack


class PingMonitor:
    """Pings the daemon every 50 ms on fresh connections (as `clh-writerd ping`
    does) while an attack runs, and keeps the slowest answer: the main loop
    must never be held up by what an attacker sends."""

    def __init__(self, endpoint: str, interval: float = 0.05) -> None:
        self.endpoint, self.interval = endpoint, interval
        self.latencies: List[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ping-monitor", daemon=True)

    def __enter__(self) -> "PingMonitor":
        self._thread.start()
        wait_for(lambda: self.latencies, what="the first ping")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import time

        from clh_writerd.client.control import DaemonUnavailable, request

        while not self._stop.is_set():
            started = time.monotonic()
            try:
                reply = request(self.endpoint, protocol.encode_ping(), 5.0)
                ok = isinstance(reply, protocol.Ok)
            except DaemonUnavailable:
                ok = False
            self.latencies.append(time.monotonic() - started)
            self.failures += not ok
            self._stop.wait(self.interval)

    @property
    def worst(self) -> float:
        return max(self.latencies)

    def assert_held(self) -> str:
        """Every ping answered within PING_BOUND; the figure for the row."""
        assert self.failures == 0, f"{self.failures} ping(s) failed"
        assert self.worst < PING_BOUND, f"slowest ping {self.worst:.3f}s (bound {PING_BOUND}s)"
        return f"{len(self.latencies)} pings, slowest {self.worst * 1000:.0f} ms"


def sigterm_within(daemon: Any, drain_timeout: float) -> float:
    """SIGTERM the daemon and return how long it took to exit; it must be within drain_timeout
    (plus a second for libzmq's linger and the interpreter's exit)."""
    import signal
    import time

    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    daemon.proc.wait(drain_timeout + 30)
    took = time.monotonic() - started
    assert took < drain_timeout + 1.5, f"SIGTERM took {took:.1f}s (drain_timeout {drain_timeout}s)"
    return took


def in_background(user: User, action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` as ``user`` (a forked child) while the test goes on; join() the thread to wait."""
    errors: List[BaseException] = []

    def run() -> None:
        try:
            user.run(action)
        except BaseException as exc:  # reported by join_ok
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"as-{user.name}", daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def join_ok(thread: threading.Thread, timeout: float = 120.0) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), f"{thread.name} did not finish within {timeout}s"
    errors = thread.errors  # type: ignore[attr-defined]
    assert not errors, errors


def mib(kib: Optional[int]) -> float:
    return (kib or 0) / 1024.0
