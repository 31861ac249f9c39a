"""concurrent-log-handler handlers that never follow a symlink.

CLH works on path names: it opens, stats, renames, gzips and chmods
``baseFilename`` and its lock file by name, again at every reopen and
rotation. A client that can write the log directory could swap any of those
names (or a directory above them) for a symlink between two batches, and the
daemon would write, truncate or chmod whatever the link points at.

Here every name CLH uses lives in a directory the daemon holds open
(``DirHandle``, an ``O_PATH`` descriptor walked with ``O_NOFOLLOW`` from the
allowed directory) and is spelled ``/proc/self/fd/<fd>/<name>``: the kernel
resolves that prefix to exactly the directory held, so no symlink in the
directory part can redirect it. The last component is opened with
``O_NOFOLLOW`` by the overrides below (log file, lock file, gzip input and
output, the temp file of CLH's create-with-permissions), permissions are
applied through the open descriptor (``fchmod``/``fchown``), and renames and
unlinks act on the link itself. ``DirHandle.refresh`` walks the path again
before each write and swaps the held descriptor in place (``dup2``) if the
directory was replaced, so "every open" includes the directories.
"""

import errno
import gzip
import os
import stat
from contextlib import suppress
from secrets import randbits
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from concurrent_log_handler import ConcurrentRotatingFileHandler, ConcurrentTimedRotatingFileHandler

from ..protocol import E_FORBIDDEN_PATH, ProtocolError
from .paths import Authority, open_dir

PROC_FD = "/proc/self/fd"
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a planted fifo never blocks open()


def proc_fd_available() -> bool:
    """The kernel path of an open directory is how CLH is kept inside it."""
    return os.path.isdir(f"{PROC_FD}/0") or os.path.isdir(PROC_FD)


