"""Client processes in trouble, for the monitoring tests (issue 15): one that
drops (daemon up, a tiny queue, fallback_on_full=False, a flood) and one
that writes through its fallback (a path outside the daemon's allowed_dirs).

Each is a real process running the real handler until the test stops it; its
program name (what the daemon and the metrics show) is the script's name.
"""

import os
import subprocess
from typing import List

from .daemon import DAEMON_PYTHON

CLIENT_SCRIPT = r'''
import logging, sys, time
from clh_writerd import create_nonblocking_handler

path, endpoint, mode = sys.argv[1:4]
if mode == "drop":
    # A queue of 10 and bursts of 200: most of each burst is dropped and counted.
    options = dict(queue_size=10, fallback_on_full=False)
else:
    options = dict()
handler = create_nonblocking_handler(path, endpoint=endpoint, connect_timeout=5.0, report_interval=0.2, **options)
logger = logging.getLogger("flood")
logger.addHandler(handler)
logger.setLevel(logging.INFO)
logger.propagate = False
print("started", flush=True)
n = 0
while True:  # until the test stops this process
    for _ in range(200 if mode == "drop" else 5):
        logger.info("record %d %s", n, "x" * 100)
        n += 1
    time.sleep(0.005)  # pacing: leave the CPU to the daemon and the other processes
'''


class TroubledClient:
    """A client process (``mode`` "drop" or "fallback") writing ``path``; stop() ends it."""

    def __init__(self, workdir: str, program: str, path: str, endpoint: str, mode: str) -> None:
        script = os.path.join(workdir, program)  # the daemon shows basename(argv[0]) as the program
        with open(script, "w") as f:
            f.write(CLIENT_SCRIPT)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.program = program
        # stderr to a file: a pipe nobody reads would stop the flood once full.
        self.stderr_path = script + ".stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([DAEMON_PYTHON, script, path, endpoint, mode], cwd=workdir,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.proc.stdout.readline()  # the handler is built (bounded: the process exits on error)
        if line.strip() != "started":
            self.stop()
            raise AssertionError(f"{program} did not start: {line!r} {self.stderr()}")

    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()[-2000:]

    def stop(self) -> None:
        """Kill the process (nothing to drain: the test is about what it reported)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


def stop_all(clients: List[TroubledClient]) -> None:
    for client in clients:
        client.stop()


__all__ = ["TroubledClient", "stop_all", "CLIENT_SCRIPT"]
