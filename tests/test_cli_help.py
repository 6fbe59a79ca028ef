"""`fleet --help`, and `--help` of every command and subcommand, against a golden text.

``tests/golden/cli_help.txt`` was generated from the one-module CLI (``fleet/cli.py``)
before it was split by command group, so moving code between modules cannot change
what a user reads. A change meant to alter the help (a new flag, a config field's new
docstring: ``fleet diloco``'s flags are generated from the config models) regenerates it
with ``FLEET_WRITE_GOLDEN=1 pytest tests/test_cli_help.py``; read the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from fleet.cli import main

GOLDEN = Path(__file__).parent / "golden" / "cli_help.txt"
#: The width help is wrapped to (a terminal's would make the text depend on it).
WIDTH = 80


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under ``group``, itself first, depth first in name order."""
    out = [path]
    ctx = click.Context(group, info_name="fleet")
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            out += _commands(command, (*path, name))
        else:
            out.append((*path, name))
    return out


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(
        main, [*path, "--help"], prog_name="fleet", terminal_width=WIDTH, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.output


def _text() -> str:
    sections = [f"$ fleet {' '.join((*path, '--help'))}\n{_help(path)}" for path in _commands(main)]
    return "\n".join(sections)


def test_every_help_text_matches_the_golden():
    if os.environ.get("FLEET_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(_text())
    assert _text() == GOLDEN.read_text()


def test_the_command_tree_is_the_golden_one():
    """The same commands, in the same groups (a lost command fails here by name)."""
    listed = [line for line in GOLDEN.read_text().splitlines() if line.startswith("$ fleet ")]
    assert [f"$ fleet {' '.join((*p, '--help'))}" for p in _commands(main)] == listed


def test_the_console_script_and_python_m_fleet_print_the_same_help():
    """The installed ``fleet`` entry point (``fleet.cli:main``) and ``python -m fleet``."""
    exe = shutil.which("fleet", path=str(Path(sys.executable).parent))
    assert exe, "the `fleet` console script is not installed"
    env = {**os.environ, "COLUMNS": str(WIDTH)}
    root = _help(())
    for argv in ([exe, "--help"], [sys.executable, "-m", "fleet", "--help"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        assert out.returncode == 0, out.stderr
        # click names the program as it was started: compare from the first line on
        assert out.stdout.split("\n", 1)[1] == root.split("\n", 1)[1]
        assert out.stdout.startswith("Usage: ")


def test_version():
    result = CliRunner().invoke(main, ["--version"], prog_name="fleet")
    assert result.exit_code == 0 and result.output.startswith("fleet, version ")
