"""Which paths the daemon may write: only under the configured allowed_dirs."""

import os
from typing import Iterable, Optional, Tuple

from ..protocol import E_FORBIDDEN_PATH, ProtocolError


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class PathPolicy:
    """Checks a client-supplied path against ``allowed_dirs`` (real paths).

    Refused: relative paths, NUL bytes, any ``..`` component, a path whose
    real location (symlinks resolved) leaves the allowed directories, and a
    directory. Missing parent directories inside an allowed directory are
    created, so ``logs/app/requests.log`` works when ``logs`` is allowed.
    """

    def __init__(self, allowed_dirs: Iterable[str]) -> None:
        self.allowed_dirs: Tuple[str, ...] = tuple(os.path.realpath(d) for d in allowed_dirs)

    def check(self, path: str, what: str = "path") -> str:
        """The real path to write, or ProtocolError(E_FORBIDDEN_PATH)."""
        if "\x00" in path:
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} contains a NUL byte")
        if not os.path.isabs(path):
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} is not absolute")
        if ".." in path.split(os.sep):
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} contains '..'")
        real = os.path.realpath(path)
        root = self._root_of(real)
        if root is None:
            raise ProtocolError(
                E_FORBIDDEN_PATH,
                f"{what} {path!r} (real path {real!r}) is outside the allowed directories {list(self.allowed_dirs)}",
            )
        if os.path.isdir(real):
            raise ProtocolError(E_FORBIDDEN_PATH, f"{what} {path!r} is a directory")
        return real

    def check_dir(self, path: str, what: str) -> str:
        """Like check(), for a directory (e.g. lock_file_directory)."""
        real = self.check(os.path.join(path, "x"), what)
        return os.path.dirname(real)

    def ensure_parent(self, real: str) -> None:
        """Create the missing parents of an already checked path."""
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            os.makedirs(parent, exist_ok=True)
            # A symlink raced in while we created it would show up here.
            if self._root_of(os.path.realpath(parent)) is None:
                raise ProtocolError(E_FORBIDDEN_PATH, f"{parent!r} escaped the allowed directories")

    def _root_of(self, real: str) -> Optional[str]:
        for root in self.allowed_dirs:
            if _within(real, root) and real != root:
                return root
        return None
