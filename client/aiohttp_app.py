"""An aiohttp app that logs through AsyncConcurrentHandler, set up at startup.

The handler is built in a cleanup context (started with the app, drained and
closed on shutdown). Request handlers log as usual; nothing they do waits for
the disk:

- ``GET /hello/{name}`` logs one INFO line (fire and forget);
- ``POST /payments/{pid}`` logs with ``await alog.critical(...)``: the
  response is sent only once the line is in the file.

Run a daemon (``clh-writerd``), then from the project root::

    python client/aiohttp_app.py --port 8080 --log $PWD/logs/aiohttp.log

``--endpoint`` (or ``CLH_WRITERD_ENDPOINT``) picks the daemon; ``none``
writes the file in-process. SIGINT or SIGTERM stop the server cleanly.
"""

import argparse
import logging
import os
from typing import Any, AsyncIterator, Dict, Optional

from aiohttp import web

from clh_writerd import AsyncLogger, create_async_concurrent_handler

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
log = logging.getLogger("app")
ALOG = web.AppKey("alog", AsyncLogger)


def logging_context(path: str, endpoint: Optional[str]) -> Any:
    """A cleanup context: the handler lives exactly as long as the app."""

    async def handler_lifetime(app: web.Application) -> AsyncIterator[None]:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kwargs: Dict[str, Any] = {}
        if endpoint:
            kwargs["endpoint"] = None if endpoint == "none" else endpoint
        handler = create_async_concurrent_handler(path, maxBytes=1024 * 1024, backupCount=20, use_gzip=True,
                                                  **kwargs)
        handler.setFormatter(logging.Formatter(FORMAT))
        async with handler:  # starts the sender task; on exit drains and closes
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
            app[ALOG] = handler.get_async_logger(log)
            log.info("worker %d started", os.getpid())
            try:
                yield
            finally:
                log.info("worker %d stopping", os.getpid())
                log.removeHandler(handler)

    return handler_lifetime


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "pid": os.getpid()})


async def hello(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    log.info("hello %s", name)
    return web.json_response({"hello": name, "pid": os.getpid()})


async def payment(request: web.Request) -> web.Response:
    pid = request.match_info["pid"]
    # Returns once the line is in the file (daemon confirmed, or written by
    # the fallback): the client may rely on it being logged.
    await request.app[ALOG].critical("payment %s captured", pid)
    return web.json_response({"captured": pid, "pid": os.getpid()})


def make_app(path: str, endpoint: Optional[str]) -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(logging_context(path, endpoint))
    app.router.add_get("/health", health)
    app.router.add_get("/hello/{name}", hello)
    app.router.add_post("/payments/{pid}", payment)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log", default=os.path.join("logs", "aiohttp.log"))
    parser.add_argument("--endpoint", default=os.environ.get("CLH_WRITERD_ENDPOINT"))
    args = parser.parse_args()
    web.run_app(make_app(args.log, args.endpoint), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
