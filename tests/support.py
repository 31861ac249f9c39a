"""Test support: a real daemon subprocess, a raw protocol client, the oracle.

Everything here talks to real processes over real sockets. Waiting is done
with ``wait_for`` (a condition and a deadline), never with a bare sleep.
"""

import contextlib
import gzip
import os
import re
import shutil
import signal as _signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import portalocker
import zmq
from concurrent_log_handler import ConcurrentRotatingFileHandler

from clh_writerd import protocol
from clh_writerd.client.control import DaemonUnavailable, request

DEFAULT_TIMEOUT = 30.0


def wait_for(condition: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, what: str = "condition",
              interval: float = 0.01) -> Any:
    """Poll ``condition`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def short_socket_dir() -> str:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="cw-", dir="/tmp")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_config(path: str, sections: Dict[str, Dict[str, Any]], files: Iterable[Dict[str, Any]] = ()) -> str:
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    for entry in files:
        lines.append("[[files]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


class DaemonProcess:
    """``python -m clh_writerd --config FILE`` as a subprocess."""

    def __init__(self, workdir: str, log_dir: Optional[str] = None, endpoint: Optional[str] = None,
                 daemon: Optional[Dict[str, Any]] = None, limits: Optional[Dict[str, Any]] = None,
                 fsync: Optional[Dict[str, Any]] = None, files: Iterable[Dict[str, Any]] = (),
                 preexec_fn: Optional[Callable[[], None]] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.workdir = workdir
        self.log_dir = log_dir or os.path.join(workdir, "logs")
        self.socket_dir = short_socket_dir()
        self.endpoint = endpoint or f"ipc://{self.socket_dir}/w.sock"
        daemon_section = {"endpoint": self.endpoint, "allowed_dirs": [self.log_dir], "drain_timeout": 10.0}
        daemon_section.update(daemon or {})
        sections = {"daemon": daemon_section}
        if limits:
            sections["limits"] = limits
        if fsync:
            sections["fsync"] = fsync
        self.config_path = write_config(os.path.join(workdir, "clh-writerd.toml"), sections, files)
        self.stderr_path = os.path.join(workdir, "daemon.stderr")
        self.proc: Optional[subprocess.Popen] = None
        self._preexec_fn = preexec_fn
        self.env = env

    def start(self, wait: bool = True, env: Optional[Dict[str, str]] = None) -> "DaemonProcess":
        """Run the daemon; ``env`` (or the constructor's) is added to os.environ for it."""
        extra = env if env is not None else self.env
        stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clh_writerd", "--config", self.config_path],
            cwd=self.workdir, stdout=stderr, stderr=stderr, preexec_fn=self._preexec_fn,
            env={**os.environ, **extra} if extra else None,
        )
        stderr.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                return isinstance(request(self.endpoint, protocol.encode_ping(), 0.5), protocol.Ok)
            except DaemonUnavailable:
                return False

        wait_for(answers, timeout, "the daemon to answer a ping")

    def stats(self, timeout: float = 5.0) -> Dict[str, Any]:
        reply = request(self.endpoint, protocol.encode_stats_request(), timeout)
        assert isinstance(reply, protocol.Ok), reply
        return reply.data

    def file_stats(self, path: str) -> Dict[str, Any]:
        real = os.path.realpath(path)
        for entry in self.stats()["files"]:
            if entry["path"] == real:
                return entry
        raise KeyError(path)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = _signal.SIGTERM, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEFAULT_TIMEOUT)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class RawClient:
    """A minimal protocol client: a DEALER for batches, a REQ for sync records."""

    def __init__(self, endpoint: str, program: str = "raw-test-client") -> None:
        self.endpoint = endpoint
        self.context = zmq.Context()
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(endpoint)
        self.client = protocol.new_client_id(program)
        self.seq = 0

    def send_batch(self, path: str, records: List[str], options: Optional[Dict[str, Any]] = None) -> int:
        self.seq += 1
        self.dealer.send(protocol.encode_batch(self.client, self.seq, path, options or {}, records))
        return self.seq

    def send_raw(self, payload: bytes) -> None:
        self.dealer.send(payload)

    def recv(self, timeout: float = DEFAULT_TIMEOUT) -> protocol.Reply:
        if not self.dealer.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout}s")
        return protocol.decode_reply(self.dealer.recv())

    def write(self, path: str, records: List[str], options: Optional[Dict[str, Any]] = None,
              timeout: float = DEFAULT_TIMEOUT) -> protocol.Reply:
        """Send one batch and return its reply (ack or error)."""
        seq = self.send_batch(path, records, options)
        reply = self.recv(timeout)
        assert getattr(reply, "seq", seq) == seq, (reply, seq)
        return reply

    def sync(self, path: str, record: str, options: Optional[Dict[str, Any]] = None,
             timeout: float = DEFAULT_TIMEOUT) -> protocol.Reply:
        req = self.context.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.endpoint)
        try:
            self.seq += 1
            req.send(protocol.encode_sync(self.client, self.seq, path, options or {}, record))
            if not req.poll(int(timeout * 1000)):
                raise AssertionError(f"no reply to sync within {timeout}s")
            return protocol.decode_reply(req.recv())
        finally:
            req.close()

    def try_recv(self, timeout: float) -> Optional[protocol.Reply]:
        """The next reply, or None if none arrives within ``timeout`` seconds."""
        if not self.dealer.poll(int(timeout * 1000)):
            return None
        return protocol.decode_reply(self.dealer.recv())

    def close(self) -> None:
        self.dealer.close(0)
        self.context.term()


