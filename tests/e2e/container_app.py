"""An app container for tests/e2e/test_container.py.

Runs inside the project's image as the app services of docker/compose.yaml do
(uid 10002, group 10001, the socket and log volumes, CLH_WRITERD_ENDPOINT): logs sequence
records through NonBlockingConcurrentHandler until SIGTERM (``podman kill
--signal TERM``) or ``limit`` records, closes the handler (which drains its
queue to the daemon or the fallback) and prints one JSON line: how many
records it logged and the handler's final ``get_stats()``.

usage: python /tests/e2e/container_app.py WRITER PATH LIMIT
"""

import json
import logging
import signal
import sys
import time

from support import seq_record

from clh_writerd import create_nonblocking_handler

# Small files, so the daemon and the fallback both rotate; nothing rotates away.
MAX_BYTES = 256 * 1024
BACKUP_COUNT = 1000
# At most about 10k records/s per writer: load, without starving the 2-core CI machine.
PACE_EVERY, PACE_SECONDS = 100, 0.01


def main(writer: str, path: str, limit: int) -> None:
    stopping = []
    # As PID 1 of its container, the process ignores SIGTERM unless it handles it.
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    # chmod as docker/app.py: the apps (10002) and the daemon (10001) share
    # the files through their group.
    handler = create_nonblocking_handler(path, maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT, chmod=0o660)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(writer)
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    count = 0
    while count < limit and not stopping:
        logger.info(seq_record(writer, count))
        count += 1
        if count % PACE_EVERY == 0:
            time.sleep(PACE_SECONDS)
    handler.close()
    print(json.dumps({"writer": writer, "count": count, "stats": handler.get_stats()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
