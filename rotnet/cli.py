"""Command-line plumbing shared by the entry points: flags and `key.sub=value` overrides in any
order (`parse_intermixed_args`); bad input ends in ONE line on stderr, `error: ...`, exit code 2.

    args = ArgumentParser(description=__doc__).parse_intermixed_args(argv)
    with one_line_errors(InputError):
        run(args)
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

USAGE_EXIT_CODE = 2


class InputError(Exception):
    """Bad input (config, files, data layout, command line): printed as one line, exit 2.
    Every other exception is a bug and keeps its traceback."""


class UsageError(InputError):
    """A command-line request that cannot be done; the message names the flag and the fix."""


class UsageExit(SystemExit):
    """SystemExit(2) after the one-line message went to stderr; str() is the message."""

    def __init__(self, message: str):
        super().__init__(USAGE_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message) -> None:
    """Print `error: MESSAGE` as one line on stderr (lines joined with '; ') and raise UsageExit."""
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip()).replace(":; ", ": ")
    text = text if text.startswith("error: ") else f"error: {text}"
    print(text, file=sys.stderr, flush=True)
    raise UsageExit(text)


@contextmanager
def one_line_errors(*types: type[BaseException]):
    """Turn the listed exception types raised inside the block into `fail(message)`."""
    try:
        yield
    except types as e:
        fail(e)


def number(kind: type, low: float, strict: bool = False):
    """argparse type: a `kind` (int or float) at least `low`, or above it if `strict`; else the parser's
    one-line usage error, `argument --flag: -1: must be at least 1`."""
    def parse(text: str):
        value = kind(text)   # a ValueError: argparse's own "invalid int value: 'x'"
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text}: must be {'above' if strict else 'at least'} {low}")
        return value
    parse.__name__ = kind.__name__
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too: `error: MSG (see PROG --help)`, exit 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> None:
        fail(f"{message} (see {self.prog} --help)")

    def add_overrides(self, examples: str) -> None:
        """The `key.sub=value ...` positional of the entry points that read a config."""
        self.add_argument("overrides", nargs="*", metavar="key.sub=value",
                          help=f"dotted config overrides parsed as YAML, e.g. {examples}, before, after or "
                               "between the flags. Unknown keys and wrong types are errors.")
