"""Whether a directory may hold the daemon's ipc socket, and whether a key file
may be trusted (OpenSSH StrictModes is the model).

One rule for both sides. The daemon applies it before it binds (it must not
serve from a directory someone else controls: they could move its socket
aside and listen in its place); the client applies it before it connects
(otherwise whoever created ``/tmp/clh-writerd-<uid>`` first receives every
record). A directory passes when it is a directory, its owner is trusted
(the caller itself, root, or a configured daemon user) and nobody else may
write in it: not others, and not its group either (the socket group may
connect, through the socket file's mode, but a member who could write the
directory could swap the socket for her own). A symlink to it passes only
if the symlink's owner is trusted as well. Key files (CURVE) pass when their
owner is trusted and nobody else may write them (nor read a secret one),
and their directory passes the directory rule.
"""

import grp
import os
import pwd
import stat
from typing import Iterable, Optional, Union

NameOrId = Union[str, int, None]


def user_id(value: NameOrId) -> Optional[int]:
    """A uid from a user name or number ("" and None: none); KeyError for an unknown name."""
    if value is None or value == "":
        return None
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    return pwd.getpwnam(str(value)).pw_uid


def group_id(value: NameOrId) -> Optional[int]:
    """A gid from a group name or number ("" and None: none); KeyError for an unknown name."""
    if value is None or value == "":
        return None
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    return grp.getgrnam(str(value)).gr_gid


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def socket_dir_problem(directory: str, trusted_uids: Iterable[int], group: Optional[int] = None) -> str:
    """Why ``directory`` must not hold the socket, or "" when it may.

    A missing directory is a problem too ("does not exist"): the daemon
    creates it, the client waits for the daemon.
    """
    trusted = set(trusted_uids)
    try:
        link = os.lstat(directory)
    except FileNotFoundError:
        return f"socket directory {directory} does not exist"
    except OSError as exc:
        return f"socket directory {directory}: {exc.strerror}"
    if stat.S_ISLNK(link.st_mode):
        if link.st_uid not in trusted:
            return f"socket directory {directory} is a symlink owned by {_who(link.st_uid)}"
        try:
            st = os.stat(directory)
        except OSError as exc:
            return f"socket directory {directory}: {exc.strerror}"
    else:
        st = link
    if not stat.S_ISDIR(st.st_mode):
        return f"socket directory {directory} is not a directory"
    if st.st_uid not in trusted:
        names = ", ".join(_who(u) for u in sorted(trusted))
        return f"socket directory {directory} is owned by {_who(st.st_uid)}, not by {names}"
    if st.st_mode & stat.S_IWOTH:
        return f"socket directory {directory} is writable by others (mode {oct(st.st_mode & 0o7777)})"
    if st.st_mode & stat.S_IWGRP:
        which = "the socket group" if group is not None and st.st_gid == group else f"group {st.st_gid}"
        return (f"socket directory {directory} is writable by {which} (mode {oct(st.st_mode & 0o7777)}): "
                "the group may connect (0o750), never write the directory")
    return ""


def key_file_problem(path: str, trusted_uids: Iterable[int], secret: bool) -> str:
    """Why a CURVE key file (or a directory of public keys) must not be used, or "" when it may:
    owned by a trusted user, writable by nobody else, a secret key readable by nobody else."""
    trusted = set(trusted_uids)
    what = "secret key" if secret else "key"
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{what} {path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{what} {path} is a symlink"
    if st.st_uid not in trusted:
        return f"{what} {path} is owned by {_who(st.st_uid)}, not by {', '.join(_who(u) for u in sorted(trusted))}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return f"{what} {path} is writable by group or others (mode {oct(mode)})"
    if secret and mode & 0o077:
        return f"{what} {path} is readable by group or others (mode {oct(mode)}; chmod 600 it)"
    return ""


def ipc_directory(endpoint: str) -> Optional[str]:
    """The directory of an ``ipc://`` endpoint's socket; None for other transports."""
    if not endpoint.startswith("ipc://"):
        return None
    return os.path.dirname(os.path.abspath(endpoint[len("ipc://"):]))
