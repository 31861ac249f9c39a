"""An application process for tests/e2e/client/test_monitoring.py: real handlers
in their own process, driven line by line over stdin (one JSON reply per
command on stdout), its stderr left to the test.

    python monitoring_app.py '{"endpoint": ..., "root": true,
                               "handlers": [{"path": ..., "kwargs": {...}}]}'

``root``: every handler on the root logger (the case where a handler could
receive its own warnings); else handler i on logger ``app.i``, nothing on
the root. Records are the oracle's ``SEQ w<i> <n> ...`` lines (w0 for root).

Commands: ``log N [LEVEL]`` (ERROR: sync records), ``load`` / ``stopload`` (log continuously on a thread),
``flush``, ``stats``, ``close`` (close every handler, reply with their
get_stats(), exit).
"""

import json
import logging
import sys
import threading
from typing import Any, Dict, List

from clh_writerd.client.nonblocking import create_nonblocking_handler


def seq_record(writer: str, n: int) -> str:
    return f"SEQ {writer} {n} {'x' * (n % 37)}"  # support.oracle.seq_record


class App:
    def __init__(self, spec: Dict[str, Any]) -> None:
        self.handlers = []
        self.loggers: List[logging.Logger] = []
        for i, h in enumerate(spec["handlers"]):
            handler = create_nonblocking_handler(h["path"], endpoint=spec["endpoint"], **h.get("kwargs", {}))
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger = logging.getLogger() if spec.get("root") else logging.getLogger(f"app.{i}")
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            self.handlers.append(handler)
            if logger not in self.loggers:
                self.loggers.append(logger)
        self.writers = ["w0"] if spec.get("root") else [f"w{i}" for i in range(len(self.handlers))]
        self.counts = dict.fromkeys(self.writers, 0)
        self.halt = threading.Event()
        self.loader = None

    def log(self, n: int, level: int = logging.INFO) -> None:
        for logger, writer in zip(self.loggers, self.writers):
            for _ in range(n):
                logger.log(level, seq_record(writer, self.counts[writer]))
                self.counts[writer] += 1

    def _load(self) -> None:
        while not self.halt.is_set():
            self.log(5)
            self.halt.wait(0.005)  # pacing: about 1000 records/s per logger

    def command(self, line: str) -> Any:
        word, *args = line.split()
        if word == "log":  # log N [LEVEL]
            self.log(int(args[0]), logging.getLevelName(args[1]) if len(args) > 1 else logging.INFO)
        elif word == "load":
            self.halt.clear()
            self.loader = threading.Thread(target=self._load)
            self.loader.start()
        elif word == "stopload":
            self.halt.set()
            self.loader.join()
        elif word == "flush":
            for handler in self.handlers:
                handler.flush()
        elif word == "stats":
            pass
        elif word == "close":
            for handler in self.handlers:
                handler.close()
        else:
            raise ValueError(line)
        return {"counts": self.counts, "stats": [h.get_stats() for h in self.handlers],
                "sessions": [h._client_id.session for h in self.handlers]}


def main() -> None:
    app = App(json.loads(sys.argv[1]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        reply = app.command(line)
        print(json.dumps(reply), flush=True)
        if line.strip() == "close":
            return


if __name__ == "__main__":
    main()
