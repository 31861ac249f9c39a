"""The hold: hard links that keep unforwarded segments alive (the disk budget)."""

import logging
import os
import stat
from typing import Any, Dict, List, Optional, Protocol, Set

from .checkpoint import Checkpoint, SegmentState
from .segments import Candidate, segment_size


class HoldOwner(Protocol):
    """What the hold needs of the forwarder that owns it (no import of it: no cycle)."""

    checkpoint: Checkpoint
    hold_seq: int
    sources: Dict[str, Any]

    def held_only_keys(self) -> Set[str]: ...

    def mark_dirty(self) -> None: ...

log = logging.getLogger("clh_writerd.forward")


def find_inode(directory: str, base: str, dev: int, ino: int) -> Optional[str]:
    """The name of ``base``'s family in ``directory`` that is the inode (dev, ino), if any."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return None
    for entry in entries:
        if entry == base or entry.startswith(base + "."):
            path = os.path.join(directory, entry)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, ino) and stat.S_ISREG(st.st_mode):
                return path
    return None


class Hold:
    """Hard links that keep unforwarded segments alive after rotation and retention.

    CLH compresses a rotated segment (a new inode; the plain one is unlinked)
    and deletes the oldest backup beyond ``backupCount``. A hard link in the
    hold directory (same filesystem), taken when the forwarder first sees a
    segment, keeps its inode until the segment is acknowledged, so a long
    outage costs disk, up to ``hold_max_bytes``, instead of records.

    The link follows the segment's physical form: once the forwarder sees the
    ``.gz`` of a segment it holds as plain, it holds the ``.gz`` instead and
    lets the plain copy go, so the hold never keeps a second copy of a segment
    that is still on disk. The budget counts what the hold alone keeps: the
    on-disk size of every held segment that has no name left in its family
    (compressed bytes with gzip, plain bytes without). Past the budget the
    oldest of those are let go, each counted as lost with its exact size.
    """

    def __init__(self, directory: str, max_bytes: int, forwarder: HoldOwner) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.fw = forwarder
        self.disabled = ""
        self.released = 0  # holds let go because the budget was full
        self._unlink_after_save: List[str] = []

    def cost(self, state: SegmentState) -> int:
        """Bytes on disk of a held link (what the hold spends on it once the segment has no name)."""
        try:
            return os.stat(state.held).st_size if state.held else 0
        except OSError:
            return 0

    def used(self) -> int:
        """Bytes kept alive only by the hold: held segments with no name left in their family."""
        segments = self.fw.checkpoint.segments
        return sum(self.cost(state) for state in map(segments.get, self.fw.held_only_keys()) if state is not None)

    def keep(self, state: SegmentState, cand: Candidate) -> None:
        """Hold ``cand`` (free while it keeps its own name); a ``.gz`` replaces a plain link."""
        if self.disabled or self.max_bytes <= 0 or state.held_seq < 0:
            return
        if state.held and (state.held.endswith(".gz") or not cand.gz):
            return  # already held in this form
        path = os.path.join(self.directory, state.key.replace(":", "-") + (".gz" if cand.gz else ""))
        name = cand.name
        for _ in range(3):
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                if os.path.lexists(path):
                    os.unlink(path)
                os.link(name, path)
                linked = os.stat(path)
            except FileNotFoundError:
                linked = None
            except OSError as exc:
                # Another filesystem (EXDEV) or no permission: hold nothing, say so once.
                self.disabled = f"cannot hard-link into {self.directory}: {exc}"
                log.warning("forward: hold disabled (%s); segments deleted by retention before they are "
                            "forwarded will be counted as lost", self.disabled)
                return
            if linked is not None and (linked.st_dev, linked.st_ino) == (cand.dev, cand.ino):
                break
            if linked is not None:
                os.unlink(path)  # the name now holds another segment
            # Rotated since the listing: renaming keeps the inode, so find it under its new name
            # now (waiting for the next scan leaves a window in which the daemon may die).
            found = find_inode(os.path.dirname(cand.name), os.path.basename(state.source), cand.dev, cand.ino)
            if found is None:
                return  # deleted already: the scans count it if it was not forwarded
            name = found
        else:
            return
        if state.held:
            self.release(state)  # the plain copy: the .gz now holds the same records
        else:
            # Order of holding = order of first sight, oldest first; a retake keeps it.
            self.fw.hold_seq += 1
            state.held_seq = self.fw.hold_seq
        state.held = path
        self.fw.mark_dirty()

    def enforce(self, reading: Set[str], held_only: Set[str]) -> None:
        """Over budget: let go of the oldest held-only segments first (not one being read).

        Every one let go had no other name: it is counted as lost with its
        exact size and the forwarder carries on with the next segment.
        """
        segments = self.fw.checkpoint.segments
        costs = {k: self.cost(segments[k]) for k in held_only if k in segments}
        over = sum(costs.values()) - self.max_bytes
        if over <= 0:
            return
        oldest = sorted((segments[k] for k in costs if k not in reading), key=lambda s: (s.seen_seq, s.held_seq))
        for state in oldest:
            if over <= 0:
                break
            over -= costs[state.key]
            self.released += 1
            source = self.fw.sources.get(state.source)
            if source is not None:
                source.forget(state)
            self.release(state)
            state.held_seq = -1  # not held again

    def candidate(self, state: SegmentState) -> Candidate:
        """A held segment as a family member older than every named one."""
        return Candidate(state.held, (-1, state.held_seq), b"", state.held.endswith(".gz"), 0, 0,
                         state.size_seen, self.cost(state))

    def size(self, state: SegmentState) -> int:
        """Uncompressed size of a held segment, from the held file itself."""
        return segment_size(state.held, state.held.endswith(".gz"))

    def release(self, state: SegmentState) -> None:
        """Let go of a segment's link once the checkpoint that no longer needs it is on disk.

        Unlinking at once would leave, after a crash before the next save, a
        checkpoint that names a link that is gone: a segment acknowledged in
        memory only, or held by its .gz link in memory only, would then be
        counted as lost (or lost) after the restart.
        """
        if state.held:
            self._unlink_after_save.append(state.held)
            state.held = ""

    def saved(self) -> None:
        """The checkpoint was written: remove the links it no longer refers to."""
        if not self._unlink_after_save:
            return
        known = {s.held for s in self.fw.checkpoint.segments.values() if s.held}
        for path in self._unlink_after_save:
            if path not in known:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._unlink_after_save = []

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
