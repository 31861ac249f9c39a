"""A FastAPI app that logs through AsyncConcurrentHandler, set up in its lifespan.

Each uvicorn worker process builds its own handler when its lifespan starts
and drains and closes it when the worker shuts down (`async with handler`).
Request handlers log as usual; nothing they do waits for the disk:

- ``GET /hello/{name}`` logs one INFO line (fire and forget);
- ``POST /payments/{pid}`` logs with ``await alog.critical(...)``: the
  response is sent only once the line is in the file.

Run a daemon (``clh-writerd``), then from the project root::

    CLH_WRITERD_LOG=$PWD/logs/fastapi.log uvicorn --app-dir client fastapi_app:app --workers 2

Environment: ``CLH_WRITERD_LOG`` (default ``./logs/fastapi.log``),
``CLH_WRITERD_ENDPOINT`` (default: the daemon's default endpoint; ``none``:
write the file in-process, no daemon).
"""

import contextlib
import logging
import os
from typing import Any, AsyncIterator, Dict

from fastapi import FastAPI, Request

from clh_writerd import AsyncConcurrentHandler, create_async_concurrent_handler

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
log = logging.getLogger("app")


def handler_from_env() -> AsyncConcurrentHandler:
    """The handler this process logs through, configured from the environment."""
    path = os.environ.get("CLH_WRITERD_LOG", os.path.join("logs", "fastapi.log"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kwargs: Dict[str, Any] = {}
    endpoint = os.environ.get("CLH_WRITERD_ENDPOINT")
    if endpoint:
        kwargs["endpoint"] = None if endpoint == "none" else endpoint
    handler = create_async_concurrent_handler(path, maxBytes=1024 * 1024, backupCount=20, use_gzip=True, **kwargs)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    handler = handler_from_env()
    async with handler:  # starts the sender task; on exit drains and closes
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        app.state.alog = handler.get_async_logger(log)
        log.info("worker %d started", os.getpid())
        try:
            yield
        finally:
            log.info("worker %d stopping", os.getpid())
            log.removeHandler(handler)


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> Dict[str, Any]:
    return {"ok": True, "pid": os.getpid()}


@app.get("/hello/{name}")
async def hello(name: str) -> Dict[str, Any]:
    log.info("hello %s", name)
    return {"hello": name, "pid": os.getpid()}


@app.post("/payments/{pid}")
async def payment(pid: str, request: Request) -> Dict[str, Any]:
    # Returns once the line is in the file (daemon confirmed, or written by
    # the fallback): the client may rely on it being logged.
    await request.app.state.alog.critical("payment %s captured", pid)
    return {"captured": pid, "pid": os.getpid()}
