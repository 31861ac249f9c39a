"""A plain script: NonBlockingConcurrentHandler configured in code, nothing else.

The handler is built with ``create_nonblocking_handler`` and put on the root
logger. INFO records are queued and written by the sender thread; the ERROR
record (at ``sync_level``) is in the file when ``log.error()`` returns. Nothing
has to be closed by hand: interpreter exit drains the queue (within
``drain_timeout``). At the end the script prints the handler's ``get_stats()``
as JSON.

Run (from the project root):

    python client/plain_script.py logs/app.log                  # daemon at the default endpoint
    python client/plain_script.py logs/app.log --endpoint none  # no daemon: embedded writer

With no daemon listening at the endpoint, the records go to the same file
through the fallback. The log file may also come from $CLH_EXAMPLE_LOG; the
default endpoint honours $CLH_WRITERD_ENDPOINT.
"""

import argparse
import json
import logging
import os

from clh_writerd import create_nonblocking_handler

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def setup_logging(logfile: str, endpoint: str = "") -> logging.Handler:
    """Root logger -> one NonBlockingConcurrentHandler. ``endpoint``: "" for the default, "none" for no daemon."""
    kwargs = {}
    if endpoint:
        kwargs["endpoint"] = None if endpoint == "none" else endpoint
    handler = create_nonblocking_handler(
        logfile,
        maxBytes=10 * 1024 * 1024,  # concurrent-log-handler's options: the file
        backupCount=5,
        use_gzip=True,
        sync_level=logging.ERROR,  # the handler's own (ERROR is the default)
        **kwargs,
    )
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logfile", nargs="?", default=os.environ.get("CLH_EXAMPLE_LOG", "logs/example.log"))
    parser.add_argument("--endpoint", default="", help="daemon endpoint, or 'none' for no daemon")
    parser.add_argument("--records", type=int, default=1000)
    args = parser.parse_args()
    logfile = os.path.abspath(args.logfile)
    os.makedirs(os.path.dirname(logfile), exist_ok=True)

    handler = setup_logging(logfile, args.endpoint)
    log = logging.getLogger("example.plain")
    for n in range(args.records):
        log.info("SEQ plain %d %s", n, "x" * (n % 37))
    # At sync_level: written (daemon confirmed, or fallback) before error() returns.
    log.error("SEQ plain-sync 0 an ERROR record")
    print(json.dumps(handler.get_stats(), sort_keys=True))
    # No close() needed: logging.shutdown() and the handler's exit hook drain the queue.


if __name__ == "__main__":
    main()
