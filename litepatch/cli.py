"""The ``litepatch`` command. Each subcommand lives beside the code it drives and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this module only dispatches and turns errors
into one clear line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Only the module of the command being run is imported: `litepatch --help` does not
# import torch (0.1 s instead of 4 s), and a command whose extra is missing does not break the others.
COMMANDS = {
    "demo": ("litepatch.demo.cli", "generate with the built-in demo DiT, dense vs litepatch, and compare"),
    "inspect": ("litepatch.inspect_cli", "list the attention layers litepatch finds in a model"),
    "recipes": ("litepatch.recipes.cli", "list, show, pull and push recipes"),
    "calibrate": ("litepatch.calibration.cli", "search per-layer thresholds under a quality budget (JOB.yaml)"),
}


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser, with the arguments of ``command`` (its module imported); the other commands are
    listed by name and help line only.

    >>> build_parser("recipes").parse_args(["recipes", "list"]).command
    'recipes'
    """
    parser = argparse.ArgumentParser(prog="litepatch", description="LiteAttention for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (no top-level option takes a value)."""
    word = next((w for w in argv if not w.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("litepatch: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, TypeError, FileNotFoundError, PermissionError, OSError, ImportError) as err:
        print(f"litepatch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
