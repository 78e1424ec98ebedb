"""`--help` of every command in an 80-column terminal (issue 22): every option name whole (greppable),
every description whole and wrapped to a readable width, no line past the terminal.

Typer's rich panels cut names (`--mini-batch-si…`) and wrapped descriptions at ~17 characters there;
the CLI now uses click's plain help. The checks iterate over the commands and parameters click
builds from `cli.app`, so commands and options added later are covered too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import cli
from tests.conftest import ROOT

WIDTH = 80
MAX_INDENT = 34  # descriptions start by this column, so they get 46 of the 80


def commands() -> dict:
    group = typer.main.get_command(cli.app)
    return {"": group, **group.commands}


def render(name: str, columns: int = WIDTH) -> str:
    result = CliRunner().invoke(cli.app, [*([name] if name else []), "--help"], env={"COLUMNS": str(columns)}, terminal_width=columns)
    assert result.exit_code == 0, result.output
    return result.output


def squeezed(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("name", commands())
def test_help_at_80_columns_shows_every_option_whole(name):
    command = commands()[name]
    text = render(name)
    long_lines = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not long_lines, long_lines
    boxed = [line.strip("│╭╮╰╯─").rstrip() for line in text.splitlines()]  # without the frame of a panel, if any
    deep = [line for line in boxed if line and len(line) - len(line.lstrip()) > MAX_INDENT]
    assert not deep, f"descriptions squeezed into a narrow column: {deep[:3]}"
    assert "…" not in text
    for param in command.params:
        if param.param_type_name == "option":
            for option in param.opts + param.secondary_opts:
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), f"{name or 'gist'}: {option} not shown whole"
        else:
            assert re.search(rf"\b{param.metavar or param.name.upper()}\b", text)
        if getattr(param, "help", None):
            assert squeezed(param.help) in squeezed(text), f"{name or 'gist'}: help of {param.name} cut"
    if command.help:
        assert squeezed(command.help) in squeezed(text)


def test_help_follows_the_terminal_width():
    """The width really applies: a 60-column terminal gets lines of at most 60, and they use it."""
    for columns in (60, WIDTH):
        lines = render("train", columns).splitlines()
        assert columns - 10 <= max(map(len, lines)) <= columns


def test_train_help_greps_in_an_80_column_terminal():
    """`COLUMNS=80 gist train --help | grep mini-batch` through the console script's entry point."""
    env = {**os.environ, "COLUMNS": str(WIDTH)}
    out = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "train", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = [line for line in out.splitlines() if "mini-batch" in line]
    assert found and found[0].lstrip().startswith("--mini-batch-size "), found
    assert max(map(len, out.splitlines())) <= WIDTH
