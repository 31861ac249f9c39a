"""NonBlockingConcurrentHandler from logging.config.dictConfig.

The handler entry points "()" at the factory ``clh_writerd.create_nonblocking_handler``.
Its keys are split by the factory: the handler's own options (endpoint,
queue_size, sync_level, ...) and concurrent-log-handler's (maxBytes,
backupCount, use_gzip, ...). "formatter" and "level" are dictConfig's.

Run (from the project root):

    python client/dictconfig_example.py logs/app.log              # daemon at the default endpoint
    python client/dictconfig_example.py logs/app.log --endpoint ipc:///run/clh-writerd/writerd.sock
    python client/dictconfig_example.py logs/app.log --endpoint none  # no daemon: embedded writer

The log file may also come from $CLH_EXAMPLE_LOG; the default endpoint honours
$CLH_WRITERD_ENDPOINT. With no daemon listening, records go to the same file
through the fallback.
"""

import argparse
import logging
import logging.config
import os

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def build_config(logfile: str, endpoint: str = "") -> dict:
    handler = {
        "()": "clh_writerd.create_nonblocking_handler",
        "filename": logfile,
        "formatter": "plain",
        # concurrent-log-handler's options: they describe the file.
        "maxBytes": 10 * 1024 * 1024,
        "backupCount": 5,
        "use_gzip": True,
        # NonBlockingConcurrentHandler's options.
        "queue_size": 10000,
        "sync_level": "ERROR",  # level names are accepted
        "fallback_on_full": True,
    }
    if endpoint:
        handler["endpoint"] = None if endpoint == "none" else endpoint
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {"file": handler},
        "root": {"level": "INFO", "handlers": ["file"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logfile", nargs="?", default=os.environ.get("CLH_EXAMPLE_LOG", "logs/example.log"))
    parser.add_argument("--endpoint", default="", help="daemon endpoint, or 'none' for no daemon")
    parser.add_argument("--records", type=int, default=1000)
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.logfile)), exist_ok=True)

    logging.config.dictConfig(build_config(args.logfile, args.endpoint))
    log = logging.getLogger("example.dictconfig")
    for n in range(args.records):
        log.info("SEQ dictconfig %d %s", n, "x" * (n % 37))
    handler = logging.getLogger().handlers[0]
    print(f"state={handler.get_stats()['state']}")
    # Nothing else to do: logging.shutdown() at exit drains the queue.


if __name__ == "__main__":
    main()
