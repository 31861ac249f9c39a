"""A Flask app under gunicorn (several workers) logging through NonBlockingConcurrentHandler.

Logging is configured with ``logging.config.dictConfig`` when the module is
imported, before the app is built. Gunicorn imports the app in every worker
(without ``--preload``), so each worker builds its own handler: its own
queue, sender thread and sockets. All workers write one file through the
daemon (or, without one, each through concurrent-log-handler's lock).
With ``--preload`` the master imports the module once and the workers
inherit the handler through ``fork()``; it rebuilds itself in each worker on
the first record, so that works too.

- ``GET /hello/<name>`` logs one INFO line: queued, written by the sender thread;
- ``POST /payments/<pid>`` logs one WARNING line. ``sync_level`` is WARNING
  here (the default is ERROR), so the line is in the file before the
  response is sent.

A worker that exits normally (SIGTERM to the master, ``--max-requests``
recycling, SIGINT) drains its queue at interpreter exit. A worker killed for
exceeding ``--timeout`` (SIGKILL) loses what it still had queued.

Run a daemon (``clh-writerd``), then from the project root::

    CLH_WRITERD_LOG=$PWD/logs/flask.log gunicorn --chdir client -w 4 -b 127.0.0.1:8000 flask_app:app

Environment: ``CLH_WRITERD_LOG`` (default ``./logs/flask.log``),
``CLH_WRITERD_ENDPOINT`` (default: the daemon's default endpoint; ``none``:
no daemon, each worker writes the file itself through its sender thread).
"""

import logging
import logging.config
import os
from typing import Any, Dict

from flask import Flask, jsonify

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
log = logging.getLogger("app")


def logging_config() -> Dict[str, Any]:
    """The dictConfig dictionary: one NonBlockingConcurrentHandler on the root logger."""
    path = os.path.abspath(os.environ.get("CLH_WRITERD_LOG", os.path.join("logs", "flask.log")))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler: Dict[str, Any] = {
        "()": "clh_writerd.create_nonblocking_handler",
        "filename": path,
        "formatter": "plain",
        "maxBytes": 10 * 1024 * 1024,  # concurrent-log-handler: the file
        "backupCount": 10,
        "use_gzip": True,
        "sync_level": "WARNING",  # the handler: WARNING+ are written before the call returns
    }
    endpoint = os.environ.get("CLH_WRITERD_ENDPOINT")
    if endpoint:
        handler["endpoint"] = None if endpoint == "none" else endpoint
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {"file": handler},
        "root": {"level": "INFO", "handlers": ["file"]},
    }


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/health")
    def health() -> Any:
        return jsonify(ok=True, pid=os.getpid())

    @app.get("/hello/<name>")
    def hello(name: str) -> Any:
        log.info("hello %s", name)
        return jsonify(hello=name, pid=os.getpid())

    @app.post("/payments/<pid>")
    def payment(pid: str) -> Any:
        # At or above sync_level: in the file (daemon confirmed, or written by
        # the fallback) when this call returns, before the response goes out.
        log.warning("payment %s captured", pid)
        return jsonify(captured=pid, pid=os.getpid())

    return app


# Configure logging first, then build the app (Flask's recommended order).
logging.config.dictConfig(logging_config())
app = create_app()
log.info("worker %d started", os.getpid())

if __name__ == "__main__":  # development only: Flask's own single-process server
    app.run(host="127.0.0.1", port=8000)
