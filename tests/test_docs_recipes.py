"""docs/recipes.md: every velora command in its bash blocks parses (options exist, values fit)."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from velora_cli.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("velora ")]


def test_the_doc_has_commands():
    assert len(_commands()) >= 5


@pytest.mark.parametrize("line", _commands())
def test_each_command_parses(line):
    group = typer.main.get_command(app)
    name, *args = shlex.split(line)[1:]
    command = group.commands[name]
    with command.make_context(f"velora {name}", args, resilient_parsing=False) as ctx:
        assert ctx.params  # parsed: every option exists and takes its value
