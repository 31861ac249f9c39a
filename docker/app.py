"""A stand-in application for docker/compose.yaml: logs through the handler,
configured with dictConfig, into the shared log volume."""

import logging
import logging.config
import os
import time

NAME = os.environ.get("APP_NAME", "app")
LOG_DIR = os.environ.get("APP_LOG_DIR", "/var/log/app")

logging.config.dictConfig({
    "version": 1,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {
        "file": {
            "()": "clh_writerd.create_nonblocking_handler",
            "filename": os.path.join(LOG_DIR, "app.log"),
            "maxBytes": 10 * 1024 * 1024,
            "backupCount": 5,
            "use_gzip": True,
            # The apps and the daemon are different uids in one group: every
            # file and lock either creates must stay writable by the group
            # (the daemon after a fallback, the apps when they fall back).
            "chmod": 0o660,
            "formatter": "plain",
        }
    },
    "root": {"level": "INFO", "handlers": ["file"]},
})

if __name__ == "__main__":
    log = logging.getLogger(NAME)
    count = int(os.environ.get("APP_RECORDS", "0"))  # 0: run until stopped
    i = 0
    while not count or i < count:
        log.info("%s request %d handled", NAME, i)
        i += 1
        if not count:
            time.sleep(0.5)  # a slow, steady trickle for the demo
