"""Appending a measured result to docs/benchmarks.md: a heading, the command that produced
it (as it was typed) with the setting it ran in, and the tables."""

from __future__ import annotations

import shlex
import sys

DOCS = "docs/benchmarks.md"


def command_line(module: str, argv=None) -> str:
    """`python -m <module> <args>` as this process was called (or with `argv`), quoted so
    that it runs as it reads."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def append_section(heading: str, command: str, setting: str, body: str) -> None:
    with open(DOCS, "a") as f:
        f.write(f"\n### {heading}\n\n`{command}` ({setting})\n\n{body}\n")


def publish(body: str, append: bool, heading: str, module: str, argv=None,
            setting: str = "this machine") -> None:
    """Print a bench script's result; with `append`, also add it to the docs under `heading`
    with the command line `python -m <module> ...` it was run with."""
    print(body)
    if append:
        append_section(heading, command_line(module, argv), setting, body)
