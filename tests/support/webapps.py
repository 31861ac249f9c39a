"""Driving the example web apps (Flask, FastAPI, aiohttp) over HTTP."""

import signal as _signal
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, List



from .oracle import read_lines
from .processes import wait_for


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
