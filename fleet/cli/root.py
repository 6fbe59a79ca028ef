"""The root ``fleet`` group, and what every command group shares: the console, exit
statuses, one-line error reports, ``--json`` and the settings from the environment."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console

from fleet.errors import FleetError

if TYPE_CHECKING:
    from fleet.settings import FleetSettings

# Piped output (no terminal) gets a wide console, so names and hashes are never cut.
console = Console() if sys.stdout.isatty() else Console(width=200)

#: Exit statuses: a command's own failure, and Redis that cannot be reached.
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 2


def _fail(exc: FleetError) -> NoReturn:
    """Print a typed error as one line and exit (2 if Redis is unavailable, else 1)."""
    from fleet.errors import BrokerUnavailableError

    console.print(f"[red]error[/red] {type(exc).__name__}: {exc}", soft_wrap=True, highlight=False)
    sys.exit(EXIT_UNAVAILABLE if isinstance(exc, BrokerUnavailableError) else EXIT_FAILED)


class FleetGroup(click.Group):
    """A command group whose commands report any :class:`FleetError` as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetError as exc:
            _fail(exc)


#: ``--json``: one JSON document on stdout instead of the tables (for jq).
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")


def _print_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2, default=str))


def _print_rows(rows: dict[str, Any], width: int = 24) -> None:
    """``key value`` lines, keys padded to ``width``; never cut (a hash, a path)."""
    for key, value in rows.items():
        console.print(f"{key:<{width}}{value}", soft_wrap=True, highlight=False)


def _settings() -> FleetSettings:
    """Settings from the environment, after one quick look at Redis: when it cannot be
    reached the command fails at once (one line, exit 2) instead of retrying."""
    from fleet.connection import check_redis
    from fleet.settings import FleetSettings

    settings = FleetSettings.from_env()
    check_redis(settings)
    return settings


def _on_root(settings: Any, rel: str) -> str:
    """Where a shared-root path is, for a message: a local path or a URL."""
    if settings.shared_root_is_url:
        return f"{settings.shared_root.rstrip('/')}/{rel}"
    return str(Path(settings.shared_root).resolve() / rel)


@click.group(cls=FleetGroup)
@click.version_option(package_name="fleet-diloco")
def main() -> None:
    """fleet: a Celery + Redis worker fleet for distributed PyTorch training."""
