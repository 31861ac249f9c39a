"""Real gunicorn and uvicorn, configured as apps configure them: dictConfig
in the app module, with its defaults, at import.

With ``--preload`` the handler and its sender thread exist in gunicorn's
master before it forks the workers; ``--max-requests`` makes it fork new
ones all along. uvicorn ``--workers`` spawns its workers and SIGTERMs them
at shutdown.
"""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List

import pytest

from support import check_sequences, free_tcp_port, read_lines, wait_for
from support.webapps import http_answers

from .shapes import app_env, write_app

REQUESTS = 600

# Each request logs one record named by its number (/log/<n>).
WSGI_APP = '''
import logging.config
logging.config.dictConfig({
    "version": 1,
    "formatters": {"plain": {"format": "%(message)s"}},
    "handlers": {"file": {"()": "clh_writerd.create_nonblocking_handler", "filename": os.environ["APP_LOG"],
                          "maxBytes": 50000, "backupCount": 200, "formatter": "plain"}},
    "root": {"handlers": ["file"], "level": "INFO"},
})
log = logging.getLogger("app")
log.info(seq_record("master", 0))


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.startswith("/log/"):
        log.info(seq_record("req", int(path[5:])))
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"ok": True, "pid": os.getpid()}).encode()]
'''

ASGI_APP = '''
import logging.config
logging.config.dictConfig({
    "version": 1,
    "formatters": {"plain": {"format": "%(message)s"}},
    "handlers": {"file": {"()": "clh_writerd.create_async_concurrent_handler", "filename": os.environ["APP_LOG"],
                          "maxBytes": 50000, "backupCount": 200, "formatter": "plain"}},
    "loggers": {"app": {"handlers": ["file"], "level": "INFO", "propagate": False}},
})
log = logging.getLogger("app")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path.startswith("/log/"):
        log.info(seq_record("req", int(path[5:])))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps({"ok": True, "pid": os.getpid()}).encode()})
'''


def serve(tmp_path, cmd: List[str], env: dict, port: int, requests: int) -> subprocess.CompletedProcess:
    """Start the server, send ``requests`` concurrent GET /log/<n>, stop it
    with SIGTERM (graceful) and wait for it; its stderr in the result."""
    stderr_path = tmp_path / "server.stderr"
    with open(stderr_path, "w") as stderr:
        server = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=stderr, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or http_answers(base + "/health"), 60.0, "the server to answer")
        assert server.poll() is None, stderr_path.read_text()
        from support.webapps import http_json

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: http_json("GET", f"{base}/log/{n}"), range(requests)))
    finally:
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60.0)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        stopped = time.monotonic() - started
    return subprocess.CompletedProcess(cmd, server.returncode, str(stopped), stderr_path.read_text())


GUNICORN = [("sync", []), ("gthread", ["--threads", "4"]), ("sync", ["--max-requests", "40"])]


@pytest.mark.guarantee
@pytest.mark.parametrize("worker,extra", GUNICORN, ids=["sync", "gthread", "sync-max-requests"])
def test_gunicorn_preload_every_request_is_logged(tmp_path, daemon, guarantee, worker, extra):
    pytest.importorskip("gunicorn")
    path = os.path.join(daemon.log_dir, "web.log")
    write_app(str(tmp_path), WSGI_APP, name="wsgiapp.py")
    port = free_tcp_port()
    cmd = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "4", "--worker-class", worker, *extra,
           "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "20", "wsgiapp:app"]
    done = serve(tmp_path, cmd, app_env(daemon.endpoint, APP_LOG=path), port, REQUESTS)
    assert done.returncode == 0, done.stderr
    report = check_sequences(read_lines(path), {"req": REQUESTS, "master": 1})
    guarantee(f"J. gunicorn --preload ({worker}{', --max-requests 40' if extra and worker == 'sync' else ''})",
              f"4 workers forked from a master whose handler (dictConfig at import) already runs; {REQUESTS} "
              f"concurrent requests, each logs one record; graceful stop in {float(done.stdout):.1f} s",
              report.expected, report.missing_count, report.duplicates)
    assert report.missing_count == 0, (report.missing, done.stderr[-4000:])
    report.assert_complete(allow_duplicates=True)
    assert float(done.stdout) < 15.0, "gunicorn's graceful stop waited for a worker"


@pytest.mark.guarantee
def test_uvicorn_workers_every_request_is_logged(tmp_path, daemon, guarantee):
    pytest.importorskip("uvicorn")
    path = os.path.join(daemon.log_dir, "asgi.log")
    write_app(str(tmp_path), ASGI_APP, name="asgiapp.py")
    port = free_tcp_port()
    cmd = [sys.executable, "-m", "uvicorn", "--workers", "2", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "asgiapp:app"]
    done = serve(tmp_path, cmd, app_env(daemon.endpoint, APP_LOG=path), port, REQUESTS)
    assert done.returncode == 0, done.stderr
    report = check_sequences(read_lines(path), {"req": REQUESTS})
    guarantee("J. uvicorn --workers 2", f"AsyncConcurrentHandler from dictConfig at import in each spawned worker; "
              f"{REQUESTS} concurrent requests, each logs one record; SIGTERM to uvicorn (graceful) in "
              f"{float(done.stdout):.1f} s", report.expected, report.missing_count, report.duplicates)
    report.assert_complete(allow_duplicates=True)
