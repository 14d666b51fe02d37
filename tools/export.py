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

from tools.cli import add_config_arguments, report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder export` (hf, params, search) and `ponder import` (hf)."""
    from tools import export_search

    export = subparsers.add_parser(
        "export", help="export a checkpoint: HuggingFace safetensors, params only, or a compiled search",
        description="Writes a checkpoint in a form other tools (or ponder's own inference paths) load "
        "directly. Each output is written to a temporary directory beside --out and renamed at the "
        "end, so a failed export leaves nothing half-written.")
    commands = export.add_subparsers(dest="export_command", metavar="SUBCOMMAND", required=True)
    hf = commands.add_parser(
        "hf", help="a HuggingFace Llama directory (safetensors, config, tokenizer)",
        description="Writes a directory that transformers.AutoModelForCausalLM.from_pretrained(DIR) and "
        "AutoTokenizer.from_pretrained(DIR) load with no ponder code: sharded model-0000i-of-0000N.safetensors "
        "with model.safetensors.index.json, config.json (LlamaForCausalLM, rope_scaling when the model uses "
        "it), generation_config.json, the tokenizer (the byte vocabulary as tokenizer.json, a SentencePiece "
        "vocabulary as tokenizer.model) and ponder_export.json (source step, ponder version). A reward "
        "model's value head goes to value_head.safetensors beside the weights. Shards are written one "
        "tensor at a time: host memory holds the params once, plus one tensor. In a multi-process job "
        "every process gathers and process 0 writes; --out may be gs://.")
    _source_arguments(hf)
    hf.add_argument("--dtype", choices=("float32", "bfloat16"), help="tensor dtype (default: the params' own)")
    hf.add_argument("--shard-size", type=parse_size, default="2GB", metavar="SIZE",
                    help="largest shard, e.g. 500MB or 2GB (default 2GB; a bigger tensor gets its own shard)")
    hf.add_argument("--lm-only", action="store_true",
                    help="a plain LM export: refuses a reward model rather than drop its value head")
    hf.set_defaults(func=run_hf)

    params = commands.add_parser(
        "params", help="a params-only checkpoint (no optimizer state) for inference",
        description="Writes OUT/config.yaml and OUT/checkpoints/STEP/state holding only the params: "
        "`ponder search --checkpoint OUT`, `ponder generate`, train.init_from and rl.init_from read it "
        "like a run directory, onto any mesh. Reports its size against the full checkpoint step.")
    _source_arguments(params)
    params.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="store params in this dtype (sets model.param_dtype of the exported config)")
    params.set_defaults(func=run_params)
    export_search.add_parser(commands)

    imports = subparsers.add_parser(
        "import", help="import a HuggingFace Llama directory as a ponder run",
        description="Reads a local HuggingFace model directory and writes a ponder run directory "
        "(config.yaml and a params-only checkpoint) that train.init_from, rl.init_from, "
        "`ponder search --checkpoint` and `ponder generate` use directly.")
    import_commands = imports.add_subparsers(dest="import_command", metavar="SUBCOMMAND", required=True)
    hf_in = import_commands.add_parser(
        "hf", help="a local HuggingFace Llama directory (sharded or not, float32/bfloat16/float16 safetensors)",
        description="Reads DIR/config.json (LlamaForCausalLM; default or llama3 rope_scaling; GQA, MQA, tied "
        "or untied embeddings) and its safetensors, and writes a run directory OUT: config.yaml (the model "
        "section from config.json, the rest from --config and overrides), checkpoints/0 with the params, and "
        "OUT/tokenizer/ with the model's tokenizer.json, which data.vocab names. Anything ponder's decoder "
        "would compute differently (biases, another activation or RoPE type, unknown tensors) stops with an "
        "error naming the field or tensor. Nothing is left under OUT unless the import succeeds.")
    hf_in.add_argument("hf_dir", metavar="DIR", help="local HuggingFace model directory")
    hf_in.add_argument("--out", required=True, metavar="RUN", help="run directory to create (must not exist)")
    hf_in.add_argument("--vocab", metavar="SPEC", help="data.vocab to use instead of DIR/tokenizer.json")
    add_config_arguments(hf_in)
    hf_in.set_defaults(func=run_import_hf)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="RUN",
                        help="run dir, its checkpoints/ or one step dir (newest readable step)")
    parser.add_argument("--step", type=int, metavar="N", help="export step N instead of the newest")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist; may be gs://)")


def run_hf(args: argparse.Namespace) -> int:
    """Exports a HuggingFace directory and reports its files and size."""
    from train.checkpoint import CheckpointError
    from train.interchange import InterchangeError, export_hf

    try:
        written = export_hf(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                            max_shard_bytes=args.shard_size, lm_only=args.lm_only)
    except (InterchangeError, CheckpointError, ValueError) as err:
        return _error("export hf", str(err))
    report(f"wrote {written.out}: step {written.step}, {len(written.files)} files, {_size(written.bytes)} "
           f"in {written.seconds:.1f} s")
    return 0


def run_params(args: argparse.Namespace) -> int:
    """Exports a params-only checkpoint and reports its size against the full one."""
    from train.checkpoint import CheckpointError
    from train.interchange import InterchangeError, export_params

    try:
        written = export_params(args.checkpoint, args.out, step=args.step, dtype=args.dtype)
    except (InterchangeError, CheckpointError) as err:
        return _error("export params", str(err))
    report(f"wrote {written.out}: step {written.step}, params only, {_size(written.bytes)} "
           f"({written.bytes / max(written.source_bytes, 1):.0%} of the full checkpoint's "
           f"{_size(written.source_bytes)}) in {written.seconds:.1f} s")
    return 0


def run_import_hf(args: argparse.Namespace) -> int:
    """Imports a HuggingFace directory as a run and says how to use it."""
    from train.interchange import InterchangeError, import_hf

    try:
        written = import_hf(args.hf_dir, args.out, config=args.config, overrides=tuple(args.overrides),
                            vocab=args.vocab)
    except InterchangeError as err:
        return _error("import hf", str(err))
    report(f"wrote {written.out}: {_size(written.bytes)} from {_size(written.source_bytes)} of safetensors "
           f"in {written.seconds:.1f} s\n  use it: ponder train train.init_from={written.out}, ponder rl "
           f"rl.init_from={written.out}, ponder search --checkpoint {written.out}")
    return 0


def parse_size(text: str) -> int:
    """Bytes of `500MB`, `2GB`, `1.5GiB` or a plain number."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    number = text.strip().lower().rstrip("bikmg") or "0"
    unit = text.strip().lower()[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"--shard-size: expected a size such as 500MB or 2GB, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--shard-size must be positive, got {text!r}")
    return int(value)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def _error(command: str, message: str) -> int:
    print(f"ponder {command}: error: {message}", file=sys.stderr)
    return 2
