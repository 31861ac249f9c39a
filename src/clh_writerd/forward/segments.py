"""A forwarded file's segments: finding them, opening them safely, reading whole lines.

A segment is one physical file through its life (live, renamed, compressed);
see checkpoint.py for its identity. Nothing here sends or acknowledges.
"""

import gzip
import os
import stat
from typing import IO, List, NamedTuple, Optional, Tuple

from .checkpoint import FINGERPRINT_BYTES, SegmentState, fingerprint

READ_CHUNK = 64 * 1024


class Candidate(NamedTuple):
    name: str
    rank: Tuple[int, int]
    head: bytes
    gz: bool
    dev: int
    ino: int
    size: int  # uncompressed bytes (a .gz's own record of them)
    disk: int  # bytes on disk


class Listing(NamedTuple):
    """A family as one scan saw it; ``clean``: no name appeared or vanished while it was read."""

    candidates: List[Candidate]
    clean: bool


def is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def gzip_size(fd: int, disk: int) -> int:
    """Uncompressed size of a one-member gzip file (its ISIZE trailer; CLH writes one member).

    ISIZE is the size modulo 2**32: a segment of 4 GiB or more is under-reported.
    """
    if disk < 18:  # header + trailer: a .gz still being written or not one at all
        return 0
    return int.from_bytes(os.pread(fd, 4, disk - 4), "little")


def segment_size(path: str, gz: bool) -> int:
    """Uncompressed size of the segment stored at ``path`` (0 if it cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        disk = os.fstat(fd).st_size
        return gzip_size(fd, disk) if gz else disk
    except OSError:
        return 0
    finally:
        os.close(fd)


def open_segment(path: str, gz: bool) -> IO[bytes]:
    """Open a segment for reading without following a symlink.

    Clients can create files in the log directories and the daemon may be
    more privileged than they are: a planted ``app.log.7 -> /etc/shadow``
    must not be forwarded (DESIGN.md, security). FIFOs and devices are
    refused as well.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        raw = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    if not gz:
        return raw
    unpacked = gzip.GzipFile(fileobj=raw, mode="rb")
    unpacked.myfileobj = raw  # type: ignore[assignment]  # close() closes it, as for gzip.open
    return unpacked  # type: ignore[return-value]


def _names(directory: str, name: str) -> List[str]:
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        return []
    return sorted(e for e in entries if e == name or e.startswith(name + "."))


def family(base: str) -> Listing:
    """The segments of one file, oldest first: ``.N(.gz)`` (highest N first), ``.rotate.*``, the live file.

    A ``.rotate.*.gz`` is a compression in progress and is skipped; its
    source (or the ``.1.gz`` it becomes) is the same segment. The listing is
    ``clean`` when the directory held the same names before and after the
    segments were opened and every one could be opened: a rotation in between
    mixes old and new contents under the names, which must not be read as
    a break in the family's continuity.
    """
    directory, name = os.path.split(base)
    out = []
    names = _names(directory, name)
    clean = True
    for entry in names:
        if entry == name:
            rank = (2, 0)
        elif entry.startswith(name + ".") and not entry.endswith(".lock"):
            suffix = entry[len(name) + 1:]
            if suffix.startswith("rotate."):
                if suffix.endswith(".gz"):
                    continue
                rank = (1, 0)
            else:
                number = suffix[:-3] if suffix.endswith(".gz") else suffix
                if not number.isdigit():
                    continue
                rank = (0, -int(number))
        else:
            continue
        path = os.path.join(directory, entry)
        gz = entry.endswith(".gz")
        try:
            with open_segment(path, gz) as f:
                fd = f.fileno()  # GzipFile.fileno() is the compressed file's
                st = os.fstat(fd)
                head = f.read(FINGERPRINT_BYTES)
                size = gzip_size(fd, st.st_size) if gz else st.st_size
        except FileNotFoundError:
            clean = False  # renamed or deleted since the listing
            continue
        except (OSError, EOFError, gzip.BadGzipFile):
            continue  # still being written, or not a regular file: skipped
        if head:
            out.append(Candidate(path, rank, head, gz, st.st_dev, st.st_ino, size, st.st_size))
    out.sort(key=lambda c: c.rank)
    return Listing(out, clean and _names(directory, name) == names)


class SegmentMoved(OSError):
    """A name no longer holds the segment the last scan saw there."""


class SegmentReader:
    """Reads whole lines of one segment from a byte offset (plain or gzip)."""

    def __init__(self, state: SegmentState, path: str, gz: bool, max_line: int) -> None:
        self.state = state
        self.gz = gz
        self.max_line = max_line
        self.fh: IO[bytes] = open_segment(path, gz)
        # The name may now be another segment (rotated since the last scan):
        # check the content is the one the state describes before reading.
        head = self.fh.read(state.fp_len)
        if fingerprint(head) != state.key:
            self.fh.close()
            raise SegmentMoved(f"{path} is no longer segment {state.key}")
        self.fh.seek(state.offset)
        self.pos = state.offset  # offset of the next unread byte
        self._buf = b""
        self._at = 0
        st = os.fstat(self.fh.fileno()) if not gz else None
        self.dev, self.ino = (st.st_dev, st.st_ino) if st else (0, 0)
        self.split_lines = 0

    def read(self, limit: int) -> List[Tuple[int, int, bytes]]:
        """Up to ``limit`` complete lines as (start, end, line without LF)."""
        out: List[Tuple[int, int, bytes]] = []
        while len(out) < limit:
            nl = self._buf.find(b"\n", self._at)
            if nl < 0:
                if len(self._buf) - self._at >= self.max_line:
                    # A line longer than the central accepts: send it in pieces.
                    self.split_lines += 1
                    out.append(self._take(self._at + self.max_line, 0))
                    continue
                more = self.fh.read(READ_CHUNK)
                if not more:
                    break
                self._buf = self._buf[self._at:] + more
                self._at = 0
                continue
            out.append(self._take(nl, 1))
        return out

    def read_tail(self) -> Optional[Tuple[int, int, bytes]]:
        """What is left after the last LF of a finished segment (a torn last line), if anything."""
        if self._at < len(self._buf):
            return self._take(len(self._buf), 0)
        return None

    def _take(self, stop: int, skip: int) -> Tuple[int, int, bytes]:
        line = self._buf[self._at:stop]
        start = self.pos
        self.pos += len(line) + skip
        self._at = stop + skip
        return start, self.pos, line

    def is_live(self, base: str) -> bool:
        """Is this segment still the file the daemon writes (not renamed away)?"""
        if self.gz:
            return False
        try:
            st = os.stat(base)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def close(self) -> None:
        self.fh.close()
