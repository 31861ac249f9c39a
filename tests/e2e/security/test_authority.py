"""Round two (issue 25): the daemon only does what the peer could do itself.

The daemon runs as root and no peer_dirs are configured (the default). mallory
and alice are ordinary users in the socket's group; the log directory is
shared (0777, as the fallback needs), alice has her own directory in it with a
0600 log. Before, root chmodded alice's file for mallory, appended her forged
lines and rotated and gzipped alice's files away.
"""

import os
import stat

from clh_writerd import protocol
from support import RawClient, read_lines, seq_record

from .conftest import HonestClient, PingMonitor, describe_resources, resources, sigterm_within
from .test_budgets import DRAIN, crowd, serve  # noqa: F401 (the module-scoped users)


def _tree(path: str) -> dict:
    """Every name under ``path`` with its owner, mode and size (what the attack must leave alone)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_uid, stat.S_IMODE(st.st_mode), st.st_size)
    return out


def test_a_peer_cannot_chmod_write_rotate_or_fill_another_users_files(crowd, start_daemon, base_dir,  # noqa: F811
                                                                     security_row):
    daemon = serve(start_daemon, base_dir, crowd)
    endpoint, logs = daemon.endpoint, daemon.log_dir
    alice_dir = os.path.join(logs, "alice")
    secret = os.path.join(alice_dir, "app.log")
    rotating = {"maxBytes": 1, "backupCount": 1, "use_gzip": True}

    def alice_writes() -> None:
        os.mkdir(alice_dir, 0o755)
        with open(secret, "w") as f:
            f.write("alice 0\n")
        os.chmod(secret, 0o600)

    crowd.alice.run(alice_writes)
    before_tree = _tree(alice_dir)
    link = os.path.join(logs, "shared.log")

    def mallory() -> None:
        client = RawClient(endpoint, "mallory")
        try:
            for options in ({}, {"chmod": 0o644}, rotating, rotating, rotating):
                reply = client.write(secret, [seq_record("forged", 0)], options)
                assert isinstance(reply, protocol.Error) and reply.code == protocol.E_UNAUTHORIZED, reply
                assert f"uid {os.getuid()} may not" in reply.message and "mode 0o600" in reply.message, reply
            reply = client.write(os.path.join(alice_dir, "sub", "x.log"), ["forged"])
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_UNAUTHORIZED, reply
            assert "create directories" in reply.message
            # Her own files she may create (they are hers) and rotate.
            own = os.path.join(logs, "mallory.log")
            assert isinstance(client.write(own, ["mine"], {"chmod": 0o640, **rotating}), protocol.Ack)
            assert os.stat(own).st_uid == os.getuid()
        finally:
            client.close()

    before = resources(daemon.proc.pid)
    def alice_through_the_daemon() -> None:
        client = RawClient(endpoint, "alice")
        try:  # her own file: served, and kept open by the daemon
            assert isinstance(client.write(secret, ["alice 1"]), protocol.Ack)
        finally:
            client.close()

    def mallory_again() -> None:
        client = RawClient(endpoint, "mallory")
        try:  # the writer alice opened: refused on the open file, before the write
            reply = client.write(secret, [seq_record("forged", 1)])
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_UNAUTHORIZED, reply
            assert "may not write" in reply.message
        finally:
            client.close()

    def mallory_links() -> None:
        client = RawClient(endpoint, "mallory")
        try:
            reply = client.write(link, ["forged"])
            assert isinstance(reply, protocol.Error) and reply.code == protocol.E_FORBIDDEN_PATH, reply
            assert "hard link" in reply.message
        finally:
            client.close()

    with HonestClient(endpoint, os.path.join(logs, "honest.log")) as honest, PingMonitor(endpoint) as pings:
        crowd.mallory.run(mallory)
        crowd.alice.run(alice_through_the_daemon)
        crowd.mallory.run(mallory_again)
        os.link(secret, link)  # what fs.protected_hardlinks = 0 would let mallory do herself
        crowd.mallory.run(mallory_links)
        os.unlink(link)
        pings.stop()
        honest.stop()
    after_tree = _tree(alice_dir)
    assert after_tree["app.log"][:2] == before_tree["app.log"][:2]  # still alice's, still 0600
    assert set(after_tree) == {"app.log", ".__app.lock"}  # no rotation, no new directory
    assert read_lines(secret) == ["alice 0", "alice 1"]  # nothing of mallory's
    counters = daemon.stats()["daemon"]["counters"]

    def alice_again() -> None:  # the positive control: her own file, her own rights
        client = RawClient(endpoint, "alice")
        try:
            assert isinstance(client.write(secret, ["alice 2"]), protocol.Ack)
        finally:
            client.close()

    crowd.alice.run(alice_again)
    assert read_lines(secret) == ["alice 0", "alice 1", "alice 2"]
    after = resources(daemon.proc.pid)
    took = sigterm_within(daemon, DRAIN)
    held = pings.assert_held()
    security_row("no peer_dirs; mallory names alice's 0600 logs/alice/app.log (plain, chmod 0o644, then "
                 "maxBytes=1/backupCount=1/use_gzip three times), a file in a new directory under alice's, and a "
                 "hard link to it (was: root chmodded it 0644, appended mallory's lines, rotation and gzip "
                 "destroyed app.log and app.log.1, directories appeared in alice's directory)",
                 "unauthorized: the daemon does only what the peer could do itself (mode bits on the opened file "
                 "and directories); a hard link refused forbidden_path; alice's files untouched; her own file is "
                 "hers",
                 f"unauthorized {counters['unauthorized']}, forbidden_path {counters['forbidden_path']}; alice's "
                 f"directory unchanged (mode, size, names); her own write still served; {held}; SIGTERM "
                 f"{took:.2f} s; honest client {honest.acked} records", honest.lost(),
                 describe_resources(before, after))


def test_allow_owner_cannot_give_a_file_to_the_requester(crowd, start_daemon, base_dir, security_row):  # noqa: F811
    daemon = serve(start_daemon, base_dir, crowd, daemon={"allow_owner": True})
    endpoint, logs = daemon.endpoint, daemon.log_dir
    victim = os.path.join(logs, "root-owned.log")
    with open(victim, "w") as f:
        f.write("root 0\n")
    os.chmod(victim, 0o666)  # anyone may append: still nobody's to take
    mallory_name = crowd.mallory.name

    def mallory() -> None:
        client = RawClient(endpoint, "mallory")
        try:
            for path in (victim, os.path.join(logs, "new.log")):
                reply = client.write(path, ["x"], {"owner": [mallory_name, mallory_name]})
                assert isinstance(reply, protocol.Error) and reply.code == protocol.E_UNAUTHORIZED, reply
            # Appending to a file anyone may write is what she could do herself.
            assert isinstance(client.write(victim, ["appended"]), protocol.Ack)
        finally:
            client.close()

    crowd.mallory.run(mallory)
    st = os.stat(victim)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o666)
    assert not os.path.exists(os.path.join(logs, "new.log"))
    assert read_lines(victim) == ["root 0", "appended"]
    took = sigterm_within(daemon, DRAIN)
    security_row("allow_owner = true; a peer asks owner=(itself) for a root-owned 0666 file and for a new one "
                 "(was: allow_owner let a client chown files to itself)",
                 "unauthorized (owner never the requester; never on a file it does not own); appending, which "
                 "it could do itself, is served",
                 f"both refused, root-owned.log still root's (0666), new.log not created; SIGTERM {took:.2f} s", 0)
