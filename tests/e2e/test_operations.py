"""What an operator relies on: the systemd unit and its notify protocol, the
Docker sidecar, the Prometheus metrics, `stats --watch`, and the daemon's
start/stop/reload behaviour as seen in its log and exit codes.

Everything runs the real `clh-writerd`. The Docker image's install and start
steps are also replayed here in a fresh venv, which needs no container engine;
tests/e2e/test_container.py builds the image and runs it with podman.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from support import (
    check_sequences,
    free_tcp_port,
    hold_clh_lock,
    read_lines,
    seq_record,
    short_socket_dir,
    wait_for,
    write_config,
)

from clh_writerd import __version__, protocol
from clh_writerd.client.control import DaemonUnavailable, request

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "clh-writerd.service"
UNIT_CONFIG = REPO / "systemd" / "clh-writerd.toml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKER_CONFIG = REPO / "docker" / "clh-writerd.toml"

EXIT_DRAIN_TIMEOUT = 1
EXIT_STARTUP = 3


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clh_writerd", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _ping(endpoint: str, timeout: float = 2.0) -> bool:
    return isinstance(request(endpoint, protocol.encode_ping(), timeout), protocol.Ok)


def _answers(endpoint: str) -> bool:
    """A ping that counts "not up yet" (no answer within 0.5 s) as False, for wait_for."""
    try:
        return _ping(endpoint, 0.5)
    except DaemonUnavailable:
        return False


# -- systemd ------------------------------------------------------------------
def _unit_settings(text: str) -> Dict[str, List[str]]:
    """[Service] key -> values, in order (systemd allows a key more than once)."""
    settings: Dict[str, List[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _seconds(value: str) -> float:
    """A systemd time span ("30", "30s", "1min 30s", "500ms") in seconds."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def _installed_executable() -> str:
    found = shutil.which("clh-writerd") or str(Path(sys.executable).parent / "clh-writerd")
    assert os.access(found, os.X_OK), f"no clh-writerd executable at {found}"
    return found


def _verify_unit(tmp_path: Path, text: str) -> Tuple[int, List[str]]:
    """systemd-analyze verify on a copy of the unit; its exit code and the lines about it."""
    unit = tmp_path / "clh-writerd.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={_installed_executable()}", text, flags=re.MULTILINE))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    about_unit = [line for line in (result.stdout + result.stderr).splitlines() if "clh-writerd" in line]
    return result.returncode, about_unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    code, complaints = _verify_unit(tmp_path, UNIT.read_text())
    assert code == 0 and not complaints, "\n".join(complaints)
    # Negative control: a misspelt key is reported, so silence above means something.
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomme=yes")
    _, complaints = _verify_unit(tmp_path, broken)
    assert any("ProtectHomme" in line for line in complaints), complaints


def test_unit_is_a_hardened_notify_service_matching_its_config():
    unit = _unit_settings(UNIT.read_text())
    config = tomllib.loads(UNIT_CONFIG.read_text())["daemon"]

    def one(key: str) -> str:
        assert key in unit, f"{key}= missing from {UNIT.name}"
        return unit[key][-1]

    assert one("Type") == "notify"
    assert re.fullmatch(r"\S*kill -(HUP|SIGHUP|s HUP) \$MAINPID", one("ExecReload")), one("ExecReload")
    assert _seconds(one("TimeoutStopSec")) > config["drain_timeout"], "systemd would SIGKILL a daemon still draining"
    assert one("ExecStart").split()[1:] == ["--config", "/etc/clh-writerd/clh-writerd.toml"]

    # A dedicated user; its group owns the socket directory, which is the RuntimeDirectory.
    assert one("User") not in ("", "root") and one("Group") == config["socket_group"]
    endpoint_dir = os.path.dirname(config["endpoint"][len("ipc://"):])
    assert endpoint_dir == "/run/" + one("RuntimeDirectory")
    assert int(one("RuntimeDirectoryMode"), 8) == config["socket_dir_mode"] == 0o750

    # Write access only where the logs go.
    writable = " ".join(unit.get("ReadWritePaths", [])).split()
    assert sorted(writable) == sorted(config["allowed_dirs"])

    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "RestrictSUIDSGID": "yes"}.items():
        assert one(key) == value, f"{key}={unit.get(key)}"
    assert one("CapabilityBoundingSet") == ""
    # Config errors (2) and start-up failures (3) do not improve with a restart.
    assert {"2", "3"} <= set(one("RestartPreventExitStatus").split())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_member_of_the_socket_group_can_connect_under_the_units_umask(start_daemon, monkeypatch):
    umask = int(_unit_settings(UNIT.read_text())["UMask"][-1], 8)
    gid = 47011  # a group neither we nor nobody (65534) belong to
    # The readiness ping is a client too: it trusts a group-writable socket
    # directory only when told that group is the socket group, as apps are.
    monkeypatch.setenv("CLH_WRITERD_SOCKET_GROUP", str(gid))
    daemon = start_daemon(daemon={"socket_dir_mode": 0o750, "socket_group": str(gid)},
                          preexec_fn=lambda: os.umask(umask))
    path = daemon.endpoint[len("ipc://"):]

    def connects_as(groups: List[int]) -> bool:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child only tries to connect
            code = 1
            try:
                os.setgroups(groups)
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(path)
                code = 0
            finally:
                os._exit(code)
        return os.waitpid(pid, 0)[1] == 0

    assert not connects_as([]), "a user outside the socket group must not connect"
    assert connects_as([gid]), f"socket mode {oct(os.stat(path).st_mode & 0o777)} under UMask={umask:04o}"


