"""PathPolicy (``clh_writerd.daemon.paths``): the daemon writes only under allowed_dirs.

The same refusals against a real daemon: tests/e2e/daemon/test_paths.py.
"""

import os

import pytest

from clh_writerd import protocol
from clh_writerd.daemon.paths import PathPolicy


# -- PathPolicy ---------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    allowed = tmp_path / "logs"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    return allowed, outside


def refused(policy: PathPolicy, path: str, what: str = "path") -> str:
    with pytest.raises(protocol.ProtocolError) as info:
        policy.check(path, what)
    assert info.value.code == protocol.E_FORBIDDEN_PATH
    return info.value.message


def test_a_file_in_an_allowed_dir_is_accepted(tree):
    allowed, _ = tree
    policy = PathPolicy([str(allowed)])
    assert policy.check(str(allowed / "app.log")) == str(allowed / "app.log")
    assert policy.check(str(allowed / "deep" / "er" / "app.log")) == str(allowed / "deep" / "er" / "app.log")


def test_allowed_dirs_and_paths_are_compared_as_real_paths(tree, tmp_path):
    allowed, _ = tree
    os.symlink(allowed, tmp_path / "logs-link")
    via_link = PathPolicy([str(tmp_path / "logs-link")], aliases=[str(tmp_path / "logs-link")])
    assert via_link.allowed_dirs == (str(allowed),)
    assert via_link.check(str(allowed / "a.log")) == str(allowed / "a.log")
    # The configured name of a symlinked allowed directory works too ...
    assert via_link.check(str(tmp_path / "logs-link" / "a.log")) == str(allowed / "a.log")
    # ... but a client's own symlinks are never resolved to find its root: no
    # filesystem call on a path before it is known to be inside an allowed dir.
    assert "outside" in refused(PathPolicy([str(allowed)]), str(tmp_path / "logs-link" / "a.log"))
    # A symlink below the allowed directory is refused even when it stays
    # inside: the daemon never follows one (docs/security.md).
    (allowed / "current").mkdir()
    os.symlink(allowed / "current", allowed / "latest")
    assert "symlink" in refused(via_link, str(allowed / "latest" / "a.log"))


def test_paths_outside_are_refused(tree, tmp_path):
    allowed, outside = tree
    policy = PathPolicy([str(allowed)])
    assert "outside the allowed directories" in refused(policy, str(outside / "a.log"))
    # A sibling whose name starts like the allowed dir is not inside it.
    assert "outside" in refused(policy, str(tmp_path / "logs-evil" / "a.log"))
    assert "outside" in refused(policy, "/etc/passwd")


def test_dotdot_relative_and_nul_are_refused(tree):
    allowed, _ = tree
    policy = PathPolicy([str(allowed)])
    assert "'..'" in refused(policy, f"{allowed}/../outside/a.log")
    # Even when it would land inside again.
    assert "'..'" in refused(policy, f"{allowed}/sub/../a.log")
    assert "not absolute" in refused(policy, "logs/a.log")
    assert "not absolute" in refused(policy, "a.log")
    assert "NUL" in refused(policy, f"{allowed}/a\x00.log")


def test_symlinks_leading_out_are_refused(tree):
    allowed, outside = tree
    policy = PathPolicy([str(allowed)])
    os.symlink(outside, allowed / "escape")
    os.symlink(outside / "victim.log", allowed / "victim.log")
    os.symlink(outside / "not-yet.log", allowed / "dangling.log")
    assert "symlink" in refused(policy, str(allowed / "escape" / "a.log"))
    assert "symlink" in refused(policy, str(allowed / "victim.log"))
    assert "symlink" in refused(policy, str(allowed / "dangling.log"))


def test_directories_and_the_allowed_dir_itself_are_refused(tree):
    allowed, _ = tree
    (allowed / "adir").mkdir()
    policy = PathPolicy([str(allowed)])
    assert "is a directory" in refused(policy, str(allowed / "adir"))
    refused(policy, str(allowed))
    refused(policy, str(allowed) + "/")


def test_several_allowed_dirs(tree, tmp_path):
    allowed, outside = tree
    policy = PathPolicy([str(allowed), str(outside)])
    assert policy.check(str(outside / "b.log")) == str(outside / "b.log")
    refused(policy, str(tmp_path / "c.log"))


def test_check_dir_for_a_lock_directory(tree):
    allowed, outside = tree
    policy = PathPolicy([str(allowed)])
    assert policy.check_dir(str(allowed), "lock_file_directory") == str(allowed)
    assert policy.check_dir(str(allowed / "locks"), "lock_file_directory") == str(allowed / "locks")
    with pytest.raises(protocol.ProtocolError, match="lock_file_directory") as info:
        policy.check_dir(str(outside), "lock_file_directory")
    assert info.value.code == protocol.E_FORBIDDEN_PATH


def test_ensure_parent_creates_missing_directories_inside(tree):
    allowed, _ = tree
    policy = PathPolicy([str(allowed)])
    real = policy.check(str(allowed / "a" / "b" / "app.log"))
    policy.ensure_parent(real)
    assert (allowed / "a" / "b").is_dir()
    assert not (allowed / "a" / "b" / "app.log").exists()


def test_a_name_too_long_for_the_rotation_and_lock_names_is_refused_before_any_write(tree):
    """NAME_MAX is 255 bytes, but CLH derives "<name>.rotate.<20 digits>" and the lock name from it:
    a 255-byte name was accepted and failed at the first lock as write_failed (issue 25)."""
    from clh_writerd.daemon.paths import MAX_NAME_BYTES

    allowed, _ = tree
    policy = PathPolicy([str(allowed)])
    assert "file name is longer than 227 bytes" in refused(policy, str(allowed / ("n" * 255)))
    assert "file name is longer" in refused(policy, str(allowed / ("é" * 114)))  # 228 bytes in UTF-8
    assert policy.check(str(allowed / ("n" * MAX_NAME_BYTES))) == str(allowed / ("n" * MAX_NAME_BYTES))


def test_the_depth_is_refused_before_the_root_is_looked_for(tree):
    allowed, _ = tree
    policy = PathPolicy([str(allowed)], max_depth=4)
    # The path: 2,047 components, none of them an allowed directory.
    message = refused(policy, "/zz" + "/a" * 2045 + "/x")
    assert "2047 components" in message and "max_path_depth = 4" in message
