"""Who may use the daemon, and where each peer may write.

On ipc the kernel tells libzmq who connected (SO_PEERCRED): every received
message carries ``Peer-Address`` metadata ``localhost:<uid>:<gid>:<pid>``.
``Peer.from_metadata`` reads it; ``AccessPolicy`` decides, from those
numbers and never from what the client claims, whether the peer may talk to
the daemon at all (``allowed_uids`` / ``allowed_groups``; the daemon's own
uid and root always may) and under which directories it may write
(``peer_dirs``, narrowing ``allowed_dirs``). On tcp the peer is the CURVE
public key the ZAP handler admitted (``User-Id``), or nobody with
``tcp_auth = "none"``.
"""

import os
import pwd
import time
from typing import Dict, FrozenSet, NamedTuple, Optional, Tuple

from ..protocol import E_UNAUTHORIZED, ProtocolError
from .config import Config
from .paths import Authority, PathPolicy

# Seconds a peer's group list (from the user database) is trusted before it
# is looked up again; a reload forgets every entry at once.
GROUPS_TTL = 30.0
# Peers whose decision is cached at most (the map is cleared when full).
MAX_CACHED_PEERS = 4096


class Peer(NamedTuple):
    """Who sent a message, as the transport (not the client) says."""

    uid: Optional[int]
    gid: Optional[int]
    pid: Optional[int]
    key: str = ""  # the CURVE public key (Z85) on tcp

    @classmethod
    def from_metadata(cls, peer_address: Optional[str], user_id: Optional[str] = None) -> "Peer":
        """``localhost:<uid>:<gid>:<pid>`` (ipc) -> uid/gid/pid; anything else -> unknown (tcp)."""
        if peer_address and peer_address.startswith("localhost:"):
            parts = peer_address.split(":")
            if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
                return cls(int(parts[1]), int(parts[2]), int(parts[3]), user_id or "")
        return cls(None, None, None, user_id or "")

    @property
    def identity(self) -> Tuple:
        """What separates one client's stats from another's: the kernel's uid/pid or the key."""
        return (self.uid, self.pid, self.key)

    @property
    def principal(self) -> Tuple:
        """Whose share a message counts against (queued bytes, files) and what it may see in the
        stats: the uid on ipc, the CURVE key on tcp, ("tcp", "") for unauthenticated tcp."""
        return ("uid", self.uid) if self.uid is not None else ("key", self.key)


# A caller inside the daemon's own process (tests driving Server.handle).
LOCAL = Peer(os.getuid(), os.getgid(), os.getpid())


class Decision(NamedTuple):
    admitted: bool
    reason: str
    dirs: Optional[Tuple[str, ...]]  # None: every allowed dir
    authority: Optional[Authority] = None  # an unprivileged peer's own rights; None: the daemon's
    admin: bool = False  # sees every client and file in the stats


