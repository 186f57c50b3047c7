"""Every ``dsv3`` command explains itself in ``--help``: a description per command (nested ones too),
help text for every option, and every default that says something shown in the formatted help."""

from __future__ import annotations

import argparse

import pytest

from dsv3.cli import build_parser


def _walk(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser below it, however deep."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += _walk(child)
    return found


PARSERS = {p.prog: p for p in _walk(build_parser())}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _squeezed(text: str) -> str:
    """Text without whitespace: line wrapping (which may break at hyphens) cannot hide a match."""
    return "".join(text.split())


def test_every_command_is_walked() -> None:
    expected = {"run", "serve", "bench", "backends", "convert", "conformance", "parity", "eval", "export"}
    assert {prog.split()[1] for prog in PARSERS if prog != "dsv3"} == expected
    assert {"dsv3 eval perplexity", "dsv3 export onnx"} <= set(PARSERS)


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_command_has_description(prog: str) -> None:
    description = PARSERS[prog].description or ""
    assert len(description.split()) >= 8, f"{prog}: no description paragraph in --help"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_option_has_help(prog: str) -> None:
    missing = [a.option_strings or [a.dest] for a in _options(PARSERS[prog]) if not (a.help or "").strip()]
    assert not missing, f"{prog}: options without help text: {missing}"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_defaults_are_shown(prog: str) -> None:
    """A default other than None (the help says what happens then) and other than a switch's own value
    (store_true/store_false: "not given") appears in that option's help and in the formatted --help."""
    parser = PARSERS[prog]
    page = _squeezed(parser.format_help())  # formats every option: a stray % in a help string fails here
    formatter = parser._get_formatter()
    for action in _options(parser):
        if action.default is None or action.default is False or action.nargs == 0:
            continue
        shown = formatter._expand_help(action)  # the option's help as --help prints it, default included
        assert str(action.default) in shown, f"{prog} {action.option_strings}: default {action.default!r} not shown"
        assert _squeezed(shown) in page, f"{prog} {action.option_strings}: help missing from --help"


def test_defaults_that_say_nothing_are_left_out() -> None:
    """None (--seed: the help says what happens) and a switch's value (--raw stores False, so its default
    is True) would read as nonsense; an ordinary default reads as argparse's own formatter writes it."""
    text = PARSERS["dsv3 run"].format_help()
    assert "(default: None)" not in text and "(default: True)" not in text
    assert "--max-new-tokens MAX_NEW_TOKENS most tokens generated per prompt (default: 200)" in " ".join(text.split())
