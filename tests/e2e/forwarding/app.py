"""An application process of the forwarding tests: logs sequence records at a rate.

Run as ``python app.py ENDPOINT PATH WRITER COUNT RATE MAX_BYTES [BACKUPS]``. It logs
through the real client (create_nonblocking_handler, gzip rotation) with the
format "%(message)s", so each line in the host's files is ``seq_record(WRITER, n)``,
and exits after stop() drained everything to the daemon or the fallback.
"""

import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/, for support

from support import seq_record  # noqa: E402

from clh_writerd.client.nonblocking import create_nonblocking_handler  # noqa: E402


def main() -> None:
    endpoint, path, writer, count, rate, max_bytes = sys.argv[1:7]
    backups = int(sys.argv[7]) if len(sys.argv) > 7 else 1000
    handler = create_nonblocking_handler(path, endpoint=endpoint, maxBytes=int(max_bytes), backupCount=backups,
                                         use_gzip=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"app.{writer}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    started = time.monotonic()
    per_second = float(rate)
    for n in range(int(count)):
        logger.info(seq_record(writer, n, f"p{n}-" + "y" * (n % 50)))
        ahead = n / per_second - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)  # pacing the load, not synchronising
    handler.stop()
    handler.close()


if __name__ == "__main__":
    main()
