"""`mvmctl exec`'s fast parser (cli/exec_argv.py) reads every form it accepts exactly as the
real click `exec` command does, and gives the rest back to click (None)."""

from __future__ import annotations

import click
import pytest

from mvm.cli.commands import cli
from mvm.cli.exec_argv import parse_exec_args

AGREED = [
    ["fx", "--", "true"],
    ["fx", "--", "sh", "-c", "echo $A", "--env", "X", "-it", "--help"],  # after --, all of it is ARGV
    ["--env", "A=1", "fx", "--", "env"],
    ["fx", "--env", "A=1", "--env=B=2=3", "--env", "C=", "--", "env"],
    ["fx", "--cwd", "/tmp", "--", "pwd"],
    ["--cwd=/srv", "fx", "--", "pwd"],
    ["fx", "--cwd=", "--", "pwd"],
    ["fx", "--timeout", "2.5", "--", "sleep", "9"],
    ["fx", "--timeout=1e1", "--", "sleep", "9"],
    ["fx", "--timeout", " 7 ", "--", "sleep", "9"],
    ["fx", "--timeout", "inf", "--", "sleep", "9"],
    ["fx", "--timeout", "-3", "--", "true"],  # a number: run_exec refuses it, for both paths alike
    ["fx", "--timeout", "1", "--timeout", "2", "--", "true"],  # the last one wins
    ["-i", "fx", "--", "cat"],
    ["fx", "--interactive", "--", "cat"],
    ["fx", "-t", "--", "sh"],
    ["--tty", "fx", "--", "sh"],
    ["-it", "fx", "--", "sh"],
    ["fx", "-ti", "--", "sh"],
    ["-i", "-t", "fx", "--", "sh"],
    ["fx", "--receipt", "--", "true"],
    ["--receipt", "-i", "fx", "--", "cat"],
    ["-iti", "fx", "--env", "TERM=xterm", "--cwd", "/", "--timeout", "3", "--", "sh"],
    ["fx", "--env", "X", "--", "true"],  # not K=V: run_exec refuses it, for both paths alike
    ["fx", "--env=", "--", "true"],
    ["fx", "--env", "-h", "--", "true"],  # an option's value, not help
    ["fx", "--cwd", "--", "--", "true"],  # `--` as the value of --cwd
    ["fx", "--", "--"],
    ["fx", "--", "a", "--", "b"],
    ["-", "--", "true"],  # odd names are the name check's business, not the parser's
    ["", "--", "true"],
    ["Bad/Name", "--", "true"],
]

REFUSED = [
    [],
    ["fx"],
    ["fx", "true"],  # no --: click's grammar, not ours
    ["fx", "--"],  # no ARGV
    ["--", "fx", "true"],
    ["fx", "extra", "--", "true"],
    ["--help"],
    ["-h"],
    ["fx", "-h", "--", "true"],
    ["fx", "--help", "--", "true"],
    ["fx", "-ih", "--", "true"],
    ["fx", "--bogus", "--", "true"],
    ["-x", "fx", "--", "true"],
    ["-ix", "fx", "--", "true"],
    ["-5", "--", "true"],
    ["fx", "--cwd"],
    ["fx", "--env"],
    ["fx", "--timeout"],
    ["fx", "--timeout", "soon", "--", "true"],
    ["fx", "--timeout=", "--", "true"],
    ["fx", "--tty=yes", "--", "true"],
    ["fx", "--interactive=1", "--", "true"],
    ["fx", "-t=1", "--", "true"],
    ["fx", "--tt", "--", "true"],  # click does not expand abbreviations either
]


def click_params(words: list[str]) -> dict[str, object]:
    """What the real `exec` command, found through the real group, makes of ``words``."""
    group_ctx = click.Context(cli, info_name="mvmctl", **cli.context_settings)
    command = cli.get_command(group_ctx, "exec")
    assert command is not None
    with command.make_context("exec", list(words), parent=group_ctx) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("words", AGREED, ids=repr)
def test_fast_parser_agrees_with_click(words: list[str]) -> None:
    fast = parse_exec_args(words)
    assert fast is not None, "the fast parser should take this form"
    assert fast == click_params(words)
    assert set(fast) == {"name", "argv", "env_pairs", "cwd", "timeout", "stdin", "tty", "receipt"}


@pytest.mark.parametrize("words", REFUSED, ids=repr)
def test_fast_parser_leaves_the_rest_to_click(words: list[str]) -> None:
    assert parse_exec_args(words) is None


def test_refused_forms_that_click_takes_still_mean_something_to_click() -> None:
    """Refusing is safe, not lossy: click still runs these (its grammar is wider than ours)."""
    assert click_params(["fx", "true"])["argv"] == ("true",)
    assert click_params(["fx", "extra", "--", "true"])["argv"] == ("extra", "true")
