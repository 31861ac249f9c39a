"""One writing process of the ``e2e`` scenario:
``python -m benchmarks.e2e_writer SPEC_JSON``.

Builds its handler, prints ``ready``, waits for a line on stdin (the common
start), logs ``per_process`` records ``logger.info(MESSAGE, f"p{proc}", seq)``,
closes the handler (which drains: for the daemon path, every batch acked as
written) and prints one JSON line: when it started and finished
(``time.monotonic()``, the same clock in every process on Linux) and the
handler's stats.
"""

import json
import sys
import time

from .handlers import MESSAGE, build, new_logger


def main() -> None:
    spec = json.loads(sys.argv[1])
    built = build(spec["handler"], spec["dir"], spec.get("endpoint"))
    info = new_logger("bench.e2e", built.handler).info
    proc_name = f"p{spec['proc']}"
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    for seq in range(spec["per_process"]):
        info(MESSAGE, proc_name, seq)
    logged = time.monotonic()
    built.close()
    finished = time.monotonic()
    stats = {k: v for k, v in built.stats().items() if isinstance(v, (int, str))}
    print(json.dumps({"started": started, "logged": logged, "finished": finished, "stats": stats}), flush=True)


if __name__ == "__main__":
    main()
