"""Which paths the daemon may write, and how it reaches them without following symlinks.

Two stages. ``PathPolicy.check`` is lexical and runs once per (path,
options): absolute, no NUL, no ``.``/``..``/empty components, length and
depth limits, and which allowed directory the path lies in. ``open_dir``
runs before every write: it walks the path from the allowed directory one
component at a time with ``O_NOFOLLOW`` (``openat`` relative to the previous
directory), creating missing directories with ``mkdirat``, so a symlink
anywhere below the allowed directory is refused at the moment it would be
used, not only when the file was first seen. The result is a directory file
descriptor; every later operation on the file, its rotations and its lock
file is relative to it (see ``safefiles``).
"""

import errno
import os
import stat
from typing import FrozenSet, Iterable, List, NamedTuple, Optional, Tuple

from ..protocol import E_FORBIDDEN_PATH, E_UNAUTHORIZED, MAX_PATH_BYTES, ProtocolError

# Components below an allowed directory, the file name included.
DEFAULT_MAX_DEPTH = 16
# Linux NAME_MAX.
MAX_COMPONENT_BYTES = 255
# What concurrent-log-handler adds to a log file's name for the names it
# derives in the same directory: the rotation's temporary
# "<name>.rotate.<up to 20 digits>" (+28), the create-with-permissions
# ".<name>.<20 digits>.tmp" (+26), "<name>.1000.gz", the lock ".__<name>.lock".
DERIVED_SUFFIX_BYTES = 28
# The longest file name the daemon accepts: every derived name still fits
# NAME_MAX (a longer one was accepted and failed at the first rotation or
# lock as write_failed).
MAX_NAME_BYTES = MAX_COMPONENT_BYTES - DERIVED_SUFFIX_BYTES

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", 0)


R, W, X = 4, 2, 1


class Authority(NamedTuple):
    """What an unprivileged peer could do to the filesystem itself: its uid,
    primary gid (from the kernel) and groups (from the user database).

    ``may`` applies the kernel's permission bits (owner class if the uid
    owns the file, else group class if one of its groups does, else other);
    POSIX ACLs are not consulted, so an ACL that grants more is not honoured
    (one that takes away is: the daemon never grants more than the bits).
    """

    uid: int
    gid: int
    groups: FrozenSet[int]

    def may(self, st: os.stat_result, want: int) -> bool:
        mode = st.st_mode
        if st.st_uid == self.uid:
            bits = mode >> 6
        elif st.st_gid in self.groups:
            bits = mode >> 3
        else:
            bits = mode
        return bits & want == want

    def owns(self, st: os.stat_result) -> bool:
        return st.st_uid == self.uid

    def may_rename_in(self, dir_st: os.stat_result, file_st: Optional[os.stat_result]) -> bool:
        """Rename or unlink in the directory (rotation): write and search it;
        if it is sticky, own the file or the directory too."""
        if not self.may(dir_st, W | X):
            return False
        if dir_st.st_mode & stat.S_ISVTX and file_st is not None:
            return self.owns(file_st) or self.owns(dir_st)
        return True

    def refuse(self, what: str, path: str, st: Optional[os.stat_result] = None) -> ProtocolError:
        where = f" (owner {st.st_uid}, group {st.st_gid}, mode {oct(stat.S_IMODE(st.st_mode))})" if st else ""
        return ProtocolError(E_UNAUTHORIZED, f"uid {self.uid} may not {what} {path}{where}: the daemon does only "
                                             "what the peer could do itself")


