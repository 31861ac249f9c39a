"""The ``clh-writerd`` command: a thin adapter from arguments to Config and Server."""

import json
import sys
import time
from typing import Optional, Tuple

import click

from . import _resources, protocol
from ._compat import unsupported_platform
from ._version import __version__
from .client.control import DaemonUnavailable, request
from .daemon.config import ConfigError, config_warnings, load_config
from .daemon.server import EXIT_CONFIG, EXIT_STARTUP, Server, configure_logging
from .daemon.view import render_table, render_watch

CONFIG_HELP = ("TOML config file (default: the embedded default). "
               "`clh-writerd example-config` prints the commented reference config.")


def _run(config_path: Optional[str]) -> None:
    unsupported = unsupported_platform("daemon")
    if unsupported:
        click.echo(f"clh-writerd: {unsupported}", err=True)
        sys.exit(EXIT_STARTUP)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"clh-writerd: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    configure_logging(config.log_level, config.log_rate_limit)
    sys.exit(Server(config, config_path).run())


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.version_option(__version__, prog_name="clh-writerd")
@click.pass_context
def main(ctx: click.Context, config_path: Optional[str]) -> None:
    """The clh-writerd writer daemon. Without a command: run it in the foreground.

    \b
    clh-writerd example-config   the commented reference config
    clh-writerd docs             the guides installed with the package
    """
    if ctx.invoked_subcommand is None:
        _run(config_path)
    ctx.obj = config_path


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.pass_obj
def run(parent_config: Optional[str], config_path: Optional[str]) -> None:
    """Run the daemon in the foreground."""
    _run(config_path or parent_config)


