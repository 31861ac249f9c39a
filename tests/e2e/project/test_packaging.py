"""The package as a pip user gets it: `python -m build` makes an sdist and a
wheel (the wheel from the sdist), `twine check` accepts both, and the wheel,
installed into a fresh venv away from the checkout, runs the daemon and a
client end to end. Plus the metadata and what the repository promises about
installed files (the systemd unit's Documentation=, cited benchmark results).
"""

import email
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from support import check_sequences, read_lines, short_socket_dir, wait_for, write_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[3]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOC_PAGES = sorted(p.name for p in (REPO / "docs").glob("*.md"))


# -- fast checks on the checkout ------------------------------------------------
def test_every_code_package_under_src_is_listed_in_pyproject():
    """pyproject lists packages (two of them are data directories): a new one must not be left out."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    src = REPO / "src"
    found = {".".join(init.parent.relative_to(src).parts) for init in src.rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert {mapped["clh_writerd.docs"], mapped["clh_writerd.reference"]} == {"docs", "daemon"}


def test_the_units_documentation_is_an_installed_guide_linked_by_the_install_steps():
    unit = (REPO / "systemd" / "clh-writerd.service").read_text()
    (url,) = re.findall(r"^Documentation=(\S+)$", unit, re.MULTILINE)
    directory, page = url[len("file://"):].rsplit("/", 1)
    assert page in DOC_PAGES
    # docs/operations.md's install steps create that directory from the installed package.
    steps = (REPO / "docs" / "operations.md").read_text()
    assert f'ln -s "$(clh-writerd docs --path)" {directory}' in steps


def test_benchmark_results_the_readme_cites_are_in_the_repository():
    readme = (REPO / "README.md").read_text()
    cited = set(re.findall(r"(\d{8}-\d{6}-[\w+]+\.json)", readme))
    assert cited, "the README cites no results file"
    missing = sorted(name for name in cited if not (REPO / "benchmarks" / "results" / name).exists())
    assert not missing, f"cited but not in benchmarks/results/: {missing}"


# -- build, check, install the wheel, run it ---------------------------------------
@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist and wheel built from a copy of the checkout's tracked files (as a release would be)."""
    pytest.importorskip("build")
    pytest.importorskip("twine")
    root = tmp_path_factory.mktemp("release")
    source = root / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():  # a file deleted in the work tree is still listed until committed
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = root / "dist"
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # `make demo` on a fresh clone prints no warning: the build backend has none to give.
    noisy = [line for line in (result.stdout + result.stderr).splitlines() if "Warning" in line or "deprecat" in line]
    assert not noisy, noisy
    return out


def _one(dist: Path, pattern: str) -> Path:
    (found,) = dist.glob(pattern)
    return found


def test_sdist_and_wheel_pass_twine_check(dist):
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_wheel_carries_the_code_the_guides_the_reference_config_and_the_metadata(dist):
    wheel = zipfile.ZipFile(_one(dist, "clh_writerd-*.whl"))
    names = set(wheel.namelist())
    code = {"clh_writerd/" + str(p.relative_to(REPO / "src" / "clh_writerd"))
            for p in (REPO / "src" / "clh_writerd").rglob("*.py")}
    assert code <= names, sorted(code - names)
    assert "clh_writerd/py.typed" in names
    assert {f"clh_writerd/docs/{page}" for page in DOC_PAGES} <= names
    assert "clh_writerd/reference/clh-writerd.toml" in names
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(wheel.read(meta_name))
    (license_file,) = [n for n in names if re.search(r"\.dist-info/(licenses/)?LICENSE$", n)]
    assert "Apache License" in wheel.read(license_file).decode()
    assert meta["Requires-Python"] == ">=3.6" and meta["Author"] and meta["License"] == "Apache-2.0"
    classifiers = meta.get_all("Classifier")
    for wanted in ("Typing :: Typed", "Operating System :: POSIX :: Linux", "Programming Language :: Python :: 3.6",
                   "Programming Language :: Python :: 3.13"):
        assert wanted in classifiers, wanted
    assert "metrics" in meta.get_all("Provides-Extra")
    assert meta.get_payload().startswith("# clh-writerd")  # the README is the long description
    sdist = _one(dist, "clh_writerd-*.tar.gz").name
    assert sdist == f"clh_writerd-{meta['Version']}.tar.gz"


CLIENT = textwrap.dedent('''
    import logging, sys
    import clh_writerd
    from clh_writerd import create_nonblocking_handler
    from clh_writerd.migrate import setup_logging_queues

    path, records = sys.argv[1], int(sys.argv[2])
    handler = create_nonblocking_handler(path, maxBytes=50000, backupCount=30, use_gzip=True)
    logger = logging.getLogger("wheel")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for i in range(records):
        logger.info("SEQ wheel %d %s", i, "x" * (i % 37))
    handler.flush()
    stats = handler.get_stats()
    print(clh_writerd.__file__)
    print(stats["state"], stats["acked"], stats["fallback_written"])
    handler.close()
''')


def test_the_wheel_installed_in_a_fresh_venv_runs_the_daemon_and_a_client(dist, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, command = venv / "bin" / "python", venv / "bin" / "clh-writerd"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CLH_WRITERD_ENDPOINT")}
    work = tmp_path / "work"  # not the checkout: nothing can be imported from it by accident
    (work / "logs").mkdir(parents=True)
    wheel = _one(dist, "clh_writerd-*.whl")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[metrics]"],
                               cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    def run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(command), *argv], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)

    # What ships: the reference config and the guides, read from site-packages.
    example = run("example-config")
    assert example.returncode == 0 and example.stdout == (REPO / "daemon" / "clh-writerd.toml").read_text()
    docs_dir = run("docs", "--path").stdout.strip()
    assert docs_dir.startswith(str(venv)) and set(DOC_PAGES) <= set(os.listdir(docs_dir))
    assert run("docs", "migration").stdout == (REPO / "docs" / "migration.md").read_text()

    sock_dir = short_socket_dir()
    endpoint = f"ipc://{sock_dir}/w.sock"
    config = write_config(str(work / "clh-writerd.toml"),
                          {"daemon": {"endpoint": endpoint, "allowed_dirs": [str(work / "logs")]}})
    assert run("check-config", config).returncode == 0
    stderr = open(tmp_path / "daemon.stderr", "w+")
    daemon = subprocess.Popen([str(command), "--config", config], cwd=work, env=env, stdout=stderr, stderr=stderr)
    try:
        wait_for(lambda: daemon.poll() is not None or run("ping", "--endpoint", endpoint, "--timeout", "0.5")
                 .returncode == 0, what="the installed daemon to answer")
        assert daemon.poll() is None, open(stderr.name).read()

        script = work / "client.py"
        script.write_text(CLIENT)
        log = work / "logs" / "app.log"
        client = subprocess.run([str(python), str(script), str(log), "5000"], cwd=work,
                                env={**env, "CLH_WRITERD_ENDPOINT": endpoint}, capture_output=True, text=True,
                                timeout=60)
        assert client.returncode == 0, client.stderr
        location, outcome = client.stdout.split("\n")[:2]
        assert location.startswith(str(venv)), f"imported from {location}, not from the installed wheel"
        assert outcome == "daemon 5000 0", outcome  # every record written by the daemon, none by the fallback
        check_sequences(read_lines(str(log)), {"wheel": 5000}).assert_complete()
        stats = json.loads(run("stats", "--json", "--endpoint", endpoint).stdout)
        assert [f["records_written"] for f in stats["files"]] == [5000]
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, open(stderr.name).read()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        stderr.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
