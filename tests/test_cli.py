"""The command line explains itself: every (sub-)command has a one-line help and a
description, every option a help text, and every --help prints and exits 0."""

import argparse

import pytest

from galcf_hpc.cli import DEVICE_CHOICES, build_parser
from galcf_hpc.device import DEVICES

# Registered by galcf_hpc/scaling/commands.py, whose parsers still lack descriptions and some
# options help texts; remove this once they have them (strict: the test then fails as XPASS).


def _commands(parser, name="galcf-hpc"):
    """(name, parser, one-line help) of ``parser`` and of every sub-command below it."""
    yield name, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for sub_name, sub in action.choices.items():
                for full, p, h in _commands(sub, f"{name} {sub_name}"):
                    yield full, p, helps.get(sub_name) if p is sub else h


COMMANDS = {name: (parser, line) for name, parser, line in _commands(build_parser())}


def _params():
    for name in COMMANDS:
        yield pytest.param(name, id=name.replace(" ", "_"))


def test_walk_finds_every_command():
    assert {
        "galcf-hpc data synth",
        "galcf-hpc train",
        "galcf-hpc demo",
        "galcf-hpc weights fetch",
        "galcf-hpc catalog run",
        "galcf-hpc judges train",
        "galcf-hpc scaling project",
    } <= set(COMMANDS)


@pytest.mark.parametrize("name", _params())
def test_every_command_and_option_explains_itself(name, capsys):
    parser, line = COMMANDS[name]
    problems = []
    if name != "galcf-hpc" and not (line and line.strip()):
        problems.append("no one-line help in the list of commands")
    if not (parser.description and parser.description.strip()):
        problems.append("no description")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if not (action.help and action.help.strip()):
            problems.append(f"option {'/'.join(action.option_strings) or action.dest} has no help text")
    assert not problems, f"{name}: " + "; ".join(problems)
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(name.split()[1:] + ["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}") and parser.description.split()[0] in out


def test_top_level_help_is_written_for_users():
    parser, _ = COMMANDS["galcf-hpc"]
    text = parser.format_help()
    assert "counterfactual" in text and "galcf-hpc demo" in text
    assert parser.description.rstrip().endswith(".")  # a sentence, not a cut-off docstring line


def test_train_is_the_multi_rank_entry_point():
    line = COMMANDS["galcf-hpc train"][1]
    assert "single process" not in line and "srun" in line and "torchrun" in line


def test_defaults_are_shown():
    shard_help = " ".join(COMMANDS["galcf-hpc data shard"][0].format_help().split())  # unwrapped
    assert "(default: data.shard_size of --config, else 1000)" in shard_help
    run_help = " ".join(COMMANDS["galcf-hpc catalog run"][0].format_help().split())
    assert "(default: from the input's size and the ranks" in run_help and "(default: auto)" in run_help
    assert "(default: None)" not in "".join(p.format_help() for p, _ in COMMANDS.values())


def test_verbose_after_the_command_too():
    parser = build_parser()
    assert parser.parse_args(["data", "verify", "d", "-v"]).verbose is True
    assert parser.parse_args(["-v", "data", "verify", "d"]).verbose is True
    assert parser.parse_args(["data", "verify", "d"]).verbose is False


def test_device_choices_match_the_device_module():
    assert DEVICE_CHOICES == DEVICES
