"""The daemon's configuration: load_config on good and bad TOML, endpoint
defaults, the round trip through check-config's TOML, and the reference
config in daemon/clh-writerd.toml."""

import dataclasses
import os
import re
from pathlib import Path

import pytest

from clh_writerd import protocol
from clh_writerd._resources import generated_block
from clh_writerd.daemon import config as config_mod
from clh_writerd.daemon.config import OPTIONS, Config, ConfigError, FileOverride, load_config
from clh_writerd.daemon.options import SAME_BLOCK

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
REFERENCE = os.path.join(REPO, "daemon", "clh-writerd.toml")


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A neutral environment: no endpoint override, a short runtime dir, cwd in tmp_path."""
    monkeypatch.delenv("CLH_WRITERD_ENDPOINT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_text(tmp_path, text):
    return load_config(write(tmp_path, text))


def refused(tmp_path, text):
    """The ConfigError message load_config gives for ``text``."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


# -- good files ---------------------------------------------------------------
def test_embedded_default_is_the_documented_defaults(env, tmp_path):
    cfg = load_config(None)
    assert cfg.endpoint == "ipc:///run/user/4242/clh-writerd/writerd.sock"
    assert cfg.allowed_dirs == (str(tmp_path / "logs"),)
    assert cfg.socket_dir_mode == 0o700
    assert cfg.allow_remote_tcp is False and cfg.allow_owner is False
    assert cfg.fsync_policy == "never" and cfg.files == ()
    assert cfg.source == config_mod.EMBEDDED


def test_a_full_file_is_loaded_with_every_value(env, tmp_path):
    cfg = load_text(tmp_path, """
[daemon]
endpoint = "tcp://127.0.0.1:5599"
tcp_auth = "none"
socket_dir_mode = 0o750
socket_group = "0"
allowed_dirs = ["/var/log/a", "/var/log/b"]
create_allowed_dirs = false
allow_owner = true
drain_timeout = 3
log_level = "debug"
[limits]
max_message_bytes = 65536
queue_batches = 8
max_write_chars = 4096
max_files = 7
max_clients = 9
[fsync]
policy = "interval"
interval = 0.25
""")
    assert cfg.endpoint == "tcp://127.0.0.1:5599"
    assert cfg.socket_dir_mode == 0o750
    assert cfg.allowed_dirs == ("/var/log/a", "/var/log/b")
    assert cfg.create_allowed_dirs is False and cfg.allow_owner is True
    # An integer where a float is expected is accepted and converted.
    assert cfg.drain_timeout == 3.0 and type(cfg.drain_timeout) is float
    assert cfg.log_level == "debug"
    assert (cfg.max_message_bytes, cfg.queue_batches, cfg.max_write_chars, cfg.max_files, cfg.max_clients) == (
        65536, 8, 4096, 7, 9)
    assert (cfg.fsync_policy, cfg.fsync_interval) == ("interval", 0.25)
    assert cfg.source == str(tmp_path / "c.toml")