class DirHandle:
    """A directory below an allowed directory, held open at a fixed descriptor number."""

    def __init__(self, root: str, dirs: Sequence[str], what: str = "path",
                 authority: Optional[Authority] = None) -> None:
        self.root = root
        self.dirs = tuple(dirs)
        self.what = what
        # The peer the directories are walked (and created) for; None: the daemon's own right.
        self.authority = authority
        levels: list = []
        fd = open_dir(root, self.dirs, create=True, what=what, authority=authority, levels=levels)
        assert fd is not None
        self.fd: int = fd
        # The stat of each directory of the last walk, root first (whom the path lets through).
        self.levels: Tuple[os.stat_result, ...] = tuple(levels)
        self._ident = self._identity(fd)

    @property
    def path(self) -> str:
        """The name CLH uses for this directory: the held one, whatever happens to its name."""
        return f"{PROC_FD}/{self.fd}"

    @property
    def real_path(self) -> str:
        return os.path.join(self.root, *self.dirs)

    def explain(self, text: str) -> str:
        """``text`` (an error message) with the held name replaced by the real path, for humans."""
        return text.replace(self.path + "/", self.real_path + "/") if self.fd >= 0 else text

    def still_named(self) -> bool:
        """Its path still leads to the held directory: one lstat by the
        kernel instead of a walk. A name that now leads elsewhere (a
        directory moved, a symlink planted) fails: then refresh()."""
        try:
            st = os.stat(self.real_path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def refresh(self) -> bool:
        """Walk the path again (no symlinks); if it now leads to another
        directory, hold that one instead (same descriptor number). True if it changed."""
        levels: list = []
        fd = open_dir(self.root, self.dirs, create=True, what=self.what, authority=self.authority, levels=levels)
        assert fd is not None
        self.levels = tuple(levels)
        ident = self._identity(fd)
        if ident == self._ident:
            os.close(fd)
            return False
        os.dup2(fd, self.fd, inheritable=False)  # atomic: the number never names anything else
        os.close(fd)
        self._ident = ident
        return True

    def close(self) -> None:
        if self.fd >= 0:
            with suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    @staticmethod
    def _identity(fd: int) -> Tuple[int, int]:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino


def _forbidden(path: str, what: str) -> ProtocolError:
    return ProtocolError(E_FORBIDDEN_PATH, f"{what} {path} is a symlink or not a regular file "
                                           "(the daemon never follows symlinks)")


def _open_regular(path: str, flags: int, mode: int = 0o666, what: str = "file") -> int:
    """os.open with O_NOFOLLOW that accepts only a regular file, and for writing only one with a
    single link (a rotated segment being gzipped may be linked elsewhere: [forward] hold_dir)."""
    try:
        fd = os.open(path, flags | _FILE_FLAGS, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise _forbidden(path, what) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _forbidden(path, what)
        if st.st_nlink > 1 and flags & (os.O_WRONLY | os.O_RDWR):
            raise hardlinked(path, what)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def hardlinked(path: str, what: str = "file") -> ProtocolError:
    """A file with another name elsewhere may be anyone's (fs.protected_hardlinks = 0 lets a user link
    a file she cannot write into a directory she can): the daemon never writes, truncates or chmods one."""
    return ProtocolError(E_FORBIDDEN_PATH, f"{what} {path} has more than one hard link (the daemon refuses "
                                           "hardlinked files)")


def _open_or_create(path: str, flags: int, what: str) -> Tuple[int, bool]:
    """(descriptor, created now): O_CREAT|O_EXCL first, so a file the daemon
    creates is known to be the one it created (and can be given to its peer)."""
    for _ in range(8):
        try:
            return _open_regular(path, flags | os.O_CREAT | os.O_EXCL, what=what), True
        except FileExistsError:
            pass
        try:
            return _open_regular(path, flags & ~os.O_CREAT, what=what), False
        except FileNotFoundError:
            continue  # removed between the two (a rotation elsewhere): try again
    raise OSError(errno.EAGAIN, f"{what} {path} keeps appearing and disappearing")


class SafeRotatingFileHandler(ConcurrentRotatingFileHandler):
    """ConcurrentRotatingFileHandler confined to held directories (see the module doc)."""

    def __init__(self, directory: DirHandle, name: str, lock_directory: Optional[DirHandle] = None,
                 **kwargs: Any) -> None:
        self.directory = directory
        self.lock_directory = lock_directory
        # The peer the file is written for (None: the daemon's own right):
        # what it creates is given to it, what it does not own keeps its mode.
        self.creator: Optional[Authority] = directory.authority
        kwargs.pop("lock_file_directory", None)
        super().__init__(os.path.join(directory.path, name),
                         lock_file_directory=lock_directory.path if lock_directory else None, **kwargs)

    # -- opens: the last component never follows a symlink ---------------------------------
    def do_open(self, mode: Optional[str] = None) -> Any:
        mode = mode or self.mode
        self._atomic_create_with_perms(self.baseFilename)
        flags = os.O_WRONLY | os.O_APPEND
        with self._alter_umask():
            fd, created = _open_or_create(self.baseFilename, flags, what="log file")
        try:
            if mode.startswith("w"):
                os.ftruncate(fd, 0)
            self._apply_perms(fd, created)
            return open(fd, "a" if "a" in mode else "w", encoding=self.encoding, newline=self.newline)
        except BaseException:
            os.close(fd)
            raise

    def _open_lockfile(self) -> None:
        if self.stream_lock and not self.stream_lock.closed:
            return
        self._atomic_create_with_perms(self.lockFilename)
        # Created like the log file (0o666 under the same umask, then the
        # same chmod/owner): never more readable than the log it guards.
        with self._alter_umask():
            fd, created = _open_or_create(self.lockFilename, os.O_RDWR, what="lock file")
        try:
            self._apply_perms(fd, created)
            self.stream_lock = open(fd, "r+", encoding=self.encoding, newline=self.newline)
        except BaseException:
            os.close(fd)
            raise

    def _atomic_create_with_perms(self, target_path: str) -> bool:
        """CLH's create-then-link (the file appears with its final permissions), with no symlink followed."""
        if self.chmod is None and self._set_uid is None:
            return False
        with suppress(OSError):
            os.stat(target_path, follow_symlinks=False)
            return False  # exists (a planted symlink is refused by the open that follows)
        dir_name, base_name = os.path.split(target_path)
        tmp_path = os.path.join(dir_name, f".{base_name}.{randbits(64):08}.tmp")
        try:
            with self._alter_umask():
                fd = os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError:
            return False
        try:
            self._apply_perms(fd, created=True)
            os.close(fd)
            fd = -1
            os.link(tmp_path, target_path, follow_symlinks=False)
        except OSError:
            return False
        finally:
            if fd >= 0:
                os.close(fd)
            with suppress(OSError):
                os.unlink(tmp_path)
        return True

    def _do_chown_and_chmod(self, filename: str) -> None:
        """Only through a descriptor opened without following symlinks."""
        if self.chmod is None and self._set_uid is None:
            return
        try:
            fd = _open_regular(filename, os.O_RDONLY)
        except (OSError, ProtocolError):
            return
        try:
            self._apply_perms(fd)
        finally:
            os.close(fd)

    def _apply_perms(self, fd: int, created: bool = False) -> None:
        """chmod/owner options through the descriptor; a file created for a
        peer becomes the peer's (a root daemon gives it away). A daemon that
        cannot give it away (not root) makes it group-writable when its
        directory is (the shared-group setup): the peer's fallback must write
        it when the daemon is down, whatever umask the daemon was started
        under. A file the peer neither created now nor owns keeps its mode
        and owner (the peer could not change them itself)."""
        creator = self.creator
        if self.chmod is None and self._set_uid is None and (creator is None or not created):
            return
        st = os.fstat(fd)
        if st.st_nlink > 1 and not created:
            return  # never chmod a file that has another name (do_open refuses to write it)
        if creator is not None and not created and not creator.owns(st):
            return
        with suppress(OSError):  # best effort, as CLH: another user's file stays writable
            if self._set_uid is not None and self._set_gid is not None:
                if (st.st_uid, st.st_gid) != (self._set_uid, self._set_gid):
                    os.fchown(fd, self._set_uid, self._set_gid)
            elif creator is not None and created and (st.st_uid, st.st_gid) != (creator.uid, creator.gid):
                if os.geteuid() == 0:
                    os.fchown(fd, creator.uid, creator.gid)
                elif self.directory.levels[-1].st_mode & stat.S_IWGRP and self.chmod is None:
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRGRP | stat.S_IWGRP)
            if self.chmod is not None and stat.S_IMODE(st.st_mode) != self.chmod:
                os.fchmod(fd, self.chmod)

    def do_gzip(self, input_filename: str) -> None:
        """CLH's do_gzip: the rotated file and the .gz are opened without following symlinks."""
        out_filename = input_filename + ".gz"
        success = False
        try:
            in_fd = _open_regular(input_filename, os.O_RDONLY, what="rotated file")
            with open(in_fd, "rb") as input_fh:
                self._atomic_create_with_perms(out_filename)
                with self._alter_umask():
                    # Truncated through the descriptor, after the hard-link check (O_TRUNC would
                    # empty a file linked here from elsewhere before it could be refused).
                    out_fd, created = _open_or_create(out_filename, os.O_WRONLY, what="gzip file")
                os.ftruncate(out_fd, 0)
                with open(out_fd, "wb") as raw:
                    self._apply_perms(out_fd, created)
                    with gzip.GzipFile(filename=out_filename, mode="wb", fileobj=raw) as gzip_fh:
                        while True:
                            data = input_fh.read(self.gzip_buffer)
                            if not data:
                                break
                            gzip_fh.write(data)
            success = True
        except Exception:
            with suppress(OSError):
                if os.path.lexists(out_filename) and not os.path.islink(out_filename):
                    os.remove(out_filename)
        if success:
            with suppress(OSError):
                os.remove(input_filename)


class SafeTimedRotatingFileHandler(ConcurrentTimedRotatingFileHandler):
    """ConcurrentTimedRotatingFileHandler whose inner CLH handler is a SafeRotatingFileHandler.

    CLH's __init__ builds its ConcurrentRotatingFileHandler itself; this one
    does the same steps (concurrent-log-handler 0.9.x) with the safe class.
    """

    def __init__(self, directory: DirHandle, name: str, lock_directory: Optional[DirHandle] = None,
                 when: str = "h", interval: int = 1, backupCount: int = 0, encoding: Optional[str] = None,
                 utc: bool = False, maxBytes: int = 0, use_gzip: bool = False, **kwargs: Any) -> None:
        from logging.handlers import TimedRotatingFileHandler

        kwargs.pop("lock_file_directory", None)
        filename = os.path.join(directory.path, name)
        TimedRotatingFileHandler.__init__(self, filename, when=when, interval=interval, backupCount=backupCount,
                                          encoding=encoding, delay=True, utc=utc)
        self.clh = SafeRotatingFileHandler(directory, name, lock_directory, mode="a", backupCount=backupCount,
                                           encoding=encoding, maxBytes=maxBytes, use_gzip=use_gzip, **kwargs)
        self.num_rollovers = 0
        self.stream = None
        self.finalize_handler_configuration()
        self.initialize_rollover_time()


SafeHandler = Union[SafeRotatingFileHandler, SafeTimedRotatingFileHandler]


def build_safe_handler(directory: DirHandle, name: str, lock_directory: Optional[DirHandle],
                       options: Dict[str, Any]) -> SafeHandler:
    """The daemon's counterpart of ``_batchwrite.build_handler``: same options, held directories."""
    kwargs = dict(options)
    kwargs.pop("lock_file_directory", None)
    if "owner" in kwargs:
        kwargs["owner"] = tuple(kwargs["owner"])
    if "when" in kwargs:
        return SafeTimedRotatingFileHandler(directory, name, lock_directory, **kwargs)
    return SafeRotatingFileHandler(directory, name, lock_directory, **kwargs)
