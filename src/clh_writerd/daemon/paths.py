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
from typing import Iterable, List, NamedTuple, Optional, Tuple

from ..protocol import E_FORBIDDEN_PATH, MAX_PATH_BYTES, ProtocolError

# Components below an allowed directory, the file name included.
DEFAULT_MAX_DEPTH = 16
# Linux NAME_MAX.
MAX_COMPONENT_BYTES = 255

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", 0)


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
    component longer than 255 bytes, more than ``max_depth`` components below
    the allowed directory, a path outside the allowed directories, the
    allowed directory itself, a directory, and a symlink anywhere below the
    allowed directory (found by ``open_dir`` at each write). Symlinks above
    the allowed directory (``/home/me/logs`` -> ``/var/log/app``) are the
    administrator's and are resolved once.
    """

    def __init__(self, allowed_dirs: Iterable[str], max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.allowed_dirs: Tuple[str, ...] = tuple(os.path.realpath(d) for d in allowed_dirs)
        self.max_depth = max_depth

    def target(self, path: str, what: str = "path") -> Target:
        """The checked Target of ``path``, or ProtocolError(E_FORBIDDEN_PATH)."""
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
        if any(len(os.fsencode(p)) > MAX_COMPONENT_BYTES for p in parts):
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} has a component longer than {MAX_COMPONENT_BYTES} bytes")
        # Shortest ancestor first: the first one that is an allowed directory
        # (after resolving the administrator's symlinks above it) is the root;
        # everything below it is walked without following symlinks.
        for i in range(1, len(parts)):
            ancestor = os.sep + os.sep.join(parts[:i])
            if ancestor not in self.allowed_dirs:
                ancestor = os.path.realpath(ancestor)
                if ancestor not in self.allowed_dirs:
                    continue
            below = tuple(parts[i:])
            if len(below) > self.max_depth:
                raise ProtocolError(
                    E_FORBIDDEN_PATH,
                    f"{what} is {len(below)} components below {ancestor} (limit: max_path_depth = {self.max_depth})")
            return Target(ancestor, below)
        if os.path.realpath(path) in self.allowed_dirs:
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} is an allowed directory itself")
        raise ProtocolError(
            E_FORBIDDEN_PATH, f"{what} {path!r} is outside the allowed directories {list(self.allowed_dirs)}")

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


def open_dir(root: str, dirs: Iterable[str], create: bool = True, what: str = "path") -> Optional[int]:
    """An O_PATH descriptor of ``root/dirs...``, every component opened with
    O_NOFOLLOW relative to its parent; missing ones are created when
    ``create`` (else None is returned). A symlink or non-directory anywhere
    raises ProtocolError(E_FORBIDDEN_PATH). Iterative: no depth can make it
    recurse."""
    fd = os.open(root, _DIR_FLAGS)
    walked: List[str] = []
    try:
        for name in dirs:
            walked.append(name)
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
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
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