class NotifyListener:
    """The systemd side of the notify protocol: a datagram socket the daemon writes to."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"clh-writerd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.dir = short_socket_dir()
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.messages: List[Dict[str, str]] = []

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def count(self, key: str) -> int:
        self._drain()
        return sum(1 for m in self.messages if key in m)

    def wait_for(self, key: str, n: int = 1) -> Dict[str, str]:
        wait_for(lambda: self.count(key) >= n, 15, f"{n} notify message(s) with {key}")
        return [m for m in self.messages if key in m][n - 1]

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_protocol_ready_watchdog_stopping(start_daemon, abstract):
    listener = NotifyListener(abstract)
    try:
        daemon = start_daemon(wait=False, env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"})
        ready = listener.wait_for("READY")
        # READY=1 means bound and serving: one ping, no retry, must succeed.
        assert _ping(daemon.endpoint)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(daemon.proc.pid), ready
        assert daemon.endpoint in ready.get("STATUS", ""), ready
        assert listener.messages.index(ready) == 0, "nothing may claim readiness before READY=1"
        listener.wait_for("WATCHDOG", 2)
        assert listener.count("STOPPING") == 0
        assert daemon.stop(signal.SIGTERM) == 0, daemon.stderr()
        stopping = listener.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert listener.messages.index(stopping) > listener.messages.index(ready)
    finally:
        listener.close()


def test_no_watchdog_pings_for_another_process(start_daemon):
    # systemd sets WATCHDOG_PID when the watchdog is meant for a specific process.
    listener = NotifyListener(abstract=False)
    try:
        daemon = start_daemon(wait=False, env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000",
                                               "WATCHDOG_PID": str(os.getpid())})
        listener.wait_for("READY")
        # An enabled watchdog pings on the main loop's first turn and again while
        # draining, so a wrongly enabled one shows up by the time STOPPING=1 does.
        assert _ping(daemon.endpoint) and isinstance(daemon.stats(), dict) and _ping(daemon.endpoint)
        assert daemon.stop() == 0
        listener.wait_for("STOPPING")
        assert listener.count("WATCHDOG") == 0, listener.messages
    finally:
        listener.close()


# -- Docker -------------------------------------------------------------------
def _hadolint() -> Optional[str]:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install '.[test]')")
def test_dockerfile_passes_hadolint(tmp_path):
    result = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # Negative control: without its one justified ignore, hadolint flags the unpinned install.
    unpinned = tmp_path / "Dockerfile"
    unpinned.write_text(DOCKERFILE.read_text().replace("# hadolint ignore=DL3013\n", ""))
    result = subprocess.run([_hadolint(), str(unpinned)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and "DL3013" in result.stdout, result.stdout


def _dockerfile() -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: List[Tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def _one(instructions: List[Tuple[str, str]], word: str) -> str:
    found = [args for w, args in instructions if w == word]
    assert len(found) == 1, f"expected one {word} in the Dockerfile, got {found}"
    return found[0]


def _load_compose() -> Dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE.read_text())


def _mounts(service: Dict[str, Any]) -> Dict[str, str]:
    """volume name or host path -> mount point, from short-syntax volumes."""
    return {v.split(":")[0]: v.split(":")[1] for v in service.get("volumes", [])}


def test_compose_runs_writerd_as_a_sidecar_sharing_socket_and_logs():
    compose = _load_compose()
    config = tomllib.loads(DOCKER_CONFIG.read_text())["daemon"]
    endpoint_dir = os.path.dirname(config["endpoint"][len("ipc://"):])
    (log_dir,) = config["allowed_dirs"]
    services = compose["services"]

    writerd = services["writerd"]
    assert (COMPOSE.parent / writerd["build"]["context"]).resolve() == REPO
    assert (REPO / writerd["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert _mounts(writerd) == {"logs": log_dir, "sock": endpoint_dir}
    assert set(compose["volumes"]) == {"logs", "sock"}
    # The image declares the same two directories as volumes.
    assert json.loads(_one(_dockerfile(), "VOLUME")) == [log_dir, endpoint_dir]
    # Compose must give the daemon longer than its drain before SIGKILL.
    assert _seconds(writerd["stop_grace_period"]) > config["drain_timeout"]

    apps = [name for name in services if name != "writerd"]
    assert len(apps) == 2, apps
    for name in apps:
        app = services[name]
        mounts = _mounts(app)
        assert mounts["logs"] == log_dir and mounts["sock"] == endpoint_dir, (name, mounts)
        assert app["depends_on"]["writerd"]["condition"] == "service_healthy", name
        assert app["environment"]["CLH_WRITERD_ENDPOINT"] == config["endpoint"], name
        assert app["environment"]["APP_NAME"] == name
        # The app's code is mounted from the repository; it runs as its own uid in the daemon's
        # group (admitted by allowed_groups) and trusts the socket directory of the daemon's user.
        host_paths = [src for src in mounts if src.startswith(".")]
        assert all((COMPOSE.parent / src).exists() for src in host_paths), host_paths
        assert app["user"] == "10002:10001"
        assert app["environment"]["CLH_WRITERD_DAEMON_USER"] == "10001"
        assert config["socket_dir_mode"] == 0o750 and config["allowed_groups"] == [10001]


@pytest.mark.slow
def test_dockerfile_install_and_start_steps_work_in_a_fresh_venv(tmp_path):
    """Replay the image: COPY, RUN pip install, the baked config, ENTRYPOINT+CMD,
    HEALTHCHECK, then an app container's entrypoint logging through it."""
    instructions = _dockerfile()
    workdir = tmp_path / "workdir"  # the image's WORKDIR
    workdir.mkdir()
    assert _one(instructions, "WORKDIR") == "/opt/clh-writerd"

    # Mount points of the image's volumes -> tmp dirs (the socket dir short: 107-byte limit).
    sock_dir, log_dir = short_socket_dir(), str(tmp_path / "logs")
    os.makedirs(log_dir)
    port = free_tcp_port()
    config_text = DOCKER_CONFIG.read_text()
    image_config = tomllib.loads(config_text)["daemon"]
    assert image_config["metrics_listen"].endswith(":" + _one(instructions, "EXPOSE"))
    rewrites = {"/run/clh-writerd": sock_dir, "/var/log/app": log_dir,
                image_config["metrics_listen"]: f"127.0.0.1:{port}"}

    def rewrite(text: str) -> str:
        for old, new in rewrites.items():
            text = text.replace(old, new)
        return text

    # COPY: only what the Dockerfile copies is in the build.
    config_in_image = None
    for args in (a for w, a in instructions if w == "COPY"):
        *sources, dest = args.split()
        if dest.startswith("/"):
            (source,) = sources
            assert source == "docker/clh-writerd.toml", args
            config_in_image = dest
            continue
        target = workdir / dest
        for source in sources:
            src = REPO / source
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)
    assert config_in_image is not None, "the Dockerfile does not COPY the config"
    config_path = tmp_path / config_in_image.lstrip("/")
    config_path.parent.mkdir(parents=True)
    config_path.write_text(rewrite(config_text))
    rewrites[config_in_image] = str(config_path)

    # The image's venv: ENV puts it first on PATH, a RUN creates it before the install.
    image_env = dict(shlex.split(a)[0].split("=", 1) for w, a in instructions if w == "ENV")
    image_venv = image_env["VIRTUAL_ENV"]
    assert image_env["PATH"] == f"{image_venv}/bin:$PATH", image_env
    (make_venv,) = [a for w, a in instructions if w == "RUN" and "-m venv" in a]
    assert shlex.split(make_venv) == ["python3", "-m", "venv", "$VIRTUAL_ENV"], make_venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CLH_WRITERD_ENDPOINT")}
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")

    (install,) = [a for w, a in instructions if w == "RUN" and "pip install" in a]
    argv = shlex.split(install)
    assert argv[0] == "pip", argv
    result = subprocess.run([str(venv / "bin" / "python"), "-m", *argv], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    located = subprocess.run([str(venv / "bin" / "python"), "-c", "import clh_writerd; print(clh_writerd.__file__)"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert located.stdout.startswith(str(venv)), f"not the venv's install: {located.stdout}"

    command = json.loads(_one(instructions, "ENTRYPOINT")) + json.loads(_one(instructions, "CMD"))
    healthcheck = _one(instructions, "HEALTHCHECK")
    healthcheck = json.loads(healthcheck[healthcheck.index("CMD ") + 4:])
    assert shutil.which(command[0], path=env["PATH"]) == str(venv / "bin" / command[0])
    endpoint = rewrite(image_config["endpoint"])

    def run_healthcheck() -> subprocess.CompletedProcess:
        return subprocess.run([rewrite(arg) for arg in healthcheck], env=env, capture_output=True, text=True,
                              timeout=30)

    stderr = open(tmp_path / "daemon.stderr", "w+")
    daemon = subprocess.Popen([rewrite(arg) for arg in command], cwd=tmp_path, env=env, stdout=stderr, stderr=stderr)
    try:
        wait_for(lambda: daemon.poll() is not None or _answers(endpoint), what="the replayed image to serve")
        assert daemon.poll() is None, open(stderr.name).read()
        health = run_healthcheck()
        assert health.returncode == 0, health.stdout + health.stderr

        # An app container: compose's entrypoint, with its environment.
        app_service = _load_compose()["services"]["app1"]
        app_mounts = {mount: (COMPOSE.parent / src).resolve() for src, mount in
                      (v.split(":")[:2] for v in app_service["volumes"]) if src.startswith(".")}
        app_argv = [str(app_mounts.get(arg, arg)) for arg in app_service["entrypoint"]]
        app_env = {**env, **app_service["environment"], "APP_RECORDS": "200", "APP_LOG_DIR": log_dir}
        app_env["CLH_WRITERD_ENDPOINT"] = rewrite(app_env["CLH_WRITERD_ENDPOINT"])
        assert app_env["CLH_WRITERD_ENDPOINT"] == endpoint
        app = subprocess.run(app_argv, env=app_env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert app.returncode == 0, app.stdout + app.stderr

        log_path = os.path.join(log_dir, "app.log")
        numbers = sorted(int(m.group(1)) for m in
                         (re.search(r" app1 request (\d+) handled$", line) for line in read_lines(log_path)) if m)
        assert numbers == list(range(200)), f"{len(numbers)} of 200 lines"
        # Written by the daemon, not by the handler's fallback.
        stats = json.loads(subprocess.run(["clh-writerd", "stats", "--json", "--endpoint", endpoint], env=env,
                                          capture_output=True, text=True, check=True, timeout=30).stdout)
        assert [f["records_written"] for f in stats["files"] if f["path"] == log_path] == [200], stats["files"]
        # The [metrics] extra is installed and serving.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert f'clh_writerd_file_records_written_total{{path="{log_path}"}} 200.0' in response.read().decode()

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, open(stderr.name).read()
        assert run_healthcheck().returncode != 0, "the health check must fail once the daemon is gone"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        stderr.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


# -- metrics --------------------------------------------------------------------
def _scrape(port: int) -> Dict[str, Dict[Tuple[Tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}, parsed by prometheus-client's own parser."""
    parser = pytest.importorskip("prometheus_client.parser")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Dict[str, Dict[Tuple[Tuple[str, str], ...], float]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            series = samples.setdefault(sample.name, {})
            assert labels not in series, f"duplicate series {sample.name}{dict(labels)}"
            series[labels] = sample.value
    return samples


def test_metrics_show_the_same_figures_as_stats(start_daemon, raw_client):
    pytest.importorskip("prometheus_client")
    port = free_tcp_port()
    daemon = start_daemon(daemon={"metrics_listen": f"127.0.0.1:{port}"})
    # Two clients of one process, as two handlers of one app are.
    first, second = raw_client(daemon.endpoint, "app"), raw_client(daemon.endpoint, "app")
    rotating = os.path.join(daemon.log_dir, "rotating.log")
    plain = os.path.join(daemon.log_dir, "plain.log")
    options = {"maxBytes": 500, "backupCount": 50}
    for k in range(6):
        assert isinstance(first.write(rotating, [seq_record("r", 10 * k + i) for i in range(10)], options),
                          protocol.Ack)
    assert isinstance(first.write(plain, [seq_record("p1", i) for i in range(5)]), protocol.Ack)
    for k in range(2):
        assert isinstance(second.write(plain, [seq_record("p2", 7 * k + i) for i in range(7)]), protocol.Ack)
    first.send_raw(protocol.encode_report(first.client, {"dropped": 3, "fallback": 2}, id=1))
    assert isinstance(first.recv(), protocol.Ok)

    stats = json.loads(_cli("stats", "--json", "--endpoint", daemon.endpoint).stdout)
    metrics = _scrape(port)

    files = {f["path"]: f for f in stats["files"]}
    assert {p: f["records_written"] for p, f in files.items()} == {rotating: 60, plain: 19}
    assert files[rotating]["rotations"] > 0
    for name in ("records_written", "bytes_written", "rotations", "records_received", "write_errors"):
        exposed = {dict(labels)["path"]: value for labels, value in
                   metrics[f"clh_writerd_file_{name}_total"].items()}
        assert exposed == {p: f[name] for p, f in files.items()}, name
    depth = {dict(labels)["path"]: value for labels, value in metrics["clh_writerd_file_queue_depth"].items()}
    assert depth == {p: f["queue_depth"] for p, f in files.items()}

    clients = {c["session"]: c for c in stats["clients"]}
    assert {s: c["records_received"] for s, c in clients.items()} == {first.client.session: 65,
                                                                      second.client.session: 14}
    assert clients[first.client.session]["reported"] == {"dropped": 3, "fallback": 2}
    # Client series are per (program, file): the two clients of "app" are one
    # group (raw clients name no file), and no pid or session label exists.
    group = (("file", ""), ("program", "app"))
    assert metrics["clh_writerd_client_records_total"] == {group: 65 + 14}
    reported = {dict(labels)["counter"]: value for labels, value in metrics["clh_writerd_client_reported_total"].items()
                if (dict(labels)["program"], dict(labels)["file"]) == ("app", "")}
    assert reported["dropped"] == 3 and reported["fallback"] == 2 and reported["resent"] == 0
    assert {len(labels) for labels in metrics["clh_writerd_client_reported_total"]} == {3}
    states = {dict(labels)["state"]: value for labels, value in metrics["clh_writerd_clients"].items()}
    assert states == {"connecting": 0, "daemon": 2, "fallback": 0, "embedded": 0, "stopped": 0}
    assert metrics["clh_writerd_clients_gone"] == {group: 0}
    assert "clh_writerd_process_records_total" not in metrics  # metrics_per_client is off by default

    (info,) = metrics["clh_writerd_build_info"]
    assert dict(info)["version"] == __version__ and dict(info)["endpoint"] == daemon.endpoint
    assert metrics["clh_writerd_events_total"][(("event", "frames_received"),)] >= 10
    # docs/operations.md's table names every exposed metric with its exposed type
    # (and the metrics_per_client ones, checked below).
    documented, exposed = _documented_metric_types(), _exposed_metric_types(port)
    assert {name: documented.get(name) for name in exposed} == exposed
    assert set(documented) - set(exposed) == set(PER_CLIENT_METRICS)


PER_CLIENT_METRICS = ("clh_writerd_process_records_total", "clh_writerd_process_reported_total",
                      "clh_writerd_process_last_seen_timestamp_seconds")


def test_metrics_per_client_is_an_opt_in_with_pid_and_session(start_daemon, raw_client):
    pytest.importorskip("prometheus_client")
    port = free_tcp_port()
    daemon = start_daemon(daemon={"metrics_listen": f"127.0.0.1:{port}", "metrics_per_client": True})
    first, second = raw_client(daemon.endpoint, "app"), raw_client(daemon.endpoint, "app")
    plain = os.path.join(daemon.log_dir, "plain.log")
    assert isinstance(first.write(plain, [seq_record("a", i) for i in range(5)]), protocol.Ack)
    assert isinstance(second.write(plain, [seq_record("b", i) for i in range(7)]), protocol.Ack)
    second.send_raw(protocol.encode_report(second.client, {"dropped": 4}, id=1))
    assert isinstance(second.recv(), protocol.Ok)
    metrics = _scrape(port)
    records = {(dict(labels)["pid"], dict(labels)["session"]): value
               for labels, value in metrics["clh_writerd_process_records_total"].items()}
    assert records == {(str(os.getpid()), first.client.session): 5, (str(os.getpid()), second.client.session): 7}
    dropped = {dict(labels)["session"]: value for labels, value in metrics["clh_writerd_process_reported_total"].items()
               if dict(labels)["counter"] == "dropped"}
    assert dropped == {first.client.session: 0, second.client.session: 4}
    # The per-(program, file) series are there too, and agree.
    assert metrics["clh_writerd_client_records_total"] == {(("file", ""), ("program", "app")): 12}
    assert _documented_metric_types() == _exposed_metric_types(port)


OPERATIONS_MD = REPO / "docs" / "operations.md"


def _documented_metric_types() -> Dict[str, str]:
    rows = re.findall(r"^\| `(clh_writerd_\w+)` \| (\w+) \|", OPERATIONS_MD.read_text(), re.MULTILINE)
    return dict(rows)


def _exposed_metric_types(port: int) -> Dict[str, str]:
    parser = pytest.importorskip("prometheus_client.parser")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    # The parser strips a counter's _total suffix from the family name; the docs name the sample.
    return {family.name + ("_total" if family.type == "counter" else ""): family.type
            for family in parser.text_string_to_metric_families(text)}


def test_metrics_port_in_use_is_a_start_up_failure(start_daemon):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        daemon = start_daemon(wait=False, daemon={"metrics_listen": listen})
        assert daemon.proc.wait(30) == EXIT_STARTUP, daemon.stderr()
    assert f"cannot start: cannot serve metrics on {listen}" in daemon.stderr(), daemon.stderr()
    assert "Address already in use" in daemon.stderr()
    # It let go of the endpoint: no socket left behind to confuse the next start.
    assert not os.path.exists(daemon.endpoint[len("ipc://"):])


# -- stats --watch ----------------------------------------------------------------
def test_stats_watch_prints_refreshing_frames(start_daemon, raw_client):
    daemon = start_daemon()
    path = os.path.join(daemon.log_dir, "watched.log")
    assert isinstance(raw_client(daemon.endpoint).write(path, [seq_record("w", i) for i in range(25)]),
                      protocol.Ack)
    result = _cli("stats", "--endpoint", daemon.endpoint, "--watch", "--count", "2", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    # A frame starts with the clear-screen sequence on a terminal (click drops
    # it into a pipe) and always with the daemon's header line.
    frames = re.split(r"^(?:\x1b\[2J\x1b\[H)?(?=clh-writerd )", result.stdout, flags=re.MULTILINE)
    assert frames[0] == "" and len(frames) == 3, result.stdout
    for frame in frames[1:]:
        assert daemon.endpoint in frame
        header = next(line for line in frame.splitlines() if line.startswith("path"))
        assert header.split() == ["path", "rec/s", "bytes/s", "queue", "written", "size", "rot", "errors", "p99ms"]
        (row,) = [line.split() for line in frame.splitlines() if line.startswith(path)]
        assert row[4] == "25", row  # written
    # Nothing was written between the two frames: the rate is 0.
    (row,) = [line.split() for line in frames[2].splitlines() if line.startswith(path)]
    assert row[1] == "0", row


def test_stats_watch_without_a_daemon_exits_1(tmp_path):
    endpoint = f"ipc://{short_socket_dir()}/nobody.sock"
    result = _cli("stats", "--endpoint", endpoint, "--watch", "--count", "2", "--timeout", "0.3")
    assert result.returncode == 1
    assert result.stderr.strip() == f"clh-writerd: no clh-writerd answered at {endpoint} within 0.3s"
    assert result.stdout == ""


# -- start, stop, reload as the operator sees them ---------------------------------
def test_start_and_stop_are_logged(start_daemon, raw_client):
    daemon = start_daemon()
    started = daemon.stderr()
    assert re.search(rf"clh-writerd {re.escape(__version__)} serving {re.escape(daemon.endpoint)} "
                     rf"\(pid {daemon.proc.pid}, config {re.escape(daemon.config_path)}\); "
                     rf"allowed dirs: {re.escape(os.path.realpath(daemon.log_dir))}$", started, re.MULTILINE), started
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "app.log")
    for k in range(3):
        assert isinstance(client.write(path, [seq_record(f"b{k}", i) for i in range(50)]), protocol.Ack)
    assert daemon.stop() == 0
    stopped = daemon.stderr()[len(started):]
    (stopping,) = [line for line in stopped.splitlines() if "stopping:" in line]
    assert all(word in stopping for word in ("draining", "queued", "(timeout 10.0s)")), stopping
    # The lines docs/operations.md shows under "At stop:", numbers aside, are the ones printed.
    documented = OPERATIONS_MD.read_text().split("At stop:", 1)[1].split("```")[1].strip().splitlines()
    assert len(documented) == 2, documented
    for line in documented:
        pattern = r"\d+(?:\.\d+)?".join(re.escape(part) for part in re.split(r"\d+(?:\.\d+)?", line))
        assert re.search(pattern + "$", stopped, re.MULTILINE), f"{line!r} not in:\n{stopped}"
    match = re.search(r"stopped after (\d+\.\d\d)s: (\d+) record\(s\) written in this run", stopped)
    assert match and int(match.group(2)) == 150, stopped
    assert float(match.group(1)) < 10.0


def test_drain_timeout_exits_1_and_says_so(start_daemon, raw_client):
    daemon = start_daemon(daemon={"drain_timeout": 0.5})
    client = raw_client(daemon.endpoint)
    path = os.path.join(daemon.log_dir, "stuck.log")
    assert isinstance(client.write(path, [seq_record("w", 0)]), protocol.Ack)
    # Another writer holds the file's lock for longer than the drain may take.
    with hold_clh_lock(path):
        client.send_batch(path, [seq_record("w", 1)])
        wait_for(lambda: daemon.file_stats(path)["records_received"] == 2, what="the batch to be queued")
        assert daemon.stop(timeout=20) == EXIT_DRAIN_TIMEOUT, daemon.stderr()
    assert "drain timed out after 0.5s; 1 file(s) still writing" in daemon.stderr(), daemon.stderr()
    assert client.try_recv(0.5) is None, "an unwritten batch must not be acknowledged"


def test_sighup_applies_limits_and_per_file_fsync_live(start_daemon, raw_client, tmp_path):
    daemon = start_daemon(limits={"queue_batches": 256})
    client = raw_client(daemon.endpoint)
    audit = os.path.join(daemon.log_dir, "audit.log")
    assert isinstance(client.write(audit, [seq_record("a", 0)]), protocol.Ack)
    before = daemon.file_stats(audit)
    assert before["fsyncs"] == 0 and before["queue_capacity"] == 256

    write_config(daemon.config_path,
                 {"daemon": {"endpoint": daemon.endpoint, "allowed_dirs": [daemon.log_dir]},
                  "limits": {"queue_batches": 8}},
                 files=[{"path": os.path.join(os.path.realpath(daemon.log_dir), "audit*.log"), "fsync": "batch"}])
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.stats()["daemon"]["counters"]["reloads"] == 1, what="the reload")
    assert re.search(rf"reloaded {re.escape(daemon.config_path)}; allowed dirs: ", daemon.stderr())
    for k in range(1, 4):
        assert isinstance(client.write(audit, [seq_record("a", k)]), protocol.Ack)
    after = daemon.file_stats(audit)
    assert after["queue_capacity"] == 8
    assert after["fsyncs"] == 3, "fsync = batch must apply to the file already open"
    check_sequences(read_lines(audit), {"a": 4}).assert_complete()


def test_sighup_cannot_move_the_endpoint(start_daemon, raw_client, tmp_path):
    daemon = start_daemon()
    moved = f"ipc://{short_socket_dir()}/moved.sock"
    write_config(daemon.config_path, {"daemon": {"endpoint": moved, "allowed_dirs": [daemon.log_dir]}})
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.stats()["daemon"]["counters"]["reloads"] == 1, what="the reload")
    assert f"reload: endpoint change to {moved} needs a restart; keeping {daemon.endpoint}" in daemon.stderr()
    path = os.path.join(daemon.log_dir, "app.log")
    assert isinstance(raw_client(daemon.endpoint).write(path, [seq_record("w", 0)]), protocol.Ack)
    assert not os.path.exists(moved[len("ipc://"):])