def test_relative_allowed_dirs_resolve_against_the_working_directory(env, tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    cfg = load_text(tmp_path, '[daemon]\nallowed_dirs = ["logs", "sub/../other", "link"]\n')
    assert cfg.allowed_dirs == (str(tmp_path / "logs"), str(tmp_path / "other"), str(tmp_path / "real"))


def test_files_overrides_and_fsync_for(env, tmp_path):
    cfg = load_text(tmp_path, """
[fsync]
policy = "never"
interval = 2.0
[[files]]
path = "/var/log/app/audit*.log"
fsync = "batch"
[[files]]
path = "/var/log/app/*.log"
fsync = "interval"
fsync_interval = 0.5
[[files]]
path = "rel/*.log"
""")
    assert cfg.files[0] == FileOverride("/var/log/app/audit*.log", "batch", 2.0)
    assert cfg.files[1] == FileOverride("/var/log/app/*.log", "interval", 0.5)
    # A relative pattern is made absolute; missing keys take the [fsync] defaults.
    assert cfg.files[2] == FileOverride(str(tmp_path / "rel" / "*.log"), "never", 2.0)
    # The first matching entry wins, even though the second also matches.
    assert cfg.fsync_for("/var/log/app/audit-2024.log") == ("batch", 2.0)
    assert cfg.fsync_for("/var/log/app/requests.log") == ("interval", 0.5)
    # No match: the daemon-wide policy. Matching is case-sensitive.
    assert cfg.fsync_for("/var/log/other/x.log") == ("never", 2.0)
    assert cfg.fsync_for("/var/log/app/AUDIT.LOG") == ("never", 2.0)


# -- refused files ------------------------------------------------------------
@pytest.mark.parametrize("text, named", [
    ("[deamon]\nendpoint = ''\n", "deamon"),
    ("endpoint = 'ipc:///tmp/x.sock'\n", "endpoint"),
    ("[daemon]\nallowed_dir = ['/tmp']\n", "allowed_dir"),
    ("[limits]\nmax_batches = 3\n", "max_batches"),
    ("[fsync]\npolicy = 'batch'\nintervall = 1.0\n", "intervall"),
    ("[[files]]\npath = '/x/*.log'\nfsnyc = 'batch'\n", "fsnyc"),
])
def test_unknown_sections_and_keys_are_refused_by_name(env, tmp_path, text, named):
    message = refused(tmp_path, text)
    assert named in message
    assert str(tmp_path / "c.toml") in message  # which file


@pytest.mark.parametrize("text, named", [
    ("[daemon]\ndrain_timeout = 'soon'\n", "daemon.drain_timeout"),
    ("[daemon]\ndrain_timeout = true\n", "daemon.drain_timeout"),
    ("[daemon]\nallow_owner = 1\n", "daemon.allow_owner"),
    ("[daemon]\nallow_remote_tcp = 'yes'\n", "daemon.allow_remote_tcp"),
    ("[daemon]\nallowed_dirs = '/var/log'\n", "daemon.allowed_dirs"),
    ("[daemon]\nallowed_dirs = []\n", "daemon.allowed_dirs"),
    ("[daemon]\nallowed_dirs = ['']\n", "daemon.allowed_dirs"),
    ("[daemon]\nendpoint = 5\n", "daemon.endpoint"),
    ("[daemon]\nsocket_dir_mode = '0700'\n", "daemon.socket_dir_mode"),
    ("[daemon]\nlog_level = 'verbose'\n", "daemon.log_level"),
    ("[limits]\nqueue_batches = 2.5\n", "limits.queue_batches"),
    ("[limits]\nmax_files = true\n", "limits.max_files"),
    ("[fsync]\npolicy = 'always'\n", "fsync.policy"),
    ("[[files]]\nfsync = 'batch'\n", "files[0].path"),
    ("[[files]]\npath = '/x'\nfsync = 'sometimes'\n", "files[0].fsync"),
    ("daemon = 3\n", "[daemon]"),
    ("files = 3\n", "[[files]]"),
])
def test_wrong_types_are_refused_by_name(env, tmp_path, text, named):
    assert named in refused(tmp_path, text)


def test_files_entries_that_are_not_tables_are_refused(env, tmp_path):
    assert "files" in refused(tmp_path, "files = [1]\n")


@pytest.mark.parametrize("text, named", [
    ("[daemon]\ndrain_timeout = 0.0\n", "daemon.drain_timeout"),
    ("[daemon]\ndrain_timeout = 1e9\n", "daemon.drain_timeout"),
    ("[daemon]\nsocket_dir_mode = 0o10000\n", "daemon.socket_dir_mode"),
    ("[daemon]\nsocket_dir_mode = -1\n", "daemon.socket_dir_mode"),
    # The group may connect, never write the directory (issue 25: 0o770 let a member swap the socket).
    ("[daemon]\nsocket_dir_mode = 0o770\nsocket_group = '0'\n", "daemon.socket_dir_mode"),
    ("[daemon]\nendpoint = 'ipc://@clh-writerd'\n", "abstract ipc endpoints"),
    ("[limits]\nstats_max_bytes = 1024\n", "limits.stats_max_bytes"),
    ("[limits]\nqueue_bytes = 0\n", "limits.queue_bytes"),
    ("[daemon]\nstats_admins = ['key:short']\n", "daemon.stats_admins"),
    ("[limits]\nmax_message_bytes = 100\n", "limits.max_message_bytes"),
    (f"[limits]\nmax_message_bytes = {protocol.MAX_FRAME_BYTES + 1}\n", "limits.max_message_bytes"),
    ("[limits]\nqueue_batches = 0\n", "limits.queue_batches"),
    ("[limits]\nmax_files = 100001\n", "limits.max_files"),
    ("[limits]\nmax_clients = 0\n", "limits.max_clients"),
    ("[limits]\nmax_write_chars = 10\n", "limits.max_write_chars"),
    ("[fsync]\ninterval = 0\n", "fsync.interval"),
    ("[[files]]\npath = '/x'\nfsync_interval = 99999.0\n", "files[0].fsync_interval"),
])
def test_out_of_range_values_are_refused_by_name(env, tmp_path, text, named):
    assert named in refused(tmp_path, text)


def test_an_unknown_socket_group_is_refused(env, tmp_path):
    assert "no-such-group-clhw" in refused(tmp_path, "[daemon]\nsocket_group = 'no-such-group-clhw'\n")
    # A numeric gid is taken as is.
    assert load_text(tmp_path, "[daemon]\nsocket_group = '12345'\n").socket_group == "12345"


def test_invalid_toml_and_missing_files_are_config_errors(env, tmp_path):
    assert "invalid TOML" in refused(tmp_path, "[daemon\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"))


