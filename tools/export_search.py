"""`ponder export search`: the compiled search program as a `jax.export` artifact (see search/export.py)."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Registers `ponder export search` under `ponder export`."""
    parser = commands.add_parser("search", help="the compiled search program, serialized with jax.export")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exports the search program."""
    raise NotImplementedError("ponder export search")
