"""Waiting and watching processes: ``wait_for`` (a condition and a deadline,
never a bare sleep), children, resource sampling, a slow disk."""

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional





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


async def eventually(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """wait_for for coroutines: poll ``condition`` without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


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