class AccessPolicy:
    """``admit(peer)`` raises ProtocolError(unauthorized) or returns the peer's
    directories (None: all of ``allowed_dirs``); ``check_path`` enforces them."""

    def __init__(self, config: Config, ipc: bool) -> None:
        self.ipc = ipc
        self.own = os.getuid()
        self.uids: FrozenSet[int] = frozenset(config.allowed_uids) | {self.own, 0}
        self.gids: FrozenSet[int] = frozenset(config.allowed_groups)
        self.peer_dirs: Dict[str, Tuple[str, ...]] = dict(config.peer_dirs)
        admins = config.stats_admins
        self.admin_uids: FrozenSet[int] = frozenset(int(a) for a in admins if a.isdigit()) | {self.own, 0}
        self.admin_gids: FrozenSet[int] = frozenset(int(a[1:]) for a in admins if a.startswith("@"))
        self.admin_keys: FrozenSet[str] = frozenset(a[4:] for a in admins if a.startswith("key:"))
        self._cache: Dict[Tuple[int, int], Tuple[Decision, float]] = {}

    def admit(self, peer: Peer) -> Optional[Tuple[str, ...]]:
        return self.decide(peer).dirs

    def decide(self, peer: Peer) -> Decision:
        """The peer's decision (cached for GROUPS_TTL), or ProtocolError(unauthorized)."""
        if not self.ipc:
            # tcp: CURVE (ZAP) admitted the key at the handshake, or tcp_auth = "none";
            # a remote key has no local uid: it writes with the daemon's authority.
            return Decision(True, "", None, None, not peer.key or peer.key in self.admin_keys)
        if peer.uid is None or peer.gid is None:
            raise ProtocolError(E_UNAUTHORIZED, "no peer credentials on this ipc connection")
        now = time.monotonic()
        key = (peer.uid, peer.gid)
        entry = self._cache.get(key)
        if entry is None or entry[1] < now:
            if len(self._cache) >= MAX_CACHED_PEERS:
                self._cache.clear()
            entry = self._cache[key] = (self._decide(peer.uid, peer.gid), now + GROUPS_TTL)
        decision = entry[0]
        if not decision.admitted:
            raise ProtocolError(E_UNAUTHORIZED, decision.reason)
        return decision

    def _decide(self, uid: int, gid: int) -> Decision:
        groups = frozenset({gid} | self._groups_of(uid, gid))
        admitted = uid in self.uids or bool(groups & self.gids)
        if not admitted:
            return Decision(False, f"uid {uid} (gid {gid}) is not in allowed_uids or allowed_groups", None)
        dirs: Tuple[str, ...] = ()
        matched = False
        for who, entries in self.peer_dirs.items():
            if (who.startswith("@") and int(who[1:]) in groups) or (not who.startswith("@") and int(who) == uid):
                matched = True
                dirs += entries
        # The daemon's own uid and root could do anything the daemon does;
        # everyone else only what its uid and groups allow (paths.Authority).
        authority = None if uid in (self.own, 0) else Authority(uid, gid, groups)
        admin = uid in self.admin_uids or bool(groups & self.admin_gids)
        return Decision(True, "", dirs if matched else None, authority, admin)

    def admin_uid(self, uid: int) -> bool:
        """Whether a process running as ``uid`` is a stats admin (a /metrics scraper: only its uid is known)."""
        if uid in self.admin_uids:
            return True
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            return False
        return bool(({gid} | self._groups_of(uid, gid)) & self.admin_gids)

    @staticmethod
    def _groups_of(uid: int, gid: int) -> FrozenSet[int]:
        """Supplementary groups from the user database (the kernel only hands over the primary gid)."""
        try:
            name = pwd.getpwuid(uid).pw_name
            return frozenset(os.getgrouplist(name, gid))
        except (KeyError, OSError):
            return frozenset()

    @staticmethod
    def check_path(dirs: Tuple[str, ...], policy: PathPolicy, path: str, lock_dir: Optional[str]) -> None:
        """Refuse ``path`` (and its lock directory) outside the peer's own directories."""
        for what, value in (("path", path), ("lock_file_directory", lock_dir)):
            if value is None:
                continue
            target = policy.target(value if what == "path" else os.path.join(value, "x"), what)
            real = target.path if what == "path" else os.path.dirname(target.path)
            if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in dirs):
                raise ProtocolError(E_UNAUTHORIZED, f"{what} {real!r} is outside this peer's directories "
                                                    f"(peer_dirs: {list(dirs)})")


def write_key_pair(directory: str, name: str) -> Tuple[str, str]:
    """``clh-writerd keygen``: NAME.key (public, 0644) and NAME.key_secret (0600) in
    ``directory`` (created 0700 if missing), zmq.auth's certificate format.
    Refuses to overwrite an existing pair."""
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support")
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"key name {name!r}: a plain file name is needed")
    public, secret = (os.path.join(directory, f"{name}.{ext}") for ext in ("key", "key_secret"))
    for path in (public, secret):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; remove it first (keys are never overwritten)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)  # the secret is never readable by others, not even for a moment
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret
