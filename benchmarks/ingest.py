"""``ingest``: how fast the daemon turns batches into file lines, and its ceilings.

Rows, all on the same records:

- ``daemon ingest``: the real daemon (``python -m clh_writerd``) fed by a
  separate process over ipc, a window of unacknowledged batches in flight;
  first send to last ack. The file must then hold every line.
- ``decode only``: ``protocol.decode_request`` over the same frames, the
  ceiling set by unpacking and validation.
- ``daemon ingest, fields`` and ``decode+render only``: the same two for
  the same records sent as field values (render mode ``fields``, what a
  handler with a stock formatter sends): the daemon renders every line.
- ``BatchWriter only``: the write seam alone, one ``write()`` per batch, no
  daemon: the ceiling set by CLH's lock, rollover check and the file write.
- ``CLH per record``: ``logger.info`` into a ConcurrentRotatingFileHandler,
  one lock per record, the baseline the daemon has to beat.
"""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import List

from concurrent_log_handler import ConcurrentRotatingFileHandler

from clh_writerd import protocol
from clh_writerd._batchwrite import DEFAULT_CHUNK_CHARS, BatchWriter, build_handler
from clh_writerd.daemon.server import GC_THRESHOLD

from .daemon import bench_env, running_daemon
from .harness import ROOT, Goal, Params, Row, scenario
from .workload import PROGRAM, count_lines, encode_batches, file_options, make_batches

BASELINE = "CLH per record"
FEED_TIMEOUT = 300.0


@scenario("ingest", baseline=BASELINE,
          goals=[Goal("daemon ingest", min_rate=500_000, min_ratio=10.0),
                 Goal("daemon ingest, fields", min_ratio=10.0)])
def ingest(params: Params) -> List[Row]:
    """Daemon ingest over ipc vs decode and write ceilings vs CLH per record."""
    workdir = tempfile.mkdtemp(prefix="clh-bench-", dir=params.workdir)
    try:
        batches = make_batches(params)
        return [
            daemon_ingest(params, workdir),
            decode_only(params, batches),
            daemon_ingest(params, workdir, fields=True),
            decode_render_only(params),
            batchwriter_only(params, batches, os.path.join(workdir, "batchwriter")),
            clh_per_record(params, batches, os.path.join(workdir, "per-record")),
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _expect_lines(path: str, expected: int, what: str) -> None:
    found = count_lines(path)
    if found != expected:
        raise RuntimeError(f"{what}: {path} holds {found} lines, expected {expected}")


def daemon_ingest(params: Params, workdir: str, fields: bool = False) -> Row:
    log_dir = os.path.join(workdir, "daemon-logs-fields" if fields else "daemon-logs")
    path = os.path.join(log_dir, "ingest.log")
    with running_daemon(workdir, [log_dir]) as endpoint:
        feeder = subprocess.run(
            [sys.executable, "-m", "benchmarks.feeder", endpoint, path, json.dumps(vars(params))]
            + (["fields"] if fields else []),
            cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=FEED_TIMEOUT,
        )
        if feeder.returncode != 0:
            raise RuntimeError(f"feeder exited with {feeder.returncode}:\n{feeder.stderr}")
        result = json.loads(feeder.stdout.strip().splitlines()[-1])
    name = "daemon ingest, fields" if fields else "daemon ingest"
    _expect_lines(path, params.records + result["warmup_records"], name)
    return Row(name, result["records"], result["seconds"],
               f"ipc, {params.batch}/batch, window {params.window}" + (", the daemon renders" if fields else ""))


def decode_only(params: Params, batches: List[List[str]]) -> Row:
    client = protocol.new_client_id(PROGRAM)
    options = file_options(params)
    payloads = [protocol.encode_batch(client, seq, "/tmp/x.log", options, batch)
                for seq, batch in enumerate(batches, start=1)]
    decode = protocol.decode_request
    started = time.perf_counter()
    for payload in payloads:
        decode(payload)
    return Row("decode only", params.records, time.perf_counter() - started, "protocol.decode_request")


def decode_render_only(params: Params) -> Row:
    """The ceiling of the fields path before the file: unpack, check every
    value and render every line, with the cycle collector tuned as the
    daemon serves."""
    payloads = encode_batches(params, "/tmp/x.log", fields=True)
    decode = protocol.decode_request
    before = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *before[1:])
    try:
        started = time.perf_counter()
        for payload in payloads:
            decode(payload).lines(_no_render_error)  # type: ignore[union-attr]
        seconds = time.perf_counter() - started
    finally:
        gc.set_threshold(*before)
    return Row("decode+render only", params.records, seconds,
               "protocol.decode_request, then every line rendered")


def _no_render_error() -> None:
    raise RuntimeError("a benchmark record failed to render")


def batchwriter_only(params: Params, batches: List[List[str]], directory: str) -> Row:
    os.makedirs(directory)
    path = os.path.join(directory, "batchwriter.log")
    writer = BatchWriter(build_handler(path, file_options(params)), DEFAULT_CHUNK_CHARS)
    try:
        started = time.perf_counter()
        for batch in batches:
            writer.write(batch)
        seconds = time.perf_counter() - started
    finally:
        writer.close()
    _expect_lines(path, params.records, "BatchWriter only")
    return Row("BatchWriter only", params.records, seconds, "one write() per batch, no daemon")


def clh_per_record(params: Params, batches: List[List[str]], directory: str) -> Row:
    os.makedirs(directory)
    path = os.path.join(directory, "per-record.log")
    options = file_options(params)
    handler = ConcurrentRotatingFileHandler(path, maxBytes=options["maxBytes"],
                                            backupCount=options["backupCount"], encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"clh_bench.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    lines = [line for batch in batches for line in batch][: params.baseline_records]
    try:
        info = logger.info
        started = time.perf_counter()
        for line in lines:
            info(line)
        seconds = time.perf_counter() - started
    finally:
        logger.removeHandler(handler)
        handler.close()
        logging.Logger.manager.loggerDict.pop(logger.name, None)
    _expect_lines(path, len(lines), BASELINE)
    return Row(BASELINE, len(lines), seconds, "logger.info -> emit, one lock per record")
