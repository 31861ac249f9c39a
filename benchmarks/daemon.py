"""The real daemon for a scenario: ``python -m clh_writerd --config <toml>``
on a short ipc path, answered a ping before it is used, stopped with SIGTERM
(exit code checked) and killed if anything went wrong."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, Sequence

from clh_writerd import protocol
from clh_writerd.client.control import DaemonUnavailable, request

from .harness import ROOT

START_TIMEOUT = 30.0


def bench_env() -> Dict[str, str]:
    """The environment of every process a scenario starts (benchmarks importable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def short_socket_dir() -> str:
    # Unix socket paths are limited to 107 bytes: keep the socket dir short.
    return tempfile.mkdtemp(prefix="cwb-", dir="/tmp")


@contextlib.contextmanager
def running_daemon(workdir: str, allowed_dirs: Sequence[str]) -> Iterator[str]:
    """Start the daemon writing under ``allowed_dirs``; yield its endpoint."""
    socket_dir = short_socket_dir()
    endpoint = f"ipc://{socket_dir}/w.sock"
    config = os.path.join(workdir, "clh-writerd.toml")
    with open(config, "w") as f:
        f.write("[daemon]\n"
                f"endpoint = {json.dumps(endpoint)}\n"
                f"allowed_dirs = {json.dumps(list(allowed_dirs))}\n"
                'log_level = "warning"\n')
    stderr_path = os.path.join(workdir, "daemon.stderr")
    with open(stderr_path, "wb") as stderr:
        daemon = subprocess.Popen([sys.executable, "-m", "clh_writerd", "--config", config],
                                  cwd=workdir, stdout=stderr, stderr=stderr, env=bench_env())
    try:
        _wait_ready(daemon, endpoint, stderr_path)
        yield endpoint
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(START_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"daemon exited with {code}:\n{read_text(stderr_path)}")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _wait_ready(daemon: "subprocess.Popen[bytes]", endpoint: str, stderr_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.returncode}:\n{read_text(stderr_path)}")
        try:
            if isinstance(request(endpoint, protocol.encode_ping(), 0.5), protocol.Ok):
                return
        except DaemonUnavailable:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not answer within {START_TIMEOUT}s:\n{read_text(stderr_path)}")
        time.sleep(0.02)


def read_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()
