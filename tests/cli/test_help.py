"""Every command's --help renders: argparse %-formats help strings, so one stray '%' in a
registry summary broke `generate --help` once."""
import argparse

from edgeprefill.apps.cli import build_parser


def _parsers(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_help_renders():
    seen = []
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "usage:" in text, path
        seen.append(" ".join(path))
    # the commands that take --strategy are among them, as are nested ones (kvp train)
    assert {"generate", "chat", "bench", "eval", "cache-prompt"} <= set(seen)
    assert any(p.startswith("kvp ") for p in seen)