@contextlib.contextmanager
def hold_clh_lock(path: str) -> Iterator[None]:
    """Hold the CLH lock of ``path`` (as another writer of the file would), so
    the daemon's writer for it blocks until the block ends."""
    lock_dir, lock_name = ConcurrentRotatingFileHandler.baseLockFilename(os.path.abspath(path))
    with open(os.path.join(lock_dir, lock_name), "a") as f:
        portalocker.lock(f, portalocker.LOCK_EX)
        try:
            yield
        finally:
            portalocker.unlock(f)


def free_tcp_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the sequence oracle ------------------------------------------------------
# Every test record is "SEQ <writer> <n> <payload>": the oracle knows who wrote
# it and in which order, so it can tell missing, duplicated and torn lines.
RECORD_RE = re.compile(r"^SEQ (\S+) (\d+) (.*)$")


def seq_record(writer: str, n: int, payload: str = "") -> str:
    return f"SEQ {writer} {n} {payload or ('x' * (n % 37))}"


def family_files(path: str) -> List[str]:
    """The base file and everything rotation made of it: .N, .N.gz, timed
    suffixes, and orphaned .rotate.* files left by an interrupted rollover."""
    directory, base = os.path.split(path)
    out = []
    for name in sorted(os.listdir(directory)):
        if name == base or name.startswith(base + "."):
            if name.endswith(".lock"):
                continue
            out.append(os.path.join(directory, name))
    return out


def read_lines(path: str) -> List[str]:
    """Every line of the file family, decoded, in no particular file order."""
    lines: List[str] = []
    for name in family_files(path):
        if ".rotate." in name and name.endswith(".gz") and os.path.exists(name[:-3]):
            # A writer killed while compressing: the source still holds every
            # line and the .gz is a partial copy (see set_aside_interrupted_gzips).
            continue
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as f:  # type: ignore[operator]
            data = f.read()
        text = data.decode("utf-8", "replace")
        chunk = text.split("\n")
        if chunk and chunk[-1] == "":
            chunk.pop()
        elif chunk:
            chunk[-1] += "\x00<no terminator>"  # a torn last line shows as malformed
        lines.extend(chunk)
    return lines


@dataclass
class OracleReport:
    expected: int = 0
    found: int = 0
    missing: Dict[str, List[int]] = field(default_factory=dict)
    duplicates: int = 0
    torn: List[str] = field(default_factory=list)
    foreign: int = 0  # well-formed lines from writers not in the expectation

    @property
    def missing_count(self) -> int:
        return sum(len(v) for v in self.missing.values())

    def assert_complete(self, allow_duplicates: bool = False) -> None:
        problems = []
        if self.missing_count:
            sample = {w: v[:10] for w, v in self.missing.items()}
            problems.append(f"{self.missing_count} missing (first: {sample})")
        if self.torn:
            problems.append(f"{len(self.torn)} torn lines (first: {self.torn[:3]!r})")
        if self.duplicates and not allow_duplicates:
            problems.append(f"{self.duplicates} duplicates")
        assert not problems, "; ".join(problems) + f" [expected {self.expected}, found {self.found}]"