@main.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False), required=False)
def check_config(config_path: Optional[str]) -> None:
    """Validate a config file and print the effective configuration."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"clh-writerd: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(config.as_toml(), nl=False)
    for warning in config_warnings(config):
        click.echo(f"clh-writerd: warning: {warning}", err=True)


@main.command()
@click.option("--endpoint", help="Daemon endpoint (default: $CLH_WRITERD_ENDPOINT or the per-user socket).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Take the endpoint from this config.")
@click.option("--json", "as_json", is_flag=True, help="Print the stats document as JSON (docs/stats.md).")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for the daemon.")
@click.option("--watch", is_flag=True, help="Refresh a live view (rates per second) until Ctrl-C.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes with --watch.")
@click.option("--count", default=0, help="With --watch: stop after this many refreshes (0 = never).")
@click.pass_obj
def stats(parent_config: Optional[str], endpoint: Optional[str], config_path: Optional[str], as_json: bool,
          timeout: float, watch: bool, interval: float, count: int) -> None:
    """Show queue, delivery and client metrics of a running daemon."""
    endpoint = _endpoint(endpoint, config_path or parent_config)
    if watch:
        _watch(endpoint, timeout, interval, count)
        return
    doc = _fetch_stats(endpoint, timeout)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(render_table(doc), nl=False)


def _fetch_stats(endpoint: Optional[str], timeout: float) -> dict:
    try:
        reply = request(endpoint, protocol.encode_stats_request(), timeout)
    except DaemonUnavailable as exc:
        click.echo(f"clh-writerd: {exc}", err=True)
        sys.exit(1)
    if not isinstance(reply, protocol.Ok):
        click.echo(f"clh-writerd: the daemon refused the stats request: {reply}", err=True)
        sys.exit(1)
    return reply.data


def _watch(endpoint: Optional[str], timeout: float, interval: float, count: int) -> None:
    previous, taken, frames = None, time.monotonic(), 0
    # On a terminal: redraw in place and highlight clients in trouble; piped: plain frames, one after the other.
    tty = sys.stdout.isatty()
    try:
        while True:
            doc = _fetch_stats(endpoint, timeout)
            now = time.monotonic()
            # Clear the screen and home the cursor, as top does.
            frame = render_watch(doc, previous, now - taken, tty=tty)
            click.echo(("\x1b[2J\x1b[H" if tty else "") + frame, nl=False)
            previous, taken, frames = doc, now, frames + 1
            if count and frames >= count:
                return
            time.sleep(interval)  # pacing the refresh, not synchronising
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--endpoint", help="Daemon endpoint (default: $CLH_WRITERD_ENDPOINT or the per-user socket).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Take the endpoint from this config.")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for the daemon.")
@click.pass_obj
def ping(parent_config: Optional[str], endpoint: Optional[str], config_path: Optional[str], timeout: float) -> None:
    """Exit 0 if a daemon answers (for health checks), 1 otherwise."""
    endpoint = _endpoint(endpoint, config_path or parent_config)
    try:
        reply = request(endpoint, protocol.encode_ping(), timeout)
    except DaemonUnavailable as exc:
        click.echo(f"clh-writerd: {exc}", err=True)
        sys.exit(1)
    if not isinstance(reply, protocol.Ok):
        click.echo(f"clh-writerd: the daemon answered with an error: {reply}", err=True)
        sys.exit(1)
    click.echo(f"clh-writerd {reply.data.get('version')} pid {reply.data.get('pid')} is serving")


def _endpoint(endpoint: Optional[str], config_path: Optional[str]) -> Optional[str]:
    """--endpoint wins; else the endpoint of --config; else the default."""
    if endpoint is not None or config_path is None:
        return endpoint
    try:
        return load_config(config_path).endpoint
    except ConfigError as exc:
        click.echo(f"clh-writerd: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="clh-writerd", show_default=True, help="Base name of the two files.")
def keygen(directory: str, name: str) -> None:
    """Write a CURVE key pair for tcp: NAME.key (public) and NAME.key_secret (0600) in DIRECTORY."""
    from .daemon.access import write_key_pair

    try:
        public, secret = write_key_pair(directory, name)
    except (OSError, ValueError, RuntimeError) as exc:
        click.echo(f"clh-writerd keygen: {exc}", err=True)
        sys.exit(1)
    click.echo(f"public key: {public}\nsecret key: {secret}")


@main.command("example-config")
def example_config() -> None:
    """Print the commented reference config (every key, its default, what it does)."""
    click.echo(_resources.reference_config(), nl=False)


@main.command()
@click.argument("page", required=False)
@click.option("--path", "show_path", is_flag=True, help="Print only the directory holding the guides.")
def docs(page: Optional[str], show_path: bool) -> None:
    """List the guides installed with the package, or print one (e.g. `docs operations`)."""
    pages = _resources.doc_pages()
    if show_path:
        click.echo(_resources.data_dir("docs"))
        return
    if page is None:
        click.echo(f"Guides installed with clh-writerd {__version__}, in {_resources.data_dir('docs')}:")
        width = max(len(name) for name in pages)
        for name, path in pages.items():
            click.echo(f"  {name:<{width}}  {_resources.doc_title(path)}")
        click.echo("Print one with: clh-writerd docs NAME")
        return
    name = page[: -len(".md")] if page.endswith(".md") else page
    if name not in pages:
        click.echo(f"clh-writerd: no guide {page!r}; installed: {', '.join(pages)}", err=True)
        sys.exit(2)
    with open(pages[name], encoding="utf-8") as f:
        click.echo(f.read(), nl=False)


@main.command("forward-config")
@click.argument("engine", type=click.Choice(["rsyslog"]))
@click.option("--port", default=2514, show_default=True, help="imrelp port.")
@click.option("--address", default="", help="Address imrelp listens on (default: all).")
@click.option("--output", default="/var/log/clh/%HOSTNAME%/%APP-NAME%", show_default=True,
              help="Central file; rsyslog properties make it one file per host and forwarded file.")
@click.option("--work-dir", default=None, help="rsyslog workDirectory (global).")
@click.option("--tls", is_flag=True, help="imrelp over TLS; only the client certificates named by --tls-permit.")
@click.option("--tls-permit", "tls_permit", multiple=True, metavar="NAME|SHA256:FP",
              help="A client certificate the central accepts (its name, or fingerprint); repeat for each.")
@click.option("--tls-ca", default="/etc/rsyslog.d/clh-ca.pem", show_default=True, help="CA certificate (PEM).")
@click.option("--tls-cert", default="/etc/rsyslog.d/clh-cert.pem", show_default=True, help="Central's certificate.")
@click.option("--tls-key", default="/etc/rsyslog.d/clh-key.pem", show_default=True, help="Central's private key.")
def forward_config(engine: str, port: int, address: str, output: str, work_dir: Optional[str], tls: bool,
                   tls_permit: Tuple[str, ...], tls_ca: str, tls_cert: str, tls_key: str) -> None:
    """Print the central-side configuration that makes [forward] at-least-once (docs/forwarding.md)."""
    from .forward.rsyslog import central_config

    try:
        text = central_config(port=port, output=output, address=address, work_dir=work_dir, tls=tls,
                              tls_files=(tls_ca, tls_cert, tls_key), permitted_peers=tls_permit)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(text, nl=False)