# -- the endpoint -------------------------------------------------------------
def test_endpoint_env_override_wins(env, tmp_path):
    env.setenv("CLH_WRITERD_ENDPOINT", "tcp://127.0.0.1:7001")
    assert load_text(tmp_path, '[daemon]\ntcp_auth = "none"\n').endpoint == "tcp://127.0.0.1:7001"
    # The embedded default has tcp_auth = "curve" and no keys: a tcp endpoint is refused.
    with pytest.raises(ConfigError, match="tcp://127.0.0.1:7001 needs CURVE keys"):
        load_config(None)
    # An explicit endpoint in the file wins over the environment.
    cfg = load_text(tmp_path, '[daemon]\nendpoint = "tcp://127.0.0.1:7002"\ntcp_auth = "none"\n')
    assert cfg.endpoint == "tcp://127.0.0.1:7002"


def test_endpoint_defaults_to_the_runtime_dir_then_tmp(env):
    env.setenv("XDG_RUNTIME_DIR", "/run/user/77")
    assert load_config(None).endpoint == "ipc:///run/user/77/clh-writerd/writerd.sock"
    env.delenv("XDG_RUNTIME_DIR")
    assert load_config(None).endpoint == f"ipc:///tmp/clh-writerd-{os.getuid()}/writerd.sock"
    # The client computes the very same default.
    assert protocol.default_endpoint() == load_config(None).endpoint


def test_relative_ipc_path_is_made_absolute(env, tmp_path):
    cfg = load_text(tmp_path, '[daemon]\nendpoint = "ipc://w.sock"\n')
    assert cfg.endpoint == f"ipc://{tmp_path}/w.sock"
    assert cfg.ipc_path == f"{tmp_path}/w.sock"


def test_too_long_ipc_path_is_refused(env, tmp_path):
    fits = "/tmp/" + "a" * (107 - len("/tmp/"))
    assert load_text(tmp_path, f'[daemon]\nendpoint = "ipc://{fits}"\n').ipc_path == fits
    message = refused(tmp_path, f'[daemon]\nendpoint = "ipc://{fits}b"\n')
    assert "107" in message and "endpoint" in message
    # The computed default is checked too.
    env.setenv("XDG_RUNTIME_DIR", "/run/" + "r" * 120)
    with pytest.raises(ConfigError, match="107"):
        load_config(None)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5599", "tcp://127.9.9.9:5599", "tcp://localhost:5599",
                                      "tcp://[::1]:5599"])
def test_loopback_tcp_is_accepted(env, tmp_path, endpoint):
    assert load_text(tmp_path, f'[daemon]\nendpoint = "{endpoint}"\ntcp_auth = "none"\n').endpoint == endpoint
    assert "needs CURVE keys" in refused(tmp_path, f'[daemon]\nendpoint = "{endpoint}"\n')


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5599", "tcp://*:5599", "tcp://10.1.2.3:5599",
                                      "tcp://example.com:5599", "tcp://[::]:5599", "tcp://eth0:5599"])
def test_non_loopback_tcp_needs_allow_remote_tcp(env, tmp_path, endpoint):
    message = refused(tmp_path, f'[daemon]\nendpoint = "{endpoint}"\n')
    assert "allow_remote_tcp" in message and endpoint in message
    cfg = load_text(tmp_path, f'[daemon]\nendpoint = "{endpoint}"\nallow_remote_tcp = true\ntcp_auth = "none"\n')
    assert cfg.endpoint == endpoint


