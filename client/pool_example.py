"""NonBlockingConcurrentHandler in a multiprocessing.Pool.

Each worker builds its own handler in the pool's ``initializer`` (a handler is
per process: its queue, sender thread and sockets are not shared). All
workers write one file: through the daemon, or, without one, each through
concurrent-log-handler's lock. Close the pool with close() + join(): it lets
every worker exit normally, which drains its queue (terminate(), also what
``with Pool() as pool:`` does on exit, kills workers and whatever they still
had queued).

Run (from the project root):

    python client/pool_example.py logs/app.log                  # daemon at the default endpoint
    python client/pool_example.py logs/app.log --endpoint none  # no daemon: embedded writers
    python client/pool_example.py logs/app.log --start-method spawn --tasks 12 --records 5000

The log file may also come from $CLH_EXAMPLE_LOG; the default endpoint honours
$CLH_WRITERD_ENDPOINT.
"""

import argparse
import logging
import multiprocessing
import os
from typing import Optional

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
_UNSET = ""


def setup_logging(logfile: str, endpoint: str = _UNSET) -> None:
    """Per-process logging setup: run in the parent and in every worker."""
    from clh_writerd import create_nonblocking_handler

    kwargs = {} if endpoint == _UNSET else {"endpoint": None if endpoint == "none" else endpoint}
    handler = create_nonblocking_handler(logfile, maxBytes=10 * 1024 * 1024, backupCount=5, **kwargs)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:  # a forked worker inherits the parent's handler: replace it
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def task(args: tuple) -> int:
    index, records = args
    log = logging.getLogger("example.pool")
    for n in range(records):
        log.info("SEQ task%d %d %s", index, n, "x" * (n % 37))
    return os.getpid()


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logfile", nargs="?", default=os.environ.get("CLH_EXAMPLE_LOG", "logs/example.log"))
    parser.add_argument("--endpoint", default=_UNSET, help="daemon endpoint, or 'none' for no daemon")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--records", type=int, default=1000, help="records per task")
    parser.add_argument("--start-method", choices=multiprocessing.get_all_start_methods())
    args = parser.parse_args(argv)
    logfile = os.path.abspath(args.logfile)
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    if args.start_method:
        multiprocessing.set_start_method(args.start_method)

    setup_logging(logfile, args.endpoint)
    logging.getLogger("example.pool").info("SEQ parent 0 starting %d tasks", args.tasks)
    pool = multiprocessing.Pool(args.processes, initializer=setup_logging, initargs=(logfile, args.endpoint))
    pids = pool.map(task, [(i, args.records) for i in range(args.tasks)], chunksize=1)
    pool.close()
    pool.join()  # workers exit normally: each drains its own queue
    print(f"{args.tasks} tasks ran in {len(set(pids))} worker processes")


if __name__ == "__main__":
    main()
