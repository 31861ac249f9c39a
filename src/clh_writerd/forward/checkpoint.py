"""Forwarding progress, per file segment, written atomically.

A segment is one physical log file through its whole life: the live file,
the same inode after CLH renamed it to ``.rotate.*`` / ``.N``, and its
compressed copy ``.N.gz``. Renaming and compressing change the name and the
inode, so the key is a fingerprint of the segment's first bytes (decompressed);
device/inode are kept as a hint for the live file.

``offset`` is the end of the contiguous prefix the central server has
acknowledged, in uncompressed bytes. It never moves on read, only on ack.

``linked`` says the segment is known to follow, without a hole, the segments
seen before it (docs/forwarding.md, "gaps"): a segment first seen after its
predecessors were all rotated away unseen is not, and that break is counted.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, Optional

# How much of a segment's head identifies it. Lines start with a timestamp or
# a sequence, so the first kilobyte is unique among one file's segments.
FINGERPRINT_BYTES = 1024
FORMAT_VERSION = 1


def fingerprint(head: bytes) -> str:
    """The key of a segment whose first bytes are ``head`` (its length is part of the key)."""
    return f"{len(head)}:{hashlib.sha1(head).hexdigest()}"


@dataclass
class SegmentState:
    """What is known about one segment: where it was seen and how far it is acked."""

    key: str
    source: str
    name: str
    offset: int = 0
    end: Optional[int] = None  # final size, once the segment was rotated and read to EOF
    done: bool = False
    dev: int = 0
    ino: int = 0
    size_seen: int = 0    # uncompressed bytes at the last sight (a .gz's or a held file's included)
    final: bool = False   # size_seen is the final size (seen rotated, compressed or held only)
    seen_seq: int = 0     # order of first sight (newer segments have higher numbers)
    linked: bool = True   # continuity with the segments seen before it is established
    missing_since: Optional[float] = None
    held: str = ""        # hard link in the hold directory that keeps a rotated segment alive
    held_seq: int = 0     # order of holding (held segments are older than anything still in the family)

    @property
    def fp_len(self) -> int:
        return int(self.key.split(":", 1)[0])

    @property
    def size(self) -> int:
        """The best known uncompressed size: the end read, else the size last seen."""
        return self.end if self.end is not None else self.size_seen

    @property
    def unacked(self) -> int:
        """Bytes of this segment the central has not acknowledged (as far as its size is known)."""
        return 0 if self.done else max(self.size - self.offset, 0)

    @property
    def short_id(self) -> str:
        """The segment id in forwarded records' MSGID (10 hex digits of the fingerprint)."""
        return self.key.split(":", 1)[1][:10]


class Checkpoint:
    """All segment states of one forwarder, loaded from and saved to one JSON file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.segments: Dict[str, SegmentState] = {}
        self.saves = 0
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # A checkpoint is written by rename, so a torn one means someone
            # else wrote it: refuse rather than resend (or skip) everything.
            raise RuntimeError(f"unreadable forward checkpoint {self.path}: {exc}") from None
        if doc.get("version") != FORMAT_VERSION:
            raise RuntimeError(f"forward checkpoint {self.path} has version {doc.get('version')!r}")
        for key, entry in doc.get("segments", {}).items():
            self.segments[key] = SegmentState(**entry)

    def save(self) -> None:
        """Write every state to a temp file, fsync it, rename it over the old one, fsync the dir."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        doc = {"version": FORMAT_VERSION, "segments": {k: asdict(s) for k, s in self.segments.items()}}
        fd, tmp = tempfile.mkstemp(prefix=".forward-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.saves += 1
