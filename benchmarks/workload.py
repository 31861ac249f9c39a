"""The records every scenario writes, and how to count what reached a file.

The feeder process and the in-process rows build the same batches from the
same ``Params``, so every row of a scenario handles identical bytes.
"""

import os
from typing import Any, Dict, List

from .harness import Params

PROGRAM = "clh-bench"


def make_batches(params: Params) -> List[List[str]]:
    """``params.records`` lines of exactly ``record_bytes`` characters, in batches."""
    lines = []
    for n in range(params.records):
        head = f"2025-01-01 00:00:00,000 INFO bench.ingest SEQ bench {n} "
        lines.append((head + "x" * max(0, params.record_bytes - len(head)))[: max(params.record_bytes, len(head))])
    return [lines[i:i + params.batch] for i in range(0, len(lines), params.batch)]


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