class Target(NamedTuple):
    """A checked path: the allowed directory it is in, and the components below it."""

    root: str
    parts: Tuple[str, ...]  # directories below root, then the file name

    @property
    def path(self) -> str:
        return os.path.join(self.root, *self.parts)

    @property
    def dirs(self) -> Tuple[str, ...]:
        return self.parts[:-1]

    @property
    def name(self) -> str:
        return self.parts[-1]


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class PathPolicy:
    """Checks a client-supplied path against ``allowed_dirs`` (real paths).

    Refused with ``forbidden_path``: relative paths, NUL bytes, ``.``, ``..``
    or empty components, a path longer than MAX_PATH_BYTES or with a
    component longer than 255 bytes (a file name longer than MAX_NAME_BYTES),
    more than ``max_depth`` components below the allowed directory, a path
    outside the allowed directories, the allowed directory itself, a
    directory, and a symlink anywhere below the allowed directory (found by
    ``open_dir`` at each write).

    ``target`` makes no filesystem call: a client's path must begin with an
    allowed directory as resolved (its real path) or as configured
    (``aliases``: the administrator's symlink ``/home/me/logs`` ->
    ``/var/log/app``, resolved once, when the policy is built). Resolving the
    client's own prefixes would let it choose what the main loop walks (a
    path of 2,045 components took 9-13 s; a directory it controls can block).
    """

    def __init__(self, allowed_dirs: Iterable[str], max_depth: int = DEFAULT_MAX_DEPTH,
                 aliases: Iterable[str] = ()) -> None:
        self.allowed_dirs: Tuple[str, ...] = tuple(os.path.realpath(d) for d in allowed_dirs)
        self.max_depth = max_depth
        # The names a path may start with -> the allowed directory they are.
        self._roots = {d: d for d in self.allowed_dirs}
        for name in aliases:
            real = os.path.realpath(name)
            if real in self.allowed_dirs:
                self._roots.setdefault(os.path.abspath(name), real)
        # Components a path may have at most: the deepest root and max_depth below it.
        self._max_parts = max((len(r.split(os.sep)) - 1 for r in self._roots), default=0) + max_depth

    def target(self, path: str, what: str = "path") -> Target:
        """The checked Target of ``path``, or ProtocolError(E_FORBIDDEN_PATH). Lexical only."""
        if "\x00" in path:
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} contains a NUL byte")
        if len(os.fsencode(path)) > MAX_PATH_BYTES:
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} is longer than {MAX_PATH_BYTES} bytes")
        if not os.path.isabs(path):
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} is not absolute")
        parts = path.split(os.sep)[1:]
        if path.endswith(os.sep):
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} names a directory")
        if ".." in parts:
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} contains '..'")
        if "." in parts or "" in parts:
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} is not normalised ('.' or '//')")
        if len(parts) > self._max_parts:
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} has {len(parts)} components: deeper than any allowed "
                                                  f"directory plus max_path_depth = {self.max_depth}")
        if any(len(os.fsencode(p)) > MAX_COMPONENT_BYTES for p in parts):
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} has a component longer than {MAX_COMPONENT_BYTES} bytes")
        # Shortest ancestor first: the first one that names an allowed
        # directory is the root; everything below it is walked (at write
        # time, by open_dir) without following symlinks.
        ancestor = ""
        for i in range(len(parts) - 1):
            ancestor += os.sep + parts[i]
            root = self._roots.get(ancestor)
            if root is None:
                continue
            below = tuple(parts[i + 1:])
            if len(below) > self.max_depth:
                raise ProtocolError(
                    E_FORBIDDEN_PATH,
                    f"{what} is {len(below)} components below {root} (limit: max_path_depth = {self.max_depth})")
            if len(os.fsencode(below[-1])) > MAX_NAME_BYTES:
                raise ProtocolError(
                    E_FORBIDDEN_PATH, f"{what}: the file name is longer than {MAX_NAME_BYTES} bytes (NAME_MAX 255 "
                                      f"less the {DERIVED_SUFFIX_BYTES} the rotation and lock names add)")
            return Target(root, below)
        if path in self._roots:
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} is an allowed directory itself")
        raise ProtocolError(
            E_FORBIDDEN_PATH, f"{what} {path!r} is outside the allowed directories {list(self.allowed_dirs)} "
                              "(a symlinked directory counts under the name allowed_dirs gives it)")

    def check(self, path: str, what: str = "path") -> str:
        """The path to write (lexically checked, its directories walked safely now), or ProtocolError."""
        target = self.target(path, what)
        fd = open_dir(target.root, target.dirs, create=False, what=what)
        if fd is not None:
            try:
                refuse_non_file(fd, target.name, what)
            finally:
                os.close(fd)
        return target.path

    def check_dir(self, path: str, what: str) -> str:
        """Like check(), for a directory (e.g. lock_file_directory)."""
        return os.path.dirname(self.check(os.path.join(path, "x"), what))

    def ensure_parent(self, real: str) -> None:
        """Create the missing parents of an already checked path (without following symlinks)."""
        target = self.target(real)
        fd = open_dir(target.root, target.dirs, create=True)
        assert fd is not None
        os.close(fd)


def refuse_non_file(dir_fd: int, name: str, what: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ProtocolError(E_FORBIDDEN_PATH, f"{what} is a symlink (the daemon never follows one)")
    if stat.S_ISDIR(st.st_mode):
        raise ProtocolError(E_FORBIDDEN_PATH, f"{what} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(E_FORBIDDEN_PATH, f"{what} is not a regular file")


def open_dir(root: str, dirs: Iterable[str], create: bool = True, what: str = "path",
             authority: Optional[Authority] = None, levels: Optional[List[os.stat_result]] = None) -> Optional[int]:
    """An O_PATH descriptor of ``root/dirs...``, every component opened with
    O_NOFOLLOW relative to its parent; missing ones are created when
    ``create`` (else None is returned). A symlink or non-directory anywhere
    raises ProtocolError(E_FORBIDDEN_PATH). Iterative: no depth can make it
    recurse.

    With an ``authority`` (an unprivileged peer), every directory must be
    searchable by it and a missing one is created only where it could create
    it (write and search on the parent), owned by it as if it had (its uid and
    gid; when the daemon may chown); ProtocolError(E_UNAUTHORIZED) otherwise.
    ``levels`` receives the stat of each directory walked (root first).
    """
    fd = os.open(root, _DIR_FLAGS)
    walked: List[str] = []
    try:
        st = _checked_level(fd, authority, root, levels)
        for name in dirs:
            walked.append(name)
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                if authority is not None and not authority.may(st, W | X):
                    raise authority.refuse("create directories in", os.path.join(root, *walked[:-1]), st) from None
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                    if authority is not None:
                        _give(fd, name, authority)
                except FileExistsError:
                    pass  # another writer created it: open it below, still without following
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    kind = "a symlink" if _is_link(fd, name) else "not a directory"
                    raise ProtocolError(
                        E_FORBIDDEN_PATH,
                        f"{what}: {os.path.join(root, *walked)} is {kind} (the daemon never follows symlinks)",
                    ) from None
                raise
            os.close(fd)
            fd = nxt
            st = _checked_level(fd, authority, os.path.join(root, *walked), levels)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _checked_level(fd: int, authority: Optional[Authority], path: str,
                   levels: Optional[List[os.stat_result]]) -> os.stat_result:
    st = os.fstat(fd)
    if levels is not None:
        levels.append(st)
    if authority is not None and not authority.may(st, X):
        raise authority.refuse("search", path, st)
    return st


def _give(dir_fd: int, name: str, authority: Authority) -> None:
    """What the daemon created for a peer is the peer's (as if it had made it);
    a daemon that may not chown leaves it its own."""
    try:
        os.chown(name, authority.uid, authority.gid, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        pass


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