@pytest.mark.parametrize("endpoint", ["inproc://x", "udp://127.0.0.1:1", "/tmp/w.sock"])
def test_other_transports_are_refused(env, tmp_path, endpoint):
    assert "ipc:// or tcp://" in refused(tmp_path, f'[daemon]\nendpoint = "{endpoint}"\n')


# -- as_toml ------------------------------------------------------------------
def test_as_toml_loads_back_to_an_equal_config(env, tmp_path):
    original = load_text(tmp_path, r"""
[daemon]
endpoint = "ipc://sock dir/w.sock"
socket_dir_mode = 0o750
allowed_dirs = ["logs", "quoted \"dir\"", 'back\slash']
allow_owner = true
drain_timeout = 2.5
[limits]
queue_batches = 3
[fsync]
policy = "batch"
[[files]]
path = "/var/log/*.log"
fsync = "interval"
fsync_interval = 0.125
[[files]]
path = "/srv/audit.log"
""")
    text = original.as_toml()
    again = load_config(write(tmp_path, text, "effective.toml"))
    assert dataclasses.replace(again, source=original.source) == original
    # Modes are printed the way people write them.
    assert re.search(r"^socket_dir_mode = 0o750$", text, re.M)


def test_as_toml_of_the_embedded_default_loads_back(env, tmp_path):
    original = load_config(None)
    again = load_config(write(tmp_path, original.as_toml()))
    assert dataclasses.replace(again, source=original.source) == original


def test_as_toml_lists_every_option(env):
    text = load_config(None).as_toml()
    for opt in OPTIONS:
        assert re.search(rf"^{opt.key} = ", text, re.M), opt.key


# -- the reference config -----------------------------------------------------
REGENERATE = "regenerate it: make generated (python -m clh_writerd.daemon.config docs/operations.md " \
             "docs/forwarding.md daemon/clh-writerd.toml)"


def reference_is_stale(path):
    """Whether the file at ``path`` differs from what the generator writes from OPTIONS."""
    with open(path, encoding="utf-8") as f:
        return f.read() != config_mod.reference_toml()


def test_the_reference_config_is_generated_from_the_options_table():
    assert not reference_is_stale(REFERENCE), REGENERATE


@pytest.mark.parametrize("old, new", [
    ("Clients compute the same default.", "Clients compute the same defaulT."),  # prose, invisible to the loader
    ("drain_timeout = 10.0", "drain_timeout = 10.5"),
])
def test_an_edited_reference_config_is_stale(tmp_path, old, new):
    """Negative control: one character changed by hand is caught."""
    text = Path(REFERENCE).read_text(encoding="utf-8")
    assert text.count(old) == 1
    copy = tmp_path / "clh-writerd.toml"
    copy.write_text(text.replace(old, new), encoding="utf-8")
    assert reference_is_stale(str(copy))


def test_the_reference_config_sets_every_key_to_its_default(env):
    """Every key is written in its section, reads back as the table's default,
    and the daemon's loader takes the file as the embedded default."""
    with open(REFERENCE, "rb") as f:
        data = config_mod.tomllib.load(f)
    written = {(section, key): value for section, table in data.items() for key, value in table.items()}
    assert written == {(opt.section, opt.key): opt.default for opt in OPTIONS}
    assert dataclasses.replace(load_config(REFERENCE), source=config_mod.EMBEDDED) == load_config(None)


def test_every_key_has_notes_or_shares_the_block_above():
    """A key without notes of its own (SAME_BLOCK) is explained by the block of the
    key above it, so the first key of a section needs its own."""
    firsts = [next(o for o in OPTIONS if o.section == section) for section in {o.section for o in OPTIONS}]
    assert [o.key for o in firsts if o.notes == SAME_BLOCK] == []
    assert all(o.notes == SAME_BLOCK or o.notes.strip() for o in OPTIONS)


def test_the_reference_config_s_files_example_is_a_valid_config(env):
    """The commented [[files]] example, uncommented, loads as the overrides it describes."""
    lines = Path(REFERENCE).read_text(encoding="utf-8").splitlines()
    first = lines.index("# [[files]]")
    example = []
    for line in lines[first:]:
        if not line.startswith("#"):
            break
        example.append(line[2:])
    cfg = config_mod.config_from_mapping(config_mod.tomllib.loads("\n".join(example)))
    assert cfg.files == (FileOverride(os.path.abspath("/var/log/myapp/audit*.log"), "batch", 1.0),
                         FileOverride(os.path.abspath("/var/log/myapp/*.log"), "interval", 0.5))