def check_sequences(lines: Iterable[str], expected: Dict[str, int], payloads: bool = True) -> OracleReport:
    """Compare lines against ``expected`` = {writer: number of records 0..n-1}."""
    seen: Dict[str, Counter] = defaultdict(Counter)
    report = OracleReport(expected=sum(expected.values()))
    for line in lines:
        m = RECORD_RE.match(line)
        if not m:
            report.torn.append(line)
            continue
        writer, n, payload = m.group(1), int(m.group(2)), m.group(3)
        if payloads and payload.startswith("x") and payload != "x" * (n % 37):
            report.torn.append(line)
            continue
        if writer not in expected:
            report.foreign += 1
            continue
        seen[writer][n] += 1
        report.found += 1
    for writer, count in expected.items():
        got = seen.get(writer, Counter())
        missing = [n for n in range(count) if got[n] == 0]
        if missing:
            report.missing[writer] = missing
        report.duplicates += sum(c - 1 for c in got.values() if c > 1)
    return report


def per_writer_order(lines: Iterable[str]) -> Dict[str, bool]:
    """For lines of one file (not rotated), whether each writer's numbers only go up."""
    last: Dict[str, int] = {}
    ok: Dict[str, bool] = {}
    for line in lines:
        m = RECORD_RE.match(line)
        if not m:
            continue
        writer, n = m.group(1), int(m.group(2))
        ok.setdefault(writer, True)
        if writer in last and n <= last[writer]:
            ok[writer] = False
        last[writer] = n
    return ok


def ordered_family(path: str) -> List[str]:
    """Lines of a size-rotated family oldest first: highest .N first, base last."""
    def rank(name: str) -> Tuple[int, str]:
        m = re.search(r"\.(\d+)(\.gz)?$", name)
        if name == path:
            return (-1, name)
        return (int(m.group(1)) if m else 10**9, name)

    lines: List[str] = []
    for name in sorted(family_files(path), key=rank, reverse=True):
        if ".rotate." in name:
            continue
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as f:  # type: ignore[operator]
            lines.extend(f.read().decode("utf-8", "replace").splitlines())
    return lines


def set_aside_interrupted_gzips(path: str, aside: str) -> List[str]:
    """Move out of the family each ``.rotate.*.gz`` whose source ``.rotate.*``
    is still there: a writer was killed while compressing it (CLH removes the
    source only after the .gz is complete). The source holds every line; the
    .gz is a truncated copy (or a complete one, killed before the removal),
    checked here to hold nothing the source does not. Returns the names moved."""
    import zlib

    moved = []
    for name in family_files(path):
        source = name[:-len(".gz")]
        if ".rotate." not in name or not name.endswith(".gz") or not os.path.exists(source):
            continue
        with open(name, "rb") as f:
            partial = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(f.read())
        with open(source, "rb") as f:
            assert f.read().startswith(partial), f"{name} holds bytes its source {source} does not"
        os.makedirs(aside, exist_ok=True)
        shutil.move(name, os.path.join(aside, os.path.basename(name)))
        moved.append(name)
    return moved


# -- docs/guarantees.md -------------------------------------------------------
# Tests that prove a guarantee record what they did; `make guarantees` runs them
# with CLH_GUARANTEES_OUT set and renders the table from these rows. Without
# the variable nothing is written.
GUARANTEES_ENV = "CLH_GUARANTEES_OUT"


def record_guarantee(nodeid: str, scenario: str, what: str, records: int, missing: int,
                     duplicates: int, note: str = "") -> None:
    """Append one row (JSON line) for docs/guarantees.md."""
    out = os.environ.get(GUARANTEES_ENV)
    if not out:
        return
    import json

    row = {"nodeid": nodeid, "scenario": scenario, "what": what, "records": records,
           "missing": missing, "duplicates": duplicates, "note": note}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


# -- resources of a running process -------------------------------------------
def rss_kib(pid: int) -> Optional[int]:
    """VmRSS of ``pid`` in KiB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def fd_count(pid: int) -> Optional[int]:
    """Open file descriptors of ``pid``, or None if the process is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None


@dataclass
class Sample:
    at: float  # seconds since the sampler started
    name: str
    pid: int
    rss_kib: int
    fds: int


