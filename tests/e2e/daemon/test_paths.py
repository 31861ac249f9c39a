"""The daemon writes only under allowed_dirs.

Against a real daemon: every forbidden path or bad option gets an error
reply with a stable code, a stats counter grows, and nothing is created or
changed anywhere outside (or, for a refused request, inside) the allowed
directories. PathPolicy's own tests: tests/unit/daemon/test_paths.py.
"""

import os
from typing import Any, Dict, Iterator, NamedTuple, Set

import pytest

from clh_writerd import protocol
from support import DaemonProcess, RawClient, read_lines, wait_for


# -- against a live daemon ----------------------------------------------------
class Served(NamedTuple):
    daemon: DaemonProcess
    client: RawClient
    base: str
    allowed: str
    outside: str


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """One daemon for the whole refusal matrix: each case uses its own names."""
    base = str(tmp_path_factory.mktemp("paths"))
    outside = os.path.join(base, "outside")
    os.mkdir(outside)
    daemon = DaemonProcess(base)
    client = None
    try:
        daemon.start()
        client = RawClient(daemon.endpoint, "paths-test")
        yield Served(daemon, client, base, daemon.log_dir, outside)
    finally:
        if client is not None:
            client.close()
        daemon.cleanup()


def snapshot(base: str, ignore: str) -> Dict[str, Any]:
    """Every entry under ``base``: its kind, and a file's size and mtime."""
    out: Dict[str, Any] = {}
    for root, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(root, name)
            if path == ignore:
                continue
            st = os.lstat(path)
            out[path] = (st.st_mode, st.st_size if os.path.isfile(path) else 0, st.st_mtime_ns)
    return out


def _counter(daemon: DaemonProcess, code: str) -> int:
    return daemon.stats()["daemon"]["counters"][code]


def _client_errors(daemon: DaemonProcess, program: str) -> int:
    return sum(c["errors"] for c in daemon.stats()["clients"] if c["program"] == program)


def assert_refused(s: Served, path: str, options: Dict[str, Any], code: str, must_not_exist: Set[str]) -> str:
    """Send one batch and check everything a user would: the error reply, the
    counters, and that the filesystem is exactly as before."""
    before_count = _counter(s.daemon, code)
    before_errors = _client_errors(s.daemon, "paths-test")
    before_tree = snapshot(s.base, s.daemon.stderr_path)
    reply = s.client.write(path, ["must not be written"], options, timeout=10)
    assert isinstance(reply, protocol.Error), reply
    assert reply.code == code, reply
    # The daemon reuses a stats document for ten times its build time (a
    # bound on what stats requests cost it): wait for a fresh one.
    wait_for(lambda: _counter(s.daemon, code) == before_count + 1, 5, f"the {code} counter to count the refusal")
    wait_for(lambda: _client_errors(s.daemon, "paths-test") == before_errors + 1, 5, "the client's errors to count it")
    # Nothing created or modified, inside or outside the allowed dirs.
    assert snapshot(s.base, s.daemon.stderr_path) == before_tree
    for target in must_not_exist:
        assert not os.path.lexists(target), f"{target} was created"
    # No writer was opened for a refused file.
    assert all("must not" not in str(f["path"]) for f in s.daemon.stats()["files"])
    return reply.message


def test_outside_path_is_refused(served):
    target = os.path.join(served.outside, "abs.log")
    message = assert_refused(served, target, {}, protocol.E_FORBIDDEN_PATH, {target})
    assert "outside the allowed directories" in message


def test_sibling_with_the_same_prefix_is_refused(served):
    target = served.allowed + "-evil/app.log"
    assert_refused(served, target, {}, protocol.E_FORBIDDEN_PATH, {target, served.allowed + "-evil"})


def test_dotdot_is_refused(served):
    escaped = os.path.join(served.outside, "dotdot.log")
    assert_refused(served, f"{served.allowed}/../outside/dotdot.log", {}, protocol.E_FORBIDDEN_PATH, {escaped})
    inside = os.path.join(served.allowed, "inside.log")
    assert_refused(served, f"{served.allowed}/sub/../inside.log", {}, protocol.E_FORBIDDEN_PATH,
                   {inside, os.path.join(served.allowed, "sub")})


def test_relative_path_is_refused(served):
    # Relative to the daemon's cwd this would even be inside the allowed dir.
    assert_refused(served, "logs/rel.log", {}, protocol.E_FORBIDDEN_PATH,
                   {os.path.join(served.allowed, "rel.log")})


def test_nul_is_refused(served):
    assert_refused(served, f"{served.allowed}/nul\x00.log", {}, protocol.E_FORBIDDEN_PATH,
                   {os.path.join(served.allowed, "nul")})


