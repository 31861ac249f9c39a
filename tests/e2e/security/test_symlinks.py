"""Symlinks planted by another local user never redirect the daemon's writes.

The daemon runs as root; the attacker is a real unprivileged user who may
write the shared log directory (as the clients' fallback must). Each attack
plants a symlink after the file was first used (or before, for the lock
file), then asks for the next write. The outside victim must be unchanged
(content, size, mode), the reply must be ``forbidden_path`` with the counter
grown, and an honest client writing at the same time loses nothing.
"""

import hashlib
import os
import stat

import pytest

from clh_writerd import protocol
from support import seq_record

from .conftest import HonestClient, shared_log_dir


def _fingerprint(path: str) -> tuple:
    st = os.lstat(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return digest, st.st_size, stat.S_IMODE(st.st_mode), st.st_uid


@pytest.fixture
def victim(base_dir):
    """A root-owned file outside the allowed directory that the attacker cannot write."""
    outside = os.path.join(base_dir, "outside")
    os.mkdir(outside)
    path = os.path.join(outside, "victim")
    with open(path, "w") as f:
        f.write("root's file\n")
    os.chmod(path, 0o644)
    return path


def _forbidden_count(daemon) -> int:
    return daemon.stats()["daemon"]["counters"]["forbidden_path"]


def _plant(attacker, action):
    attacker.run(action)


ATTACKS = {
    # name: (options, how to plant after the first write, how to name the target)
    "file": "replace logs/app.log by a symlink to the victim after its first write",
    "directory": "replace logs/sub (holding app.log) by a symlink to the victim's directory",
    "rotation-target": "plant logs/app.log.1 -> victim, then make the daemon rotate",
    "lock-file": "plant logs/.__app.lock -> victim before the first write, with chmod 0o666",
    "lock-file-directory": "replace the lock_file_directory by a symlink to the victim's directory",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_symlink_planted_by_another_user_is_never_followed(attack, start_daemon, raw_client, attacker, victim,
                                                            base_dir, security_row):
    daemon = start_daemon(workdir=base_dir, log_dir=shared_log_dir(os.path.join(base_dir, "logs")))
    logs = daemon.log_dir
    outside = os.path.dirname(victim)
    before = _fingerprint(victim)
    listing = sorted(os.listdir(outside))
    client = raw_client(daemon.endpoint, "attacker")
    options = {"maxBytes": 0, "backupCount": 0}
    path = os.path.join(logs, "app.log")
    if attack == "directory":
        os.makedirs(os.path.join(logs, "sub"))
        os.chmod(os.path.join(logs, "sub"), 0o777)
        path = os.path.join(logs, "sub", "app.log")
    elif attack == "rotation-target":
        options = {"maxBytes": 64, "backupCount": 3}
    elif attack == "lock-file":
        options = {"chmod": 0o666}
    elif attack == "lock-file-directory":
        locks = os.path.join(logs, "locks")
        os.makedirs(locks)
        os.chmod(locks, 0o777)
        options = {"lock_file_directory": locks}

    with HonestClient(daemon.endpoint, os.path.join(logs, "honest", "h.log")) as honest:
        forbidden = _forbidden_count(daemon)
        if attack == "lock-file":
            _plant(attacker, lambda: os.symlink(victim, os.path.join(logs, ".__app.lock")))
        else:
            assert isinstance(client.write(path, [seq_record("a", 0)], options), protocol.Ack)
        if attack == "file":
            def swap():
                os.rename(path, path + ".moved")
                os.symlink(victim, path)
            _plant(attacker, swap)
        elif attack == "directory":
            def swap():
                os.rename(os.path.join(logs, "sub"), os.path.join(logs, "sub.moved"))
                os.symlink(outside, os.path.join(logs, "sub"))
            _plant(attacker, swap)
            path = os.path.join(logs, "sub", "victim")  # the name the attacker wants written
            assert isinstance(client.write(os.path.join(logs, "sub", "app.log"), [seq_record("a", 1)], options),
                              protocol.Error)
        elif attack == "rotation-target":
            _plant(attacker, lambda: os.symlink(victim, path + ".1"))
        elif attack == "lock-file-directory":
            def swap():
                os.rename(locks, locks + ".moved")
                os.symlink(outside, locks)
            _plant(attacker, swap)

        replies = [client.write(path, [seq_record("a", n) for n in range(2, 12)], options) for _ in range(3)]
        honest.stop()
        lost = honest.lost()

    codes = sorted({getattr(r, "code", "ack") for r in replies})
    assert _fingerprint(victim) == before, "the victim outside allowed_dirs was changed"
    assert sorted(os.listdir(outside)) == listing, "a file was created outside allowed_dirs"
    if attack == "rotation-target":
        # Rotation renames the planted link itself (it never writes through it).
        assert codes == ["ack"], replies
        observed = "rotations renamed the planted link; victim unchanged; batches acked"
    else:
        assert codes == [protocol.E_FORBIDDEN_PATH], replies
        assert _forbidden_count(daemon) >= forbidden + 1
        observed = f"{protocol.E_FORBIDDEN_PATH} replies, counter +{_forbidden_count(daemon) - forbidden}; victim unchanged"
    assert "symlink" in "".join(getattr(r, "message", "") for r in replies) or attack == "rotation-target"
    assert daemon.proc.poll() is None
    security_row(f"symlink: {attack}", ATTACKS[attack] + ": never followed, forbidden_path",
                 observed + f"; honest client {honest.acked} records", lost)
