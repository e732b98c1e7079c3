"""`--help` on every command of the app, found by walking the command tree (a new command is covered without
editing this file): exit 0 and a usage line naming the command's full path."""
import pytest
import typer
from typer.testing import CliRunner

from pocketlm.cli import app

runner = CliRunner()


def _commands(command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], bool]]:
    """(path, is_leaf) of every command under ``command``, groups included."""
    if not hasattr(command, "list_commands"):
        return [(path, True)]
    ctx = command.context_class(command)
    out = [(path, False)]
    for name in command.list_commands(ctx):
        out += _commands(command.get_command(ctx, name), (*path, name))
    return out


COMMANDS = _commands(typer.main.get_command(app))
LEAVES = [path for path, leaf in COMMANDS if leaf]


def test_the_walk_finds_every_command():
    """The tree is walked, not listed: it holds the groups and the commands users know (a floor, not a list)."""
    groups = {path for path, leaf in COMMANDS if not leaf}
    assert {(), ("eval",), ("audit",), ("vlm",)} <= groups
    assert {("distill",), ("run",), ("export",), ("eval", "perplexity"), ("audit", "probes"), ("vlm", "caption"),
            ("size",), ("prune",)} <= set(LEAVES)
    assert len(LEAVES) >= 17


@pytest.mark.parametrize("path", [path for path, _ in COMMANDS], ids=lambda p: " ".join(p) or "pocketlm")
def test_help(path):
    r = runner.invoke(app, [*path, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    usage = " ".join(("pocketlm", *path))
    assert f"Usage: {usage} " in r.output, r.output[:500]
    assert "Traceback" not in r.output