class ResourceSampler:
    """Samples RSS and fd count of named processes on a background thread.

    ``pids`` is called at each tick and returns {name: pid}, so processes may
    come and go (a restarted daemon, replaced clients). Sampling is not
    synchronisation: the interval only sets the resolution.
    """

    def __init__(self, pids: Callable[[], Dict[str, int]], interval: float = 0.2) -> None:
        import threading

        self._pids = pids
        self.interval = interval
        self.samples: List[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self.started = 0.0

    def __enter__(self) -> "ResourceSampler":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def sample_now(self) -> None:
        now = time.monotonic() - self.started
        for name, pid in list(self._pids().items()):
            rss, fds = rss_kib(pid), fd_count(pid)
            if rss is not None and fds is not None:
                self.samples.append(Sample(now, name, pid, rss, fds))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_now()
            self._stop.wait(self.interval)

    def select(self, prefix: str, start: float = 0.0, end: float = float("inf")) -> List[Sample]:
        """Samples of processes whose name starts with ``prefix``, taken in [start, end)."""
        return [s for s in self.samples if s.name.startswith(prefix) and start <= s.at < end]


# -- a slow disk for the daemon -------------------------------------------------
SLOW_DISK_SITECUSTOMIZE = '''\
"""Test-only: makes clh-writerd's file writes slow (a slow disk), inside the CLH lock."""
import os
import time

_rate = float(os.environ.get("CLH_TEST_SLOW_DISK_BPS", "0") or 0)
_latency = float(os.environ.get("CLH_TEST_SLOW_DISK_LATENCY", "0") or 0)
if _rate > 0:
    from clh_writerd import _batchwrite

    _write_chunk = _batchwrite.BatchWriter._write_chunk

    def _slow_write_chunk(self, chunk):
        time.sleep(_latency + sum(map(len, chunk)) / _rate)  # the simulated device time
        return _write_chunk(self, chunk)

    _batchwrite.BatchWriter._write_chunk = _slow_write_chunk
'''


def slow_disk_env(directory: str, bytes_per_second: float, latency: float = 0.0) -> Dict[str, str]:
    """Environment for a process whose BatchWriter writes take ``latency`` +
    size / ``bytes_per_second`` seconds per chunk (a ``sitecustomize`` module
    on PYTHONPATH does it; no LD_PRELOAD). Pass it to DaemonProcess(env=...)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
        f.write(SLOW_DISK_SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": directory + (os.pathsep + path if path else ""),
            "CLH_TEST_SLOW_DISK_BPS": str(bytes_per_second), "CLH_TEST_SLOW_DISK_LATENCY": str(latency)}


# -- web apps under test (client/ examples) -------------------------------------
def http_json(method: str, url: str, timeout: float = 30.0) -> Dict[str, Any]:
    """One HTTP request to an example app; its JSON answer."""
    import json
    import urllib.request

    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200
        return json.loads(response.read())


def http_answers(url: str) -> bool:
    try:
        return bool(http_json("GET", url, timeout=2.0)["ok"])
    except OSError:
        return False


@dataclass
class WebRun:
    served_by: List[int]  # the pid of the worker that served each GET
    not_logged: List[int]  # payments whose line was not in the file when the response came
    returncode: int
    stderr: str


def drive_web_app(cmd: List[str], cwd: str, env: Dict[str, str], stderr_path: str, base: str, path: str,
                  tag: str, requests: int, payments: int) -> WebRun:
    """Serve an example app, send it ``requests`` concurrent GET /hello/<tag>-<n>
    and ``payments`` POST /payments/<tag>-<n> (each logged at a level that is
    written before the response), then stop it with SIGTERM (graceful)."""
    from concurrent.futures import ThreadPoolExecutor

    with open(stderr_path, "w") as stderr:
        server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stderr, stderr=stderr)
    served: List[int] = []
    not_logged: List[int] = []
    try:
        wait_for(lambda: server.poll() is not None or http_answers(base + "/health"), 60.0, "the app to answer")
        with open(stderr_path) as f:
            assert server.poll() is None, f.read()
        # Concurrent requests, so they spread over the workers.
        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(lambda n: http_json("GET", f"{base}/hello/{tag}-{n}")["pid"], range(requests)))
        for n in range(payments):
            http_json("POST", f"{base}/payments/{tag}-{n}")
            # Written before the response: the line is in the file now.
            if not any(line.endswith(f"app: payment {tag}-{n} captured") for line in read_lines(path)):
                not_logged.append(n)
    finally:
        server.send_signal(_signal.SIGTERM)  # graceful: workers exit normally and drain their queues
        try:
            server.wait(60.0)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    with open(stderr_path, errors="replace") as f:
        return WebRun(served, not_logged, server.returncode, f.read())
