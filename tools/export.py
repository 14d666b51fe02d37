"""`ponder export` and `ponder import`: checkpoints out to other tools and in from them.

    ponder export hf --checkpoint runs/small --out hf/small            # transformers loads it
    ponder export params --checkpoint runs/small --out params/small    # params only, any mesh
    ponder export search --checkpoint runs/small --out beam.ponder     # a compiled search program
    ponder import hf hf/llama --out runs/llama                         # a run to train or search from

The conversions live in the library (`train/interchange.py`, `search/export.py`); this file
parses, wires and prints.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder export` (hf, params, search) and `ponder import` (hf)."""
    from tools import export_search

    export = subparsers.add_parser(
        "export", help="export a checkpoint: HuggingFace safetensors, params only, or a compiled search",
        description="Writes a checkpoint in a form other tools (or ponder's own inference paths) load "
        "directly. Each output is written to a temporary directory beside --out and renamed at the "
        "end, so a failed export leaves nothing half-written.")
    commands = export.add_subparsers(dest="export_command", metavar="SUBCOMMAND", required=True)
    export_search.add_parser(commands)

    imports = subparsers.add_parser(
        "import", help="import a HuggingFace Llama directory as a ponder run",
        description="Reads a local HuggingFace model directory and writes a ponder run directory "
        "(config.yaml and a params-only checkpoint) that train.init_from, rl.init_from, "
        "`ponder search --checkpoint` and `ponder generate` use directly.")
    import_commands = imports.add_subparsers(dest="import_command", metavar="SUBCOMMAND", required=True)
    del import_commands  # filled in by `ponder import hf`


def _error(command: str, message: str) -> int:
    print(f"ponder {command}: error: {message}", file=sys.stderr)
    return 2
