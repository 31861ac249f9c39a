"""The daemon and its apps as different users, as deployed: the app's
fallback must be able to write the files the daemon created for it when the
daemon goes down, whatever umask the daemon was started under.

Before: a daemon started by hand (umask 022) created the log and its lock
0644 as itself; the app, another user, then got PermissionError in its
fallback (101 records lost in a short outage, 2,545 of 3,000 in a longer one).

The app runs as a real second user in a forked process (the interpreter
under /root cannot be run by another user; the fork needs no exec).
"""

import grp
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid
from typing import Iterator, Tuple

import pytest

from support import DaemonProcess, check_sequences, read_lines, seq_record

from clh_writerd.daemon.paths import Authority
from clh_writerd.daemon.safefiles import DirHandle, build_safe_handler


@pytest.fixture(scope="module")
def app_user() -> Iterator[Tuple[str, int, int]]:
    """(name, uid, gid) of a real user in a group of its own (useradd; removed after)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user (CI runs as root)")
    name = f"clhapp{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        entry = __import__("pwd").getpwnam(name)
        yield name, entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def shared(app_user) -> Iterator[str]:
    """A base directory others can reach, holding logs/ root:<app group> 2775 (the documented setup)."""
    base = tempfile.mkdtemp(prefix="clh-users-", dir="/tmp")
    os.chmod(base, 0o755)
    logs = os.path.join(base, "logs")
    os.mkdir(logs)
    os.chown(logs, 0, app_user[2])
    os.chmod(logs, 0o2775)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def read_within(fd: int, timeout: float = 60.0) -> bytes:
    """What the child wrote on ``fd``; fails after ``timeout`` (a stuck child is a failed test)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "the app (as the second user) said nothing in time"
    data = os.read(fd, 65536)
    assert data, "the app (as the second user) failed before it could answer"
    return data


def as_user(user: Tuple[str, int, int], action) -> int:
    """Fork, become ``user`` (with its groups), run ``action``; the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups(os.getgrouplist(user[0], user[2]))
            os.setgid(user[2])
            os.setuid(user[1])
            action()
            code = 0
        except BaseException as exc:
            os.write(2, f"as {user[0]}: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(code)
    return pid


def test_a_daemon_started_by_hand_leaves_files_the_apps_fallback_can_write(app_user, shared, tmp_path):
    """A root daemon with umask 022; the app, another user, logs through
    it, then the daemon is SIGKILLed and the app goes on in its fallback on
    the same file: every record is in the file, none lost."""
    logs = os.path.join(shared, "logs")
    path = os.path.join(logs, "app.log")
    daemon = DaemonProcess(str(tmp_path), log_dir=logs, preexec_fn=lambda: os.umask(0o022),
                           daemon={"socket_dir_mode": 0o750, "socket_group": app_user[0],
                                   "allowed_groups": [app_user[2]]})
    os.chmod(daemon.socket_dir, 0o750)
    os.chown(daemon.socket_dir, 0, app_user[2])
    daemon.start()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()

    def app() -> None:
        import logging

        for fd in (ready_r, out_r, go_w):  # the parent's ends: EOF on go_r if the parent dies
            os.close(fd)

        from clh_writerd import create_nonblocking_handler

        handler = create_nonblocking_handler(path, endpoint=daemon.endpoint, maxBytes=20000, backupCount=50,
                                             connect_timeout=5.0, drain_timeout=5.0)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log = logging.getLogger("app")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        for n in range(500):
            log.info(seq_record("app", n))
        handler.flush()
        os.write(ready_w, json.dumps(handler.get_stats()).encode() + b"\n")
        os.read(go_r, 1)  # the daemon is gone now
        for n in range(500, 1000):
            log.info(seq_record("app", n))
        handler.close()
        os.write(out_w, json.dumps(handler.get_stats()).encode())

    try:
        child = as_user(app_user, app)
        for fd in (ready_w, out_w, go_r):  # the child's ends: EOF when it is gone
            os.close(fd)
        before = json.loads(read_within(ready_r))
        assert before["acked"] == 500 and before["state"] == "daemon", (before, daemon.stderr()[-2000:])
        st = os.stat(path)
        daemon.send_signal(signal.SIGKILL)
        daemon.proc.wait(30)
        os.write(go_w, b"g")
        after = json.loads(read_within(out_r))
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        daemon.cleanup()
    assert after["lost"] == 0 and after["write_errors"] == 0 and after["fallback_written"] >= 500, after
    check_sequences(read_lines(path), {"app": 1000}).assert_complete()
    # The daemon gave the file it created to the app's user.
    assert (st.st_uid, st.st_gid) == (app_user[1], app_user[2]), st


def test_an_unprivileged_daemon_makes_what_it_creates_group_writable(app_user, shared):
    """A daemon that is not root cannot give a file away: in a group-writable
    log directory, what it creates for a peer is group-writable, whatever its
    umask (the peer's fallback shares the group)."""
    logs = os.path.join(shared, "logs")
    peer = Authority(424242, app_user[2], frozenset({app_user[2]}))  # another uid of the same group
    out_r, out_w = os.pipe()

    def create() -> None:
        os.umask(0o022)
        directory = DirHandle(logs, (), authority=peer)
        handler = build_safe_handler(directory, "made.log", None, {"maxBytes": 1000, "backupCount": 1})
        handler.do_open().close()
        handler._open_lockfile()
        lock_mode = os.fstat(handler.stream_lock.fileno()).st_mode
        os.write(out_w, json.dumps([os.stat(os.path.join(logs, "made.log")).st_mode, lock_mode]).encode())

    child = as_user(app_user, create)
    os.close(out_w)
    modes = read_within(out_r)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    log_mode, lock_mode = json.loads(modes)
    assert log_mode & stat.S_IWGRP and lock_mode & stat.S_IWGRP, (oct(log_mode), oct(lock_mode))
    assert grp.getgrgid(os.stat(os.path.join(logs, "made.log")).st_gid).gr_gid == app_user[2]  # setgid directory
