"""Child-process entry points for the client tests.

Top-level functions only, so both ``fork`` and ``spawn`` multiprocessing
contexts can run them. A child builds its own handler with
``create_nonblocking_handler`` (as an application's logging config would),
logs sequence records through a ``logging.Logger``, and writes what the test
needs to know afterwards (its pid, the handler's final ``get_stats()``, the
slowest ``emit()``) to a JSON file, since a JSON file reads the same whichever
start method made the child.
"""

import json
import logging
import os
import time
from typing import Any, Dict, List

from support import read_lines, seq_record

from clh_writerd.client.nonblocking import create_nonblocking_handler

# The fixed line format of these tests: every line in the file must be exactly
# render_line(...) of a record some child logged.
FORMAT = "%(levelname)s %(name)s %(process)d: %(message)s"
LOGGER_PREFIX = "delivery"

# Small files, so every scenario rotates (and gzips) many times.
MAX_BYTES = 200 * 1024
BACKUP_COUNT = 1000  # the protocol's maximum: nothing rotates out of existence


def message(writer: str, n: int) -> str:
    """The message of record n of ``writer``: a sequence record, some non-ASCII."""
    if n % 10 == 3:
        return seq_record(writer, n, "ünïcødé € ✓ x")
    return seq_record(writer, n)


def render_line(levelname: str, writer: str, pid: int, n: int) -> str:
    """The exact line FORMAT makes of record n of ``writer`` logged by ``pid``."""
    return f"{levelname} {LOGGER_PREFIX}.{writer} {pid}: {message(writer, n)}"


def make_logger(writer: str, path: str, handler_kwargs: Dict[str, Any]):
    # handler_kwargs may override the file's defaults (a test that needs large files).
    file_options = {"maxBytes": MAX_BYTES, "backupCount": BACKUP_COUNT, "use_gzip": True}
    handler = create_nonblocking_handler(path, **{**file_options, **handler_kwargs})
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger(f"{LOGGER_PREFIX}.{writer}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers[:] = [handler]
    return logger, handler


def _write_result(result_path: str, result: Dict[str, Any]) -> None:
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)


def read_result(result_path: str) -> Dict[str, Any]:
    with open(result_path) as f:
        return json.load(f)


def log_count(writer: str, path: str, count: int, handler_kwargs: Dict[str, Any], result_path: str,
              close: bool = True, sync_every: int = 0) -> None:
    """Log ``count`` records (INFO; ERROR every ``sync_every``-th when set), timing each call.

    With ``close=False`` the child neither stops nor closes the handler: it
    returns and relies on interpreter exit (atexit) to drain the queue, which
    only happens in children that exit through the interpreter (spawn).
    """
    logger, handler = make_logger(writer, path, handler_kwargs)
    slowest = 0.0
    errors: List[int] = []
    for n in range(count):
        level = logging.ERROR if sync_every and n % sync_every == 0 else logging.INFO
        if level == logging.ERROR:
            errors.append(n)
        t0 = time.perf_counter()
        logger.log(level, message(writer, n))
        slowest = max(slowest, time.perf_counter() - t0)
    result: Dict[str, Any] = {"writer": writer, "pid": os.getpid(), "count": count, "slowest_emit": slowest,
                              "errors": errors}
    if close:
        result["drained"] = handler.stop()
        result["stats"] = handler.get_stats()
        handler.close()
    _write_result(result_path, result)


def log_until(writer: str, path: str, handler_kwargs: Dict[str, Any], result_path: str, progress: Any,
              slot: int, stop: Any, pace_every: int = 10, pace: float = 0.005) -> None:
    """Log INFO records until ``stop`` is set, publishing how many in ``progress[slot]``.

    The short sleep every ``pace_every`` records paces the load so a fault can
    land in the middle of it; the test synchronises on ``progress``.
    """
    logger, handler = make_logger(writer, path, handler_kwargs)
    n = 0
    slowest = 0.0
    while not stop.is_set():
        t0 = time.perf_counter()
        logger.info(message(writer, n))
        slowest = max(slowest, time.perf_counter() - t0)
        n += 1
        if n % pace_every == 0:
            progress[slot] = n
            time.sleep(pace)
    progress[slot] = n
    drained = handler.stop()
    result = {"writer": writer, "pid": os.getpid(), "count": n, "slowest_emit": slowest,
              "drained": drained, "stats": handler.get_stats()}
    handler.close()
    _write_result(result_path, result)


def sync_visible(writer: str, path: str, handler_kwargs: Dict[str, Any], result_path: str,
                 rounds: int, info_per_round: int = 5) -> None:
    """Each round: a few INFO records, then one ERROR (sync level); right after
    the ERROR's emit() returns, read the file family and note whether its line
    is there."""
    logger, handler = make_logger(writer, path, handler_kwargs)
    pid = os.getpid()
    n = 0
    absent: List[int] = []
    checked: List[int] = []
    for _ in range(rounds):
        for _ in range(info_per_round):
            logger.info(message(writer, n))
            n += 1
        logger.error(message(writer, n))
        line = render_line("ERROR", writer, pid, n)
        if line not in read_lines(path):
            absent.append(n)
        checked.append(n)
        n += 1
    state_during = handler.get_stats()["state"]
    drained = handler.stop()
    stats = handler.get_stats()
    handler.close()
    _write_result(result_path, {"writer": writer, "pid": pid, "count": n, "errors": checked, "absent": absent,
                                "state": state_during, "drained": drained, "stats": stats})


def log_count_atexit(writer: str, path: str, count: int, handler_kwargs: Dict[str, Any], result_path: str) -> None:
    """log_count without stop()/close(): the interpreter's exit must drain."""
    log_count(writer, path, count, handler_kwargs, result_path, close=False)
