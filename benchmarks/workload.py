"""The records every scenario writes, and how to count what reached a file.

The feeder process and the in-process rows build the same batches from the
same ``Params``, so every row of a scenario handles identical bytes.
"""

import os
from typing import Any, Dict, List, Tuple

from clh_writerd._fieldformat import FieldFormat

from .harness import Params

PROGRAM = "clh-bench"
# The format field batches are rendered with (render mode "fields"): what a
# client with a stock logging.Formatter sends, the daemon renders.
FIELD_FORMAT = FieldFormat("%", "%(asctime)s %(levelname)s %(name)s %(message)s", None, "%Y-%m-%d %H:%M:%S", "%s,%03d")


def make_batches(params: Params) -> List[List[str]]:
    """``params.records`` lines of exactly ``record_bytes`` characters, in batches."""
    lines = []
    for n in range(params.records):
        head = f"2025-01-01 00:00:00,000 INFO bench.ingest SEQ bench {n} "
        lines.append((head + "x" * max(0, params.record_bytes - len(head)))[: max(params.record_bytes, len(head))])
    return [lines[i:i + params.batch] for i in range(0, len(lines), params.batch)]


def make_field_batches(params: Params) -> Tuple[FieldFormat, List[List[List[Any]]]]:
    """The same records as field values (level, logger, message, time in
    UTC) that ``FIELD_FORMAT`` renders to lines of ``record_bytes`` characters."""
    records = []
    when = [1735689600, 0.0, 0, 0, "UTC"]  # 2025-01-01 00:00:00,000
    for n in range(params.records):
        head = f"SEQ bench {n} "
        # "2025-01-01 00:00:00,000 INFO bench.ingest " is 42 characters.
        message = (head + "x" * max(0, params.record_bytes - 42 - len(head)))
        records.append(["INFO", "bench.ingest", message, when])
    return FIELD_FORMAT, [records[i:i + params.batch] for i in range(0, len(records), params.batch)]


def encode_batches(params: Params, path: str, fields: bool) -> List[bytes]:
    """Every batch frame of the workload for ``path``: lines, or field values."""
    from clh_writerd import protocol

    client = protocol.new_client_id(PROGRAM)
    options = file_options(params)
    if not fields:
        return [protocol.encode_batch(client, seq, path, options, batch)  # type: ignore[arg-type]
                for seq, batch in enumerate(make_batches(params), start=1)]
    fmt, batches = make_field_batches(params)
    return [protocol.encode_batch(client, seq, path, options, batch, format=fmt)  # type: ignore[arg-type]
            for seq, batch in enumerate(batches, start=1)]


def file_options(params: Params) -> Dict[str, Any]:
    """CLH options of every file a scenario writes: rotation on, room for all backups."""
    total = params.records * (params.record_bytes + 1)
    backups = min(1000, total // max(1, params.max_bytes) + 2)
    return {"maxBytes": params.max_bytes, "backupCount": backups, "encoding": "utf-8"}


def count_lines(path: str) -> int:
    """Lines in ``path`` and its rotated siblings (``path.1``, ...)."""
    directory, base = os.path.split(path)
    total = 0
    for name in os.listdir(directory):
        if (name == base or name.startswith(base + ".")) and not name.endswith(".lock"):
            with open(os.path.join(directory, name), "rb") as f:
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    total += block.count(b"\n")
    return total
