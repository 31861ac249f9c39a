"""Handler options end to end: every argument CLH accepts constructs a handler
whose records reach the file, embedded and through a real daemon; a refused
constructor leaves nothing failing at exit (a child interpreter). The options
themselves: tests/unit/client/test_options.py."""

import datetime
import logging
import os
import subprocess
import sys
import warnings
from typing import Any, Dict

import pytest
from support import check_sequences, read_lines, seq_record

# The factories each Python runs (the asyncio handler needs 3.8+).
from tests.unit.client.test_options import FACTORIES, HANDLER_TYPES


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_constructor_that_raised_leaves_nothing_failing_at_exit(tmp_path, factory):
    """A refused handler must not make logging.shutdown() print at exit."""
    code = (f"import clh_writerd\n"
            f"try:\n    clh_writerd.{factory.__name__}({str(tmp_path / 'a.log')!r}, queue_size=0)\n"
            f"except ValueError as exc:\n    print('refused', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=60)
    assert out.returncode == 0 and "refused" in out.stdout
    assert out.stderr == "", out.stderr


# Every argument of CLH's two constructors, with values across the ranges CLH
# accepts (not the daemon's narrower policy: a file it refuses is written by
# the fallback).
ROTATING = [
    {"maxBytes": 0}, {"maxBytes": 1, "backupCount": 40}, {"maxBytes": 2**40}, {"backupCount": 0}, {"backupCount": 2000},
    {"mode": "a"}, {"encoding": "utf-8"}, {"encoding": "latin-1"}, {"debug": True}, {"delay": None},
    {"use_gzip": True, "maxBytes": 200, "backupCount": 40}, {"chmod": 0o600}, {"umask": 0o077},
    {"newline": "\r\n"}, {"terminator": "\r\n"}, {"unicode_error_policy": "strict"},
    {"unicode_error_policy": "replace"}, {"keep_file_open": False}, {"lock_file_directory": "LOCKS"},
]
TIMED = [
    {"when": when} for when in ("S", "M", "H", "D", "MIDNIGHT", "W0", "W6", "h")
] + [{"when": "H", "interval": 1000}, {"when": "D", "utc": True}, {"when": "MIDNIGHT", "atTime": datetime.time(3, 0)},
     {"when": "H", "errors": "replace"}, {"when": "H", "maxBytes": 100, "backupCount": 2000},
     {"when": "S", "delay": True}]


def _user_group() -> Dict[str, Any]:
    import grp
    import pwd

    return {"owner": (pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name)}


def _write_through(factory: Any, path: str, endpoint: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = dict(kwargs)
    if kwargs.get("lock_file_directory") == "LOCKS":
        kwargs["lock_file_directory"] = os.path.join(os.path.dirname(path), "locks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "the daemon would refuse ...": expected for some
        handler = factory(path, use_timed="when" in kwargs, endpoint=endpoint, **kwargs)
    assert isinstance(handler, HANDLER_TYPES)
    logger = logging.getLogger(f"clh-args.{path}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for n in range(20):
            logger.warning(seq_record("w", n))
    finally:
        logger.removeHandler(handler)
        handler.close()
    # read_lines reads .gz files; _read splits on \r\n too and decodes any encoding.
    lines = read_lines(path) if kwargs.get("use_gzip") else _read(path, kwargs.get("encoding", "utf-8"))
    check_sequences(lines, {"w": 20}).assert_complete()
    return handler.get_stats()


def _read(path: str, encoding: str) -> Any:
    from support import family_files

    lines = []
    for name in family_files(path):
        with open(name, encoding=encoding, newline="") as f:
            lines += f.read().splitlines()
    return lines


@pytest.mark.parametrize("factory", FACTORIES, ids=["thread", "async"][:len(FACTORIES)])
def test_every_clh_argument_constructs_a_handler_and_records_reach_the_file(tmp_path, start_daemon, factory):
    daemon = start_daemon()  # allowed_dirs: tmp_path/logs
    cases = ROTATING + TIMED + [_user_group()]
    for endpoint in (None, daemon.endpoint):
        for i, kwargs in enumerate(cases):
            directory = tmp_path / "logs" / f"{'embedded' if endpoint is None else 'daemon'}-{i}"
            directory.mkdir(parents=True)
            try:
                stats = _write_through(factory, str(directory / "app.log"), endpoint, kwargs)
            except AssertionError as exc:
                raise AssertionError(f"{kwargs} (endpoint {endpoint}): {exc}") from None
            if endpoint is not None and kwargs == {"maxBytes": 0}:
                assert stats["fallback_written"] == 0, stats  # the daemon path really was taken
