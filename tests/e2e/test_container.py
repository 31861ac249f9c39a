"""The Docker sidecar built and run for real, with podman.

The image is built from this checkout with docker/Dockerfile; the daemon
container and the app containers get the volumes, user, environment, entry
point and stop grace period that docker/compose.yaml gives them, and the
records the apps log are checked with the sequence oracle.

What this machine needs (checked on the CI machine, see issue 17): Debian's
podman with the runc runtime (crun cannot set rlimits here), explicit
``--ulimit`` values (they cannot be raised here) and ``--network=host``. No
registry is reachable, so the base image is a debootstrapped Debian with
python3 and python3-venv, made once per machine and cached outside the
repository (CLH_WRITERD_TEST_CACHE, default /var/cache/clh-writerd-tests).
pip inside the build reaches the index through the machine's CA bundle,
mounted into the build.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional
from unittest import mock

import pytest
from support.debian import require_debian_packages
from support import check_sequences, family_files, read_lines, wait_for

from clh_writerd import protocol
from clh_writerd.client.control import DaemonUnavailable, request
from tests.e2e.test_operations import COMPOSE, DOCKER_CONFIG, DOCKERFILE, REPO, _load_compose, _seconds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.slow

CACHE = Path(os.environ.get("CLH_WRITERD_TEST_CACHE", "/var/cache/clh-writerd-tests"))
IMAGE = "localhost/clh-writerd:test"
# What every container here needs on this machine (see the module docstring).
ENGINE_FLAGS = ["--runtime", "runc", "--network=host",
                "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
DAEMON_UID = 10001  # the image's user and group
APP_UID = 10002  # compose.yaml's apps: their own uid, the daemon's group
# (uid, gid, mode) a file or lock in the log volume may have: created by either
# side, the shared group, writable by the group (the apps' chmod=0o660).
SHARED_OWNERS = {(uid, DAEMON_UID, 0o660) for uid in (DAEMON_UID, APP_UID)}
SEQ_LOG = "/var/log/app/seq.log"  # inside the log volume
EXIT_OK = 0


# -- podman --------------------------------------------------------------------
def podman(*args: str, timeout: float = 120, check: bool = True, stdin: Any = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, stdin=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def require_podman() -> None:
    """Install podman, runc and debootstrap (root + apt) or skip saying what is missing."""
    require_debian_packages(["podman", "runc", "debootstrap"], ["podman", "runc", "debootstrap"])


def apt_source() -> Dict[str, str]:
    """The host's Debian release and the mirror apt uses for it: what debootstrap needs."""
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().split("\n") if "=" in line)
    codename = release.get("VERSION_CODENAME", "").strip('"')
    targets = subprocess.run(["apt-get", "indextargets", "--format", "$(RELEASE) $(REPO_URI)"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
    mirrors = [line.split()[1] for line in targets if line.split()[:1] == [codename]]
    if not codename or not mirrors:
        pytest.skip(f"no apt source for the host's release {codename!r} to debootstrap a base image from")
    return {"codename": codename, "mirror": mirrors[0]}


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One base build at a time per machine (parallel test runs share the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def debian_base() -> str:
    """A local image with python3 and its venv module, made once per machine.

    The rootfs tarball is cached (it survives ``podman system reset``); the
    image is imported from it when podman's storage does not have it.
    """
    source = apt_source()
    tag = f"localhost/clh-writerd-test-base:{source['codename']}"
    tarball = CACHE / f"{source['codename']}-minbase-python3-venv.tar"
    with cache_lock():
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag
        if not tarball.exists():
            rootfs = tempfile.mkdtemp(prefix="rootfs-", dir=CACHE)
            try:
                result = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                                         source["codename"], rootfs, source["mirror"]],
                                        capture_output=True, text=True, timeout=900)
                assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
                # apt's downloads and lists are a third of the rootfs and no use in an image.
                for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
                    for entry in Path(rootfs, leftovers).glob("*"):
                        if entry.is_file():
                            entry.unlink()
                subprocess.run(["tar", "-C", rootfs, "-cf", f"{tarball}.tmp", "."], check=True, timeout=300)
                os.replace(f"{tarball}.tmp", tarball)
            finally:
                shutil.rmtree(rootfs, ignore_errors=True)
        podman("import", str(tarball), tag, timeout=300)
    return tag


@pytest.fixture(scope="module")
def image() -> str:
    """The project's image, built from this checkout on the cached Debian base."""
    require_podman()
    base = debian_base()
    probe = podman("run", "--rm", *ENGINE_FLAGS, base, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    previous = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    mounts = ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if os.path.exists(CA_BUNDLE) else []
    # --format docker: podman's default OCI format has no HEALTHCHECK.
    podman("build", "--format", "docker", *ENGINE_FLAGS, *mounts, "--build-arg", f"BASE={base}",
           "-f", str(DOCKERFILE), "-t", IMAGE, str(REPO), timeout=600)
    if previous and previous != podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip():
        # The last run's image (and its layers no other image uses): a kept CI machine does not fill up.
        podman("rmi", previous, check=False)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\n[image] {IMAGE} on {base}: {size / 1e6:.0f} MB")
    return IMAGE


# -- compose.yaml, as podman arguments -----------------------------------------
class Project:
    """docker/compose.yaml's services run with podman, under unique names.

    The named volumes become ``<prefix>-<name>`` podman volumes (the first
    container to mount one copies the image's directory into it, owner and
    mode included, as docker does); the relative host paths are resolved
    against the compose file's directory.
    """

    def __init__(self, image: str) -> None:
        self.image = image
        self.compose = _load_compose()
        self.prefix = f"clh-writerd-test-{uuid.uuid4().hex[:8]}"
        self.config = tomllib.loads(DOCKER_CONFIG.read_text())["daemon"]
        self.containers: List[str] = []
        self.volumes = [f"{self.prefix}-{name}" for name in self.compose["volumes"]]
        for volume in self.volumes:
            podman("volume", "create", volume)

    def service(self, name: str) -> Dict[str, Any]:
        return self.compose["services"][name]

    def volume_args(self, service: str) -> List[str]:
        args = []
        for entry in self.service(service)["volumes"]:
            source, rest = entry.split(":", 1)
            if source.startswith("."):
                source = str((COMPOSE.parent / source).resolve())
            else:
                source = f"{self.prefix}-{source}"
            args += ["-v", f"{source}:{rest}"]
        return args

    def host_path(self, container_path: str) -> str:
        """Where a path inside the writerd service's volumes is on the host (we run as root)."""
        for entry in self.service("writerd")["volumes"]:
            source, target = entry.split(":")[:2]
            if container_path == target or container_path.startswith(target + "/"):
                mountpoint = podman("volume", "inspect", "--format", "{{.Mountpoint}}",
                                    f"{self.prefix}-{source}").stdout.strip()
                return mountpoint + container_path[len(target):]
        raise KeyError(container_path)

    def start_writerd(self) -> str:
        name = f"{self.prefix}-writerd"
        podman("run", "-d", "--name", name, *ENGINE_FLAGS, *self.volume_args("writerd"), self.image)
        self.containers.append(name)
        wait_for(lambda: self.healthy(name), what="the writerd container's health check to pass")
        return name

    def healthy(self, name: str) -> bool:
        """`podman healthcheck run`: the image's HEALTHCHECK command, run now."""
        return podman("healthcheck", "run", name, check=False).returncode == 0

    def run_app(self, service: str, name: str, command: Optional[List[str]] = None,
                env: Optional[Dict[str, str]] = None, extra: Optional[List[str]] = None) -> str:
        """An app container as compose runs ``service`` (user, environment, volumes),
        running ``command`` instead of the service's entrypoint when given."""
        spec = self.service(service)
        environment = {**spec["environment"], **(env or {})}
        command = command or spec["entrypoint"]
        container = f"{self.prefix}-{name}"
        podman("run", "-d", "--name", container, *ENGINE_FLAGS, "--user", spec["user"],
               *[f"--env={k}={v}" for k, v in environment.items()], *self.volume_args(service), *(extra or []),
               "--entrypoint", command[0], self.image, *command[1:])
        self.containers.append(container)
        return container

    def daemon_stats(self) -> Optional[Dict[str, Any]]:
        """The daemon's stats over its socket, reached from the host through the volume."""
        endpoint = "ipc://" + self.host_path(self.config["endpoint"][len("ipc://"):])
        # The socket directory belongs to the image's daemon user: trust it, as the apps do.
        daemon_user = self.service("app1")["environment"]["CLH_WRITERD_DAEMON_USER"]
        try:
            with mock.patch.dict(os.environ, {"CLH_WRITERD_DAEMON_USER": daemon_user}):
                reply = request(endpoint, protocol.encode_stats_request(), 2.0)
        except DaemonUnavailable:
            return None
        assert isinstance(reply, protocol.Ok), reply
        return reply.data

    def written(self, path: str) -> int:
        stats = self.daemon_stats() or {"files": []}
        return sum(f["records_written"] for f in stats["files"] if f["path"] == path)

    def state(self, name: str) -> Dict[str, Any]:
        return json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)

    def close(self) -> None:
        """Remove the containers and volumes; the daemon's log goes to the test's output first."""
        for name in self.containers[:1]:
            logs = podman("logs", name, check=False)
            print(f"\n[{name} log]\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
        for name in reversed(self.containers):
            podman("rm", "--force", "--time", "0", name, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "--force", volume, check=False)


@pytest.fixture
def project(image: str) -> Iterator[Project]:
    project = Project(image)
    yield project
    project.close()


class Writers:
    """App containers logging sequence records (tests/e2e/container_app.py) until stopped."""

    def __init__(self, project: Project, names: List[str], limit: int = 10**9) -> None:
        self.project = project
        self.containers = {
            writer: project.run_app("app1", writer, ["python", "/tests/e2e/container_app.py", writer, SEQ_LOG, str(limit)],
                                    {"PYTHONPATH": "/tests"}, ["-v", f"{REPO / 'tests'}:/tests:ro"])
            for writer in names}

    def running(self) -> bool:
        return all(self.project.state(c)["Running"] for c in self.containers.values())

    def finish(self) -> Dict[str, Dict[str, Any]]:
        """SIGTERM each app (it stops logging and closes its handler), then its report."""
        for container in self.containers.values():
            podman("kill", "--signal", "TERM", container, check=False)  # may have finished already
        return self.results()

    def results(self) -> Dict[str, Dict[str, Any]]:
        results = {}
        for writer, container in self.containers.items():
            code = int(podman("wait", container, timeout=120).stdout.strip())
            logs = podman("logs", container)
            assert code == 0, f"{container} exited {code}:\n{logs.stdout}{logs.stderr}"
            results[writer] = json.loads(logs.stdout.strip().split("\n")[-1])
        return results


def check_all(project: Project, results: Dict[str, Dict[str, Any]], allow_duplicates: bool = False):
    lines = read_lines(project.host_path(SEQ_LOG))
    report = check_sequences(lines, {w: r["count"] for w, r in results.items()})
    resent = sum(r["stats"]["resent"] for r in results.values())
    fallback = sum(r["stats"]["fallback_written"] for r in results.values())
    print(f"\n[container] records={report.expected} duplicates={report.duplicates} resent={resent} "
          f"fallback_written={fallback}")
    for writer, result in results.items():
        stats = result["stats"]
        print(f"[{writer}] count={result['count']} acked={stats['acked']} fallback_written={stats['fallback_written']} "
              f"dropped={stats['dropped_count']} last_error={stats.get('last_error')!r}")
    report.assert_complete(allow_duplicates=allow_duplicates)
    assert report.duplicates <= resent, "duplicates not accounted for by `resent`"
    return report


def owners(directory: str) -> Dict[str, tuple]:
    """name -> (uid, gid, mode) of every entry of the log volume, lock files included."""
    return {name: (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            for name, st in ((name, os.lstat(os.path.join(directory, name))) for name in os.listdir(directory))}


# -- the tests -----------------------------------------------------------------
def test_image_runs_this_checkout_from_a_venv_as_the_unprivileged_user(image):
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert config["User"] == f"{DAEMON_UID}:{DAEMON_UID}"
    assert config["StopSignal"] in ("SIGTERM", "15"), config["StopSignal"]
    assert (inspected["Healthcheck"] or {}).get("Test", [])[:3] == ["CMD", "clh-writerd", "ping"], inspected
    assert set(config["Volumes"]) == {"/var/log/app", "/run/clh-writerd"}
    probe = ("import hashlib, os, pathlib, sys, clh_writerd; "
             "root = pathlib.Path(clh_writerd.__file__).parent; "
             "digest = hashlib.sha256(b''.join(p.read_bytes() for p in sorted(root.rglob('*.py')))).hexdigest(); "
             "print(os.getuid(), os.getgid(), sys.prefix, root, digest)")
    out = podman("run", "--rm", *ENGINE_FLAGS, "--entrypoint", "python", image, "-c", probe).stdout.split()
    uid, gid, prefix, package, digest = out
    assert (int(uid), int(gid)) == (DAEMON_UID, DAEMON_UID)
    assert prefix == "/opt/clh-writerd/venv" and package.startswith(prefix + "/lib/"), out
    # The package's code is this checkout's, byte for byte: installed from the build context.
    source = REPO / "src" / "clh_writerd"
    assert digest == hashlib.sha256(b"".join(p.read_bytes() for p in sorted(source.rglob("*.py")))).hexdigest()


def test_sidecar_serves_app_containers_and_drains_on_stop(project):
    writerd = project.start_writerd()
    log_dir = project.host_path("/var/log/app")

    # docker/app.py, exactly as compose's app1 runs it.
    app = project.run_app("app1", "app1", env={"APP_RECORDS": "200"})
    assert int(podman("wait", app).stdout) == 0, podman("logs", app).stderr
    assert project.written("/var/log/app/app.log") == 200, project.daemon_stats()
    # The image's EXPOSEd metrics, where compose publishes them (host network here).
    port = compose_port(project)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert 'clh_writerd_file_records_written_total{path="/var/log/app/app.log"} 200.0' in response.read().decode()

    # Two app containers with a bounded number of records: all through the daemon.
    results = Writers(project, ["a", "b"], limit=3000).results()
    check_all(project, results)
    assert project.written(SEQ_LOG) == 6000
    assert all(r["stats"]["fallback_written"] == 0 for r in results.values()), results

    # Stop under load: the image's STOPSIGNAL, compose's grace period.
    before = project.written(SEQ_LOG)
    writers = Writers(project, ["c", "d"])
    wait_for(lambda: project.written(SEQ_LOG) >= before + 2000, what="the daemon to write the new apps' records")
    assert writers.running()
    grace = int(_seconds(project.service("writerd")["stop_grace_period"]))
    podman("stop", "--time", str(grace), writerd, timeout=grace + 30)
    state = project.state(writerd)
    logs = podman("logs", writerd)
    output = logs.stdout + logs.stderr
    assert state["ExitCode"] == EXIT_OK and not state["OOMKilled"], (state, output)
    assert "stopping: draining" in output and "stopped after" in output, output
    assert not project.healthy(writerd), "the health check must fail once the daemon is gone"
    results.update(writers.finish())
    check_all(project, results, allow_duplicates=True)
    assert set(owners(log_dir).values()) <= SHARED_OWNERS, owners(log_dir)


def compose_port(project: Project) -> int:
    """The metrics port compose publishes, checked against the image's config."""
    (published,) = project.service("writerd")["ports"]
    host, host_port, container_port = published.split(":")
    assert host == "127.0.0.1" and host_port == container_port
    assert project.config["metrics_listen"].endswith(":" + container_port)
    return int(container_port)


def test_sidecar_killed_under_load_apps_fall_back_into_the_volume_then_return(project):
    writerd = project.start_writerd()
    log_dir = project.host_path("/var/log/app")
    writers = Writers(project, ["a", "b"])
    wait_for(lambda: project.written(SEQ_LOG) >= 2000, what="the daemon to write the apps' records")

    podman("kill", "--signal", "KILL", writerd)
    assert int(podman("wait", writerd).stdout) == 128 + 9
    # With the daemon gone, only the apps' fallback can make the files grow.
    size = family_size(project)
    wait_for(lambda: family_size(project) > size + 256 * 1024, what="the apps to write through their fallback")
    assert writers.running()
    fallback_owners = owners(log_dir)

    # The same container again: the apps return to it and it writes the files they wrote.
    podman("start", writerd)
    wait_for(lambda: project.healthy(writerd), what="the restarted daemon's health check to pass")
    wait_for(lambda: project.written(SEQ_LOG) >= 2000, what="the apps to return to the restarted daemon")
    results = writers.finish()
    podman("stop", "--time", "30", writerd, timeout=60)
    assert project.state(writerd)["ExitCode"] == EXIT_OK

    check_all(project, results, allow_duplicates=True)
    assert all(r["stats"]["fallback_written"] > 0 for r in results.values()), results
    # Whoever created them (the daemon, or an app falling back), each side can
    # write what the other created; the fallback created some of them.
    for snapshot in (fallback_owners, owners(log_dir)):
        assert set(snapshot.values()) <= SHARED_OWNERS, snapshot
    assert (APP_UID, DAEMON_UID, 0o660) in set(fallback_owners.values()), fallback_owners


def family_size(project: Project) -> int:
    return sum(os.stat(name).st_size for name in family_files(project.host_path(SEQ_LOG)))


# -- compose.yaml through podman-compose ---------------------------------------
PODMAN_COMPOSE = "podman-compose==1.6.0"
# This machine's conditions for every container podman-compose starts (compose.yaml stays as users run it).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""


def podman_compose() -> str:
    """podman-compose from PyPI in a venv cached beside the base image, or skip saying why not."""
    venv = CACHE / PODMAN_COMPOSE.replace("==", "-")
    command = venv / "bin" / "podman-compose"
    with cache_lock():
        if not command.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", PODMAN_COMPOSE],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                pytest.skip(f"pip install {PODMAN_COMPOSE} failed: {result.stderr.strip()[-500:]}")
    return str(command)


def test_compose_yaml_runs_under_podman_compose(image, tmp_path):
    """compose.yaml as a user runs it; the override only picks the test's image and
    gives the apps (docker/app.py) a number of records instead of running forever."""
    yaml = pytest.importorskip("yaml")
    command = podman_compose()
    records = 100
    apps = ["app1", "app2"]
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"services": {
        "writerd": {"image": image},
        **{app: {"image": image, "environment": {"APP_RECORDS": str(records)}} for app in apps}}}))
    conf = tmp_path / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    name = f"clhwt{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def compose(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run([command, "-p", name, "-f", str(COMPOSE), "-f", str(override), *args], env=env,
                                capture_output=True, text=True, timeout=timeout, cwd=COMPOSE.parent)
        assert result.returncode == 0, f"podman-compose {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result

    def container(service: str) -> str:
        return podman("ps", "-a", "--filter", f"label=io.podman.compose.project={name}",
                      "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}").stdout.strip()

    try:
        compose("up", "-d", "--no-build")
        writerd = container("writerd")
        wait_for(lambda: podman("healthcheck", "run", writerd, check=False).returncode == 0,
                 what="the writerd service's health check to pass")
        for app in apps:
            assert int(podman("wait", container(app), timeout=120).stdout) == 0, podman("logs", container(app)).stderr
        mountpoint = podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{name}_logs").stdout.strip()
        lines = read_lines(os.path.join(mountpoint, "app.log"))
        for app in apps:
            numbers = sorted(int(line.split(" request ")[1].split()[0]) for line in lines if f" {app} request " in line)
            assert numbers == list(range(records)), f"{app}: {len(numbers)} of {records} lines"
        # The published metrics port (bridge network here), then the service's stop grace period.
        with urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=10) as response:
            assert "clh_writerd_file_records_written_total" in response.read().decode()
        compose("stop")
        assert json.loads(podman("inspect", "--format", "{{json .State}}", writerd).stdout)["ExitCode"] == EXIT_OK
    finally:
        subprocess.run([command, "-p", name, "-f", str(COMPOSE), "-f", str(override), "down", "-v"], env=env,
                       capture_output=True, timeout=180, cwd=COMPOSE.parent)
