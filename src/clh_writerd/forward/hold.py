"""The hold: hard links that keep unforwarded segments alive (the disk budget)."""

import logging
import os
from typing import TYPE_CHECKING, Set

from .checkpoint import SegmentState
from .segments import Candidate

if TYPE_CHECKING:  # pragma: no cover
    from .forwarder import Forwarder

log = logging.getLogger("clh_writerd.forward")


class Hold:
    """Hard links that keep unforwarded segments alive after rotation and retention.

    CLH compresses a rotated segment (a new inode; the plain one is unlinked)
    and deletes the oldest backup beyond ``backupCount``. A hard link in the
    hold directory (same filesystem), taken when the forwarder first sees a
    segment, keeps its inode until the segment is acknowledged, so a long
    outage costs disk, up to ``hold_max_bytes``, instead of records. Past the
    budget new segments are not held, and one deleted before it is forwarded
    is counted as lost and warned about.
    """

    def __init__(self, directory: str, max_bytes: int, forwarder: "Forwarder") -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.fw = forwarder
        self.disabled = ""
        self.released = 0  # holds let go because the budget was full

    def used(self) -> int:
        """Bytes kept alive only by the hold (links whose file has no other name left)."""
        total = 0
        for state in list(self.fw.checkpoint.segments.values()):
            if state.held:
                try:
                    st = os.stat(state.held)
                except OSError:
                    continue
                if st.st_nlink == 1:
                    total += st.st_size
        return total

    def take(self, state: SegmentState, cand: Candidate) -> None:
        """Link ``cand`` into the hold directory (free while the file keeps its own name)."""
        if self.disabled or self.max_bytes <= 0 or state.held_seq < 0:
            return
        path = os.path.join(self.directory, state.key.replace(":", "-") + (".gz" if cand.gz else ""))
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if os.path.exists(path):
                os.unlink(path)
            os.link(cand.name, path)
            linked = os.stat(path)
        except FileNotFoundError:
            return  # renamed meanwhile: the next scan holds it under its new name
        except OSError as exc:
            # Another filesystem (EXDEV) or no permission: hold nothing, say so once.
            self.disabled = f"cannot hard-link into {self.directory}: {exc}"
            log.warning("forward: hold disabled (%s); segments deleted by retention before they are "
                        "forwarded will be counted as lost", self.disabled)
            return
        if (linked.st_dev, linked.st_ino) != (cand.dev, cand.ino):
            os.unlink(path)  # the name was rotated to another segment since the scan; retry next scan
            return
        self.fw.hold_seq += 1
        state.held, state.held_seq = path, self.fw.hold_seq
        self.fw.mark_dirty()

    def enforce(self, reading: Set[str], held_only: Set[str]) -> None:
        """Over budget: let go of the oldest holds first (not a segment being read).

        A segment that still has a name in the family (its ``.gz``) only frees
        disk; one that exists only in the hold is counted as lost and warned.
        """
        over = self.used() - self.max_bytes
        if over <= 0:
            return
        held = sorted((s for s in self.fw.checkpoint.segments.values() if s.held and s.key not in reading),
                      key=lambda s: s.held_seq)
        for state in held:
            if over <= 0:
                break
            try:
                st = os.stat(state.held)
            except OSError:
                continue
            if st.st_nlink != 1:
                continue
            over -= st.st_size
            self.release(state)
            self.released += 1
            state.held_seq = -1  # not held again
            if state.key in held_only:
                source = self.fw.sources.get(state.source)
                if source is not None:
                    source.forget(state)

    def candidate(self, state: SegmentState) -> Candidate:
        """A held segment as a family member older than every named one."""
        return Candidate(state.held, (-1, state.held_seq), b"", state.held.endswith(".gz"), 0, 0, 0)

    def release(self, state: SegmentState) -> None:
        if state.held:
            try:
                os.unlink(state.held)
            except OSError:
                pass
            state.held = ""

    def sweep(self) -> None:
        """Remove links no checkpoint entry refers to (left by a crash between link and commit)."""
        known = {s.held for s in self.fw.checkpoint.segments.values() if s.held}
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            if path not in known:
                try:
                    os.unlink(path)
                except OSError:
                    pass
