"""`ponder generate`: sample completions of prompts from a checkpoint, with the jitted paged-KV sampler."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable

from tools.cli import add_config_arguments, report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder generate`."""
    parser = subparsers.add_parser(
        "generate",
        help="sample completions of prompts from a checkpoint",
        description="Loads the params of a checkpoint (a run directory, its checkpoints/ or one "
        "step directory; the newest readable step), encodes each prompt as training did (BOS, "
        "then the prompt) and generates in batches with one jit-compiled decode loop on the "
        "paged KV cache. Without --config, the config.yaml of the checkpoint's run directory "
        "is used. A completion ends at EOS or after --max-new-tokens. Prompt i samples with "
        "fold_in(key(seed), i), so its completion does not depend on the batch it ran in.",
    )
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="run dir, checkpoints/ dir or step dir")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", metavar="JSONL", help="a problem file (ponder data export): its prompts")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt instead of text")
    parser.set_defaults(func=run)


@functools.cache
def jit_generate() -> Callable:
    """`search.sampler.generate` under `jax.jit`, with graphdef, model config and sampling settings static."""
    import jax

    from search.sampler import generate

    return jax.jit(
        generate, static_argnums=(0, 2), static_argnames=("max_new_tokens", "sampling", "stop_ids", "page_size")
    )


def run(args: argparse.Namespace) -> int:
    """Generates a completion for every prompt and prints them in order."""
    from configs.fileio import run_path
    from configs.load import load_config
    from tasks.files import read_problems
    from train.checkpoint import find_run_config

    checkpoint = run_path(args.checkpoint)
    if not checkpoint.is_dir():
        return _error(f"{checkpoint}: no such checkpoint directory")
    config_path = args.config or find_run_config(checkpoint)
    if config_path is None:
        return _error(f"no config.yaml in {checkpoint} or the run directory above it; pass --config")
    cfg = load_config(config_path, args.overrides)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        return _error("--max-new-tokens and --batch-size must be at least 1")
    if args.temperature < 0 or not 0 <= args.top_k <= cfg.model.vocab_size or not 0 < args.top_p <= 1:
        return _error(f"need --temperature >= 0, 0 <= --top-k <= {cfg.model.vocab_size} and 0 < --top-p <= 1")
    names, texts = [f"prompt {i + 1}" for i in range(len(args.prompt))], list(args.prompt)
    if args.prompts_file:
        problems, _ = read_problems(args.prompts_file)
        names += [problem.id for problem in problems]
        texts += [problem.prompt for problem in problems]
    if not texts:
        return _error("no prompts: give --prompt TEXT or --prompts-file FILE")

    import jax  # the rest imports jax and seqio (slow): only once the arguments are known to be good
    import numpy as np

    from model.distributed import host_values
    from model.sharding import make_mesh
    from search.sampler import Sampling, decode_text, encode_prompts
    from train.checkpoint import CheckpointError, load_params
    from train.data import get_vocabulary
    from train.state import state_layout

    vocab = get_vocabulary(cfg.data.vocab)
    tokens, lengths = encode_prompts(vocab, texts)
    if tokens.shape[1] + args.max_new_tokens > cfg.model.max_seq_len:
        return _error(f"the longest prompt ({tokens.shape[1]} tokens) plus --max-new-tokens {args.max_new_tokens} "
                      f"exceeds model.max_seq_len={cfg.model.max_seq_len}")
    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    try:
        params = load_params(checkpoint, layout.abstract["params"])
    except CheckpointError as err:
        return _error(str(err))

    # Pad the prompt count to whole batches so every call reuses one compiled program.
    batch = min(args.batch_size, len(texts))
    padded = -(-len(texts) // batch) * batch
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], padded - len(texts), axis=0)])
    lengths = np.concatenate([lengths, np.repeat(lengths[:1], padded - len(texts))])
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(args.seed), np.arange(padded))
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    generate = jit_generate()
    with jax.set_mesh(mesh):
        for start in range(0, len(texts), batch):
            rows = slice(start, start + batch)
            out = generate(layout.graphdef, params, cfg.model, tokens[rows], lengths[rows], keys[rows],
                           max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=(vocab.eos_id,))
            out_tokens, out_num = host_values((out.tokens, out.num))  # gathered when rows span hosts
            for row in range(min(batch, len(texts) - start)):
                index = start + row
                ids = out_tokens[row, : out_num[row]].tolist()
                _print_completion(args.json, names[index], texts[index], decode_text(vocab, ids), ids, vocab.eos_id)
    return 0


def _print_completion(as_json: bool, name: str, prompt: str, completion: str, ids: list[int], eos_id: int) -> None:
    if as_json:
        record = {"name": name, "prompt": prompt, "completion": completion, "tokens": ids,
                  "stopped": bool(ids) and ids[-1] == eos_id}
        report(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        report(f"=== {name}: {prompt}\n{completion}", flush=True)


def _error(message: str) -> int:
    print(f"ponder generate: error: {message}", file=sys.stderr)
    return 2
