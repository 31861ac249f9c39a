"""The ``clh-writerd`` command: a thin adapter from arguments to Config and Server."""

import json
import sys
from typing import Optional

import click

from . import __version__, protocol
from .client.control import DaemonUnavailable, request
from .daemon.config import ConfigError, load_config
from .daemon.server import EXIT_CONFIG, Server, configure_logging
from .daemon.stats import render_table

CONFIG_HELP = "TOML config file (default: the embedded default; see daemon/clh-writerd.toml)."


def _run(config_path: Optional[str]) -> None:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"clh-writerd: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    configure_logging(config.log_level)
    sys.exit(Server(config, config_path).run())


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.version_option(__version__, prog_name="clh-writerd")
@click.pass_context
def main(ctx: click.Context, config_path: Optional[str]) -> None:
    """The clh-writerd writer daemon. Without a command: run it in the foreground."""
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


@main.command()
@click.option("--endpoint", help="Daemon endpoint (default: $CLH_WRITERD_ENDPOINT or the per-user socket).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Take the endpoint from this config.")
@click.option("--json", "as_json", is_flag=True, help="Print the stats document as JSON (docs/stats.md).")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for the daemon.")
def stats(endpoint: Optional[str], config_path: Optional[str], as_json: bool, timeout: float) -> None:
    """Show queue, delivery and client metrics of a running daemon."""
    if endpoint is None and config_path is not None:
        try:
            endpoint = load_config(config_path).endpoint
        except ConfigError as exc:
            click.echo(f"clh-writerd: invalid configuration: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    try:
        reply = request(endpoint, protocol.encode_stats_request(), timeout)
    except DaemonUnavailable as exc:
        click.echo(f"clh-writerd: {exc}", err=True)
        sys.exit(1)
    if not isinstance(reply, protocol.Ok):
        click.echo(f"clh-writerd: the daemon refused the stats request: {reply}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(reply.data, indent=2, sort_keys=True))
    else:
        click.echo(render_table(reply.data), nl=False)


@main.command()
@click.option("--endpoint", help="Daemon endpoint (default: $CLH_WRITERD_ENDPOINT or the per-user socket).")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for the daemon.")
def ping(endpoint: Optional[str], timeout: float) -> None:
    """Exit 0 if a daemon answers (for health checks), 1 otherwise."""
    try:
        reply = request(endpoint, protocol.encode_ping(), timeout)
    except DaemonUnavailable as exc:
        click.echo(f"clh-writerd: {exc}", err=True)
        sys.exit(1)
    assert isinstance(reply, protocol.Ok)
    click.echo(f"clh-writerd {reply.data.get('version')} pid {reply.data.get('pid')} is serving")