@pytest.mark.parametrize("text, expected", [
    ("[limits]\nqueue_batches = 'many'\n", "limits.queue_batches must be an integer in [1, 1000000], got 'many'"),
    ("[daemon]\ndrain_timeout = 'soon'\n", "daemon.drain_timeout must be a number in [0.1, 3600.0], got 'soon'"),
])
def test_type_errors_name_the_kind_in_plain_english(env, tmp_path, text, expected):
    assert refused(tmp_path, text).endswith(expected)


def test_the_guide_s_table_of_keys_is_the_options_table():
    """docs/operations.md's "Configuration keys" table is generated from OPTIONS."""
    guide = (Path(__file__).resolve().parents[3] / "docs" / "operations.md").read_text()
    assert generated_block(guide, "config-table") == config_mod.markdown_table(), \
        REGENERATE
    rows = config_mod.markdown_table().splitlines()[2:]
    assert [re.match(r"\| `\[(\w+)\]` `(\w+)`", row).groups() for row in rows] == [(o.section, o.key) for o in OPTIONS]
    assert "| `[limits]` `queue_bytes` | `67108864` (64 MiB) | live |" in guide


def test_the_forwarding_guide_s_table_is_the_forward_section_of_the_options_table():
    """docs/forwarding.md's table of [forward] keys is generated from OPTIONS
    too: a default is written once (the table of keys), not again in the guide."""
    guide = (Path(__file__).resolve().parents[3] / "docs" / "forwarding.md").read_text()
    assert generated_block(guide, "forward-table") == config_mod.markdown_table("forward"), REGENERATE
    keys = [re.match(r"\| `(\w+)`", row).group(1) for row in config_mod.markdown_table("forward").splitlines()[2:]]
    assert keys == [o.key for o in OPTIONS if o.section == "forward"] and "window" in keys
    assert "| `window` | `256` | restart |" in guide


def test_a_key_is_declared_once_its_config_attribute_and_forward_option_follow():
    """Config has one typed field per OPTIONS entry (no default of its own);
    the forwarder's options are the [forward] keys by name."""
    from clh_writerd.forward.forwarder import CONFIGURED

    # (That Config's fields are OPTIONS' keys is checked when the module loads.)
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(Config))
    assert sorted(CONFIGURED) == sorted(o.key for o in OPTIONS if o.section == "forward")


def test_the_reload_notes_of_the_operations_guide_agree_with_the_options():
    """docs/operations.md's reload notes name real keys, and say `restart` of
    exactly the keys declared so (Option.restart_only, which the server's
    reload reads); which keys apply live is the generated table's column."""
    guide = (Path(__file__).resolve().parents[3] / "docs" / "operations.md").read_text()
    section = guide[guide.index("## Reload (SIGHUP)"):guide.index("## Stop, drain and exit codes")]
    keys = {o.key: o for o in OPTIONS if o.section in ("daemon", "limits", "fsync")}
    notes = [n for n in section.split("\n- ")[1:]]
    assert len(notes) >= 5
    for note in notes:
        named = [k for k in re.findall(r"`([a-z_]+)`", note) if k not in ("restart", "live")]
        assert set(named) <= set(keys) | {"fsync", "files"}, (set(named) - set(keys), note[:60])
        for key in set(named) & set(keys):
            assert keys[key].restart_only == ("`restart`" in note), (key, note[:60])


# -- the [forward] section ---------------------------------------------------
def test_forwarding_is_off_by_default():
    assert config_mod.config_from_mapping({}).forward_target == ""


def test_a_target_needs_paths():
    with pytest.raises(ConfigError, match="forward.paths is empty"):
        config_mod.config_from_mapping({"forward": {"target": "10.0.0.1:2514"}})


@pytest.mark.parametrize("target", ["central", "central:", ":2514", "central:99999"])
def test_a_bad_target_is_refused_with_its_key(target):
    with pytest.raises(ConfigError, match="forward.target"):
        config_mod.config_from_mapping({"forward": {"target": target, "paths": ["/var/log/a.log"]}})
