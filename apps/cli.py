"""`edgeprefill` command line: one entry point, one module per subcommand."""

import argparse
import sys

from edgeprefill.errors import EdgeprefillError

COMMANDS = ("generate", "chat", "bench", "eval", "strategies", "info", "kvp", "runahead",
            "export", "cache_prompt", "serve", "serve_bench")


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2; its
    subcommands' parsers are of the same class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    import importlib

    parser = OneLineErrors(
        prog="edgeprefill", description="Short time-to-first-token for local LLMs on MLX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"edgeprefill.apps.{name}").add_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except EdgeprefillError as e:
        print(f"edgeprefill: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgeprefill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
