"""The ``clh-writerd`` command, run as a user runs it: ``python -m clh_writerd``
and the installed console script, as subprocesses, against real daemons."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest

from clh_writerd import __version__, protocol
from clh_writerd.client.control import DaemonUnavailable, request
from support import short_socket_dir, wait_for, write_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCRIPT = os.path.join(os.path.dirname(sys.executable), "clh-writerd")
MODULE = [sys.executable, "-m", "clh_writerd"]


@pytest.fixture
def no_daemon_env(tmp_path) -> Dict[str, str]:
    """An environment whose default endpoint is a socket nobody serves."""
    sock_dir = short_socket_dir()
    env = dict(os.environ)
    env["CLH_WRITERD_ENDPOINT"] = f"ipc://{sock_dir}/nobody.sock"
    yield env
    shutil.rmtree(sock_dir, ignore_errors=True)


def cli(*args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None, command: List[str] = MODULE,
        timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(command + list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed():
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} missing: is the package installed?"


@pytest.mark.parametrize("command", [MODULE, [SCRIPT]], ids=["module", "script"])
def test_version(command):
    result = cli("--version", command=command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"clh-writerd, version {__version__}"


def test_help_lists_the_commands():
    result = cli("--help")
    assert result.returncode == 0
    for name in ("run", "check-config", "stats", "ping"):
        assert name in result.stdout


# -- check-config ---------------------------------------------------------------
def test_check_config_prints_the_effective_config(tmp_path, no_daemon_env):
    path = write_config(str(tmp_path / "c.toml"),
                        {"daemon": {"endpoint": "tcp://127.0.0.1:5599", "allowed_dirs": ["logs"], "tcp_auth": "none"},
                         "fsync": {"policy": "batch"}},
                        files=[{"path": "/var/log/*.log", "fsync": "interval"}])
    result = cli("check-config", path, env=no_daemon_env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = tomllib.loads(result.stdout)
    # Relative paths are printed resolved; defaults are printed too.
    assert printed["daemon"]["allowed_dirs"] == [str(tmp_path / "logs")]
    assert printed["daemon"]["endpoint"] == "tcp://127.0.0.1:5599"
    assert printed["daemon"]["drain_timeout"] == 10.0
    assert printed["limits"]["queue_batches"] == 256
    assert printed["fsync"]["policy"] == "batch"
    assert printed["files"] == [{"path": "/var/log/*.log", "fsync": "interval", "fsync_interval": 1.0}]
    assert str(tmp_path / "c.toml") in result.stdout  # where it came from
    # What it prints is itself a valid config file.
    again = tmp_path / "effective.toml"
    again.write_text(result.stdout)
    assert cli("check-config", str(again), env=no_daemon_env, cwd=str(tmp_path)).returncode == 0


def test_check_config_warns_about_metrics_listen_without_prometheus_client(tmp_path, no_daemon_env):
    path = write_config(str(tmp_path / "c.toml"), {"daemon": {"metrics_listen": "127.0.0.1:9464"}})
    # A prometheus_client that cannot be imported, first on the path.
    fake = tmp_path / "site" / "prometheus_client"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    env = {**no_daemon_env, "PYTHONPATH": str(tmp_path / "site")}
    result = cli("check-config", path, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "metrics_listen = '127.0.0.1:9464' needs prometheus-client" in result.stderr
    assert "pip install 'clh-writerd[metrics]'" in result.stderr
    # Installed (this venv has the extra): no warning.
    assert cli("check-config", path, env=no_daemon_env, cwd=str(tmp_path)).stderr == ""


def test_check_config_without_a_file_prints_the_embedded_default(tmp_path, no_daemon_env):
    result = cli("check-config", env=no_daemon_env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["daemon"]["endpoint"] == no_daemon_env["CLH_WRITERD_ENDPOINT"]
    assert printed["daemon"]["allowed_dirs"] == [str(tmp_path / "logs")]
    assert not (tmp_path / "logs").exists()  # checking creates nothing


@pytest.mark.parametrize("text, expected", [
    ("[daemon]\nallowed_dirz = ['/tmp']\n", "allowed_dirz"),
    ("[limits]\nqueue_batches = 0\n", "limits.queue_batches"),
    ("[daemon]\nendpoint = 'tcp://0.0.0.0:5599'\n", "allow_remote_tcp"),
    ("[daemon\n", "invalid TOML"),
])
def test_check_config_refuses_an_invalid_file(tmp_path, no_daemon_env, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = cli("check-config", str(path), env=no_daemon_env, cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("clh-writerd: invalid configuration:")
    assert expected in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_of_a_missing_file(tmp_path, no_daemon_env):
    result = cli("check-config", str(tmp_path / "missing.toml"), env=no_daemon_env)
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "missing.toml" in result.stderr
    assert "Traceback" not in result.stderr


# -- no daemon --------------------------------------------------------------------
@pytest.mark.parametrize("command", ["stats", "ping"])
def test_without_a_daemon_fails_clearly_within_the_timeout(no_daemon_env, command):
    endpoint = no_daemon_env["CLH_WRITERD_ENDPOINT"]
    started = time.monotonic()
    result = cli(command, "--timeout", "0.5", env=no_daemon_env, timeout=20)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == f"clh-writerd: no clh-writerd answered at {endpoint} within 0.5s"
    # 0.5 s of waiting plus an interpreter start: it never hangs.
    assert elapsed < 8, elapsed


def test_stats_with_an_invalid_config_exits_2(tmp_path, no_daemon_env):
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\nbogus = 1\n")
    result = cli("stats", "--config", str(path), env=no_daemon_env)
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and "bogus" in result.stderr


# -- against running daemons --------------------------------------------------------
def _feed(daemon, raw_client, program: str, batches: int = 3, per_batch: int = 10) -> str:
    client = raw_client(daemon.endpoint, program)
    path = os.path.join(daemon.log_dir, "app.log")
    for b in range(batches):
        reply = client.write(path, [f"line {b}-{i}" for i in range(per_batch)])
        assert isinstance(reply, protocol.Ack), reply
    reply = request(daemon.endpoint, protocol.encode_report(client.client, {"dropped": 4, "fallback": 5}))
    assert isinstance(reply, protocol.Ok), reply
    return os.path.realpath(path)


def test_stats_table_shows_files_and_clients(start_daemon, raw_client, no_daemon_env):
    daemon = start_daemon()
    path = _feed(daemon, raw_client, "cli-table-prog")
    result = cli("stats", "--endpoint", daemon.endpoint, env=no_daemon_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"clh-writerd {__version__}  pid {daemon.proc.pid}")
    assert daemon.endpoint in lines[0]
    header = lines[lines.index("FILES") + 1].split()
    row = next(line for line in lines if line.startswith(path)).split()
    assert dict(zip(header, row))["written"] == "30"
    assert dict(zip(header, row))["recv"] == "30"
    client = next(line for line in lines if "cli-table-prog" in line).split()
    # host program pid file state last seen (two words) recv sent acked fallback dropped resent errors;
    # the raw client names no file, reports no state (it sends batches: "daemon"), and only dropped and fallback.
    assert client[1:3] == ["cli-table-prog", str(os.getpid())]
    assert client[3:5] == ["-", "daemon"]
    assert client[7:] == ["30", "-", "-", "5", "4", "-", "0"]


def test_stats_json_has_the_documented_schema(start_daemon, raw_client, no_daemon_env):
    daemon = start_daemon()
    path = _feed(daemon, raw_client, "cli-json-prog")
    result = cli("stats", "--json", "--endpoint", daemon.endpoint, env=no_daemon_env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"schema", "daemon", "files", "clients", "clients_gone"}
    assert doc["schema"] == 1
    d = doc["daemon"]
    assert {"version", "endpoint", "uptime_s", "counters", "pid", "host", "started"} <= set(d)
    assert d["version"] == __version__ and d["endpoint"] == daemon.endpoint and d["pid"] == daemon.proc.pid
    assert isinstance(d["uptime_s"], (int, float)) and d["uptime_s"] >= 0
    assert d["counters"]["frames_received"] >= 4  # 3 batches and a report
    assert d["counters"]["malformed"] == 0
    [f] = doc["files"]
    assert f["path"] == path
    assert f["records_written"] == 30 and f["batches_written"] == 3 and f["queue_depth"] == 0
    assert f["bytes_written"] == os.path.getsize(path)
    [c] = [c for c in doc["clients"] if c["program"] == "cli-json-prog"]
    assert c["records_received"] == 30 and c["batches_received"] == 3
    assert c["reported"] == {"dropped": 4, "fallback": 5}


def test_endpoint_picks_the_daemon(start_daemon, raw_client, tmp_path, no_daemon_env):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_daemon(workdir=str(tmp_path / "a"))
    b = start_daemon(workdir=str(tmp_path / "b"))
    path = _feed(a, raw_client, "only-on-a", batches=1)

    def files_of(*args: str, env: Dict[str, str] = no_daemon_env) -> List[str]:
        result = cli("stats", "--json", *args, env=env)
        assert result.returncode == 0, result.stderr
        return [f["path"] for f in json.loads(result.stdout)["files"]]

    assert files_of("--endpoint", a.endpoint) == [path]
    assert files_of("--endpoint", b.endpoint) == []
    # --config takes the endpoint from the daemon's config file.
    assert files_of("--config", a.config_path) == [path]
    # Without options, $CLH_WRITERD_ENDPOINT picks the daemon.
    assert files_of(env=dict(no_daemon_env, CLH_WRITERD_ENDPOINT=a.endpoint)) == [path]
    # --endpoint wins over --config.
    assert files_of("--endpoint", b.endpoint, "--config", a.config_path) == []


def test_ping(start_daemon, no_daemon_env):
    daemon = start_daemon()
    result = cli("ping", "--endpoint", daemon.endpoint, env=no_daemon_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"clh-writerd {__version__} pid {daemon.proc.pid} is serving"
    assert daemon.stop() == 0
    result = cli("ping", "--endpoint", daemon.endpoint, "--timeout", "0.3", env=no_daemon_env)
    assert result.returncode == 1
    assert "no clh-writerd answered" in result.stderr


# -- running the daemon -----------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    [SCRIPT, "run", "--config", "{config}"],
    [SCRIPT, "--config", "{config}"],
    [SCRIPT, "--config", "{config}", "run"],
    MODULE + ["run", "--config", "{config}"],
], ids=["script-run", "script-bare", "script-group-option", "module-run"])
def test_the_command_runs_the_daemon(tmp_path, no_daemon_env, argv):
    sock_dir = short_socket_dir()
    endpoint = f"ipc://{sock_dir}/w.sock"
    log_dir = tmp_path / "logs"
    config = write_config(str(tmp_path / "d.toml"), {"daemon": {"endpoint": endpoint, "allowed_dirs": [str(log_dir)]}})
    proc = subprocess.Popen([a.format(config=config) for a in argv], env=no_daemon_env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def serving():
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                return request(endpoint, protocol.encode_ping(), 0.3)
            except DaemonUnavailable:
                return None

        reply = wait_for(serving, 20, "the daemon to answer")
        assert reply.data["pid"] == proc.pid
        assert log_dir.is_dir()  # allowed dir created at start
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not os.path.exists(f"{sock_dir}/w.sock")
        assert "serving " + endpoint in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_run_with_an_invalid_config_exits_2(tmp_path, no_daemon_env):
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\ndrain_timeout = -1\n")
    result = cli("run", "--config", str(path), env=no_daemon_env, cwd=str(tmp_path), command=[SCRIPT])
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and "drain_timeout" in result.stderr
    assert not (tmp_path / "logs").exists()


# -- what ships with the package: example-config, docs ---------------------------
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_example_config_prints_the_reference_config_that_check_config_accepts(tmp_path, no_daemon_env):
    result = cli("example-config", env=no_daemon_env)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(REPO_ROOT, "daemon", "clh-writerd.toml"), encoding="utf-8") as f:
        assert result.stdout == f.read()
    # What a pip user does with it: save, edit, check.
    path = tmp_path / "clh-writerd.toml"
    path.write_text(result.stdout.replace('drain_timeout = 10.0', 'drain_timeout = 4.5'))
    checked = cli("check-config", str(path), env=no_daemon_env, cwd=str(tmp_path))
    assert checked.returncode == 0, checked.stderr
    assert "drain_timeout = 4.5" in checked.stdout


def test_help_points_to_what_is_installed_not_to_the_checkout():
    result = cli("--help")
    assert "clh-writerd example-config" in result.stdout and "clh-writerd docs" in result.stdout, result.stdout
    assert "daemon/clh-writerd.toml" not in result.stdout
    for name in ("example-config", "docs"):
        assert name in result.stdout


def test_docs_lists_prints_and_locates_the_guides(no_daemon_env):
    pages = sorted(name[:-3] for name in os.listdir(os.path.join(REPO_ROOT, "docs")) if name.endswith(".md"))
    listing = cli("docs", env=no_daemon_env)
    assert listing.returncode == 0, listing.stderr
    listed = [line.split()[0] for line in listing.stdout.splitlines()[1:-1]]
    assert listed == pages
    assert "Running clh-writerd" in listing.stdout  # titles come from each page's first heading

    operations = cli("docs", "operations", env=no_daemon_env)
    with open(os.path.join(REPO_ROOT, "docs", "operations.md"), encoding="utf-8") as f:
        assert operations.returncode == 0 and operations.stdout == f.read()
    assert cli("docs", "operations.md", env=no_daemon_env).stdout == operations.stdout

    where = cli("docs", "--path", env=no_daemon_env).stdout.strip()
    assert sorted(n[:-3] for n in os.listdir(where) if n.endswith(".md")) == pages

    unknown = cli("docs", "nosuchpage", env=no_daemon_env)
    assert unknown.returncode == 2 and "no guide 'nosuchpage'" in unknown.stderr and "operations" in unknown.stderr