def test_symlinked_directory_leading_out_is_refused(served):
    target_dir = os.path.join(served.outside, "target-dir")
    os.mkdir(target_dir)
    os.symlink(target_dir, os.path.join(served.allowed, "escape"))
    assert_refused(served, os.path.join(served.allowed, "escape", "app.log"), {}, protocol.E_FORBIDDEN_PATH,
                   {os.path.join(target_dir, "app.log")})
    assert os.listdir(target_dir) == []


def test_symlinked_file_leading_out_is_refused(served):
    victim = os.path.join(served.outside, "victim.log")
    with open(victim, "w") as f:
        f.write("secret\n")
    os.symlink(victim, os.path.join(served.allowed, "victim.log"))
    assert_refused(served, os.path.join(served.allowed, "victim.log"), {}, protocol.E_FORBIDDEN_PATH, set())
    with open(victim) as f:
        assert f.read() == "secret\n"


def test_dangling_symlink_leading_out_is_refused(served):
    target = os.path.join(served.outside, "not-yet.log")
    os.symlink(target, os.path.join(served.allowed, "dangling.log"))
    assert_refused(served, os.path.join(served.allowed, "dangling.log"), {}, protocol.E_FORBIDDEN_PATH, {target})


def test_directory_is_refused(served):
    adir = os.path.join(served.allowed, "adir")
    os.mkdir(adir)
    message = assert_refused(served, adir, {}, protocol.E_FORBIDDEN_PATH, set())
    assert "directory" in message
    assert os.listdir(adir) == []
    assert_refused(served, served.allowed, {}, protocol.E_FORBIDDEN_PATH, set())


@pytest.mark.parametrize("lock_dir", ["outside/locks", "relative-locks", "logs/../outside/locks2"])
def test_lock_file_directory_outside_is_refused(served, lock_dir):
    if lock_dir.startswith("outside") or lock_dir.startswith("logs"):
        lock_dir = os.path.join(served.base, lock_dir)
    log_file = os.path.join(served.allowed, "locked.log")
    message = assert_refused(served, log_file, {"lock_file_directory": lock_dir}, protocol.E_FORBIDDEN_PATH,
                             {log_file, os.path.join(served.outside, "locks"),
                              os.path.join(served.outside, "locks2"), os.path.join(served.base, "relative-locks")})
    assert "lock_file_directory" in message


def test_owner_is_refused_while_allow_owner_is_false(served):
    log_file = os.path.join(served.allowed, "owned.log")
    message = assert_refused(served, log_file, {"owner": ["root", "root"]}, protocol.E_BAD_OPTIONS, {log_file})
    assert "allow_owner" in message


@pytest.mark.parametrize("options, named", [
    ({"backupCount": 10**6}, "backupCount"),
    ({"maxBytes": -1}, "maxBytes"),
    ({"maxBytes": True}, "maxBytes"),
    ({"when": "S", "interval": 0}, "interval"),
    ({"interval": 5}, "interval"),
    ({"when": "fortnightly"}, "when"),
    ({"chmod": 0o10000}, "chmod"),
    ({"encoding": "no-such-codec"}, "encoding"),
    ({"terminator": ""}, "terminator"),
    ({"owner": ["only-user"]}, "owner"),
    ({"colour": "red"}, "colour"),
])
def test_absurd_options_are_refused(served, options, named):
    log_file = os.path.join(served.allowed, f"opts-{named}.log")
    message = assert_refused(served, log_file, options, protocol.E_BAD_OPTIONS, {log_file})
    assert named in message


def test_missing_subdirectory_of_an_allowed_dir_is_created_and_written(served):
    target = os.path.join(served.allowed, "app", "2024", "requests.log")
    reply = served.client.write(target, ["first", "second"], timeout=10)
    assert isinstance(reply, protocol.Ack), reply
    assert read_lines(target) == ["first", "second"]
    entry = served.daemon.file_stats(target)
    assert entry["records_written"] == 2
    # After all the refusals above the daemon is still serving this client.
    reply = served.client.write(target, ["third"], timeout=10)
    assert isinstance(reply, protocol.Ack), reply
    assert read_lines(target) == ["first", "second", "third"]


def test_lock_file_directory_inside_is_used(served):
    locks = os.path.join(served.allowed, "locks")
    target = os.path.join(served.allowed, "with-locks.log")
    reply = served.client.write(target, ["locked line"], {"lock_file_directory": locks}, timeout=10)
    assert isinstance(reply, protocol.Ack), reply
    assert read_lines(target) == ["locked line"]
    assert any(name.endswith(".lock") for name in os.listdir(locks))


def test_a_sync_record_to_a_forbidden_path_is_refused(served):
    target = os.path.join(served.outside, "sync.log")
    before = _counter(served.daemon, protocol.E_FORBIDDEN_PATH)
    reply = served.client.sync(target, "must not be written", timeout=10)
    assert isinstance(reply, protocol.Error) and reply.code == protocol.E_FORBIDDEN_PATH, reply
    assert _counter(served.daemon, protocol.E_FORBIDDEN_PATH) == before + 1
    assert not os.path.exists(target)
