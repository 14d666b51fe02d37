"""`ponder bench`: throughput benchmarks that print ratios against a reference measured in the same run."""

from __future__ import annotations

import argparse
import time

from tools.cli import add_config_arguments, config_from_args

# One stream per task and trace style, at a difficulty a small model trains on.
DATA_COMPONENTS = (
    "arithmetic_d3_direct",
    "countdown_d3_direct",
    "countdown_d3_search",
    "sudoku_d1_direct",
    "sudoku_d3_direct",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder bench {data,train,search}`."""
    parser = subparsers.add_parser("bench", help="measure throughput (data pipeline, training, ...)")
    commands = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    data = commands.add_parser(
        "data",
        help="examples/s and tokens/s of each task's input pipeline",
        description="Reads BATCHES batches (after 2 warm-up batches) from the pipeline of each "
        "task component with the config's data settings (seq_len, batch_size, packing) and "
        "prints examples/s and tokens/s. Compare tokens/s with the trainer's.",
    )
    add_config_arguments(data)
    data.add_argument("--batches", type=int, default=20)
    data.add_argument("--components", nargs="+", default=list(DATA_COMPONENTS), metavar="NAME")
    data.set_defaults(func=run_data)

    train = commands.add_parser(
        "train",
        help="tokens/s and MFU of the train step, against this machine's measured matmul peak",
        description="Compiles the config's train step (same code as `ponder train`), runs STEPS "
        "timed steps on real batches read beforehand, and prints tokens/s, model TFLOP/s per "
        "device (MaxText's FLOP count) and MFU. The peak is the device's known bf16 peak on "
        "TPU/GPU, and on CPU this machine's own float32 matmul TFLOP/s measured in the same run. "
        "Also prints the data pipeline's tokens/s as a ratio to training's. On a GPU or TPU it "
        "then measures the 1b model in bfloat16 (--no-1b to skip).",
    )
    add_config_arguments(train)
    train.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    train.add_argument("--no-1b", action="store_true", help="skip the 1b bfloat16 run on accelerators")
    train.set_defaults(func=run_train)

    search = commands.add_parser(
        "search",
        help="decode throughput of the jitted sampler against HuggingFace transformers",
        description="--hf: greedy decoding of the same random Llama (the config's model shape, "
        "float32, default `small`) with the same weights, BATCH rows of PROMPT_LEN prompt tokens, "
        "NEW_TOKENS new tokens each (no early stop): ponder's jit-compiled `generate` on the paged "
        "KV cache (compile excluded) against `LlamaForCausalLM.generate` with its KV cache on CPU "
        "(torch threads: this machine's cores unless --torch-threads); the best of REPEATS runs "
        "after a warm-up run each. Prints tokens/s of both, their ratio and how many leading "
        "greedy tokens agree, and whether ponder's attention and matmuls ran its native CPU kernels "
        "(PONDER_CPU_KERNELS=0 measures XLA's ops instead). With no section flag, every section runs.",
    )
    add_config_arguments(search)
    search.set_defaults(config="small")
    search.add_argument("--hf", action="store_true", help="decode tokens/s against HuggingFace generate")
    search.add_argument("--overhead", action="store_true",
                        help="tokens/s of beam and mcts against plain batched sampling of as many tokens")
    search.add_argument("--problems", type=int, default=8, help="problems per search batch (--overhead; default 8)")
    search.add_argument("--batch", type=int, default=8, help="rows decoded together (default 8)")
    search.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (default 32)")
    search.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default 128)")
    search.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts (default 3)")
    search.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: this machine's cores)")
    search.set_defaults(func=run_search)

    export = commands.add_parser(
        "export",
        help="time and size of params-only and HuggingFace exports and of an HF import",
        description="Builds the config's model (default `small`) with fresh params and random AdamW "
        "moments (fresh ones are zeros, which orbax compresses away), saves the full train state as "
        "`ponder train` does, then times `export params` "
        "(float32 and bfloat16), `export hf` (float32 and bfloat16) and `import hf` of the float32 "
        "export, each the best of REPEATS into a fresh directory under --dir (default: a temporary "
        "directory, removed at the end), and prints each output's size against the full checkpoint.",
    )
    add_config_arguments(export)
    export.set_defaults(config="small")
    export.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best counts (default 2)")
    export.add_argument("--dir", metavar="DIR", help="where to write (default: a temporary directory)")
    export.set_defaults(func=run_export)


def measure_pipeline(data_cfg, seed: int, batches: int) -> dict[str, float]:
    """Examples/s and (non-padding) tokens/s of one host's pipeline over `batches` batches."""
    import numpy as np

    from train.data import Pipeline

    pipeline = Pipeline(data_cfg, seed=seed, shard_index=0, num_shards=1)
    for _ in range(2):
        next(pipeline)
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(pipeline)
        segments = batch["segment_ids"]
        examples += int(sum(len(np.unique(row[row > 0])) for row in segments))
        tokens += int((segments > 0).sum())
    seconds = time.perf_counter() - start
    return {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds}


def run_data(args: argparse.Namespace) -> int:
    """Prints one row per component."""
    cfg = config_from_args(args)
    print(f"seq_len {cfg.data.seq_len}, batch {cfg.data.batch_size}, pack {cfg.data.pack}, {args.batches} batches")
    print(f"{'component':<24} {'examples/s':>12} {'tokens/s':>12}")
    for name in args.components:
        data_cfg = cfg.data.model_copy(update={"mixture": {name: 1.0}})
        result = measure_pipeline(data_cfg, cfg.seed, args.batches)
        print(f"{name:<24} {result['examples_per_s']:>12,.0f} {result['tokens_per_s']:>12,.0f}")
    return 0


def measure_train(cfg, steps: int) -> dict[str, float]:
    """Tokens/s, TFLOP/s per device and compile time of `cfg`'s train step on `steps` real batches."""
    import jax
    import numpy as np

    from model.flops import flops_per_token
    from model.sharding import make_mesh
    from train.data import Pipeline, to_global
    from train.optim import learning_rate_schedule
    from train.state import init_state, state_layout
    from train.step import compile_steps

    mesh = make_mesh(cfg.mesh)
    rules = cfg.rules()
    layout = state_layout(cfg, mesh)
    state = init_state(cfg, layout, mesh)
    train_step, _, compile_seconds = compile_steps(
        layout, learning_rate_schedule(cfg.optimizer, cfg.train.steps), mesh, rules,
        cfg.data.batch_size, cfg.data.seq_len, cfg.train.microbatches,
    )
    pipeline = Pipeline(cfg.data, seed=cfg.seed)
    batches = [to_global(next(pipeline), mesh, rules) for _ in range(steps + 2)]
    for batch in batches[:2]:
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in batches[2:]:
        state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    tokens_per_s = steps * cfg.data.batch_size * cfg.data.seq_len / seconds
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    return {
        "tokens_per_s": tokens_per_s,
        "step_s": seconds / steps,
        "tflops_per_device": flops * tokens_per_s / mesh.size / 1e12,
        "compile_s": compile_seconds,
        "mflops_per_token": flops / 1e6,
        "devices": mesh.size,
        "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(layout.abstract["params"])),
    }


def run_train(args: argparse.Namespace) -> int:
    """Prints the train step's throughput and MFU for the config (and 1b in bf16 on accelerators)."""
    import jax
    import jax.numpy as jnp

    from configs.load import load_config
    from train.flops import measure_matmul_tflops, peak_tflops

    cfg = config_from_args(args)
    device = jax.devices()[0]
    known = peak_tflops(device)
    if known is None:
        peak = measure_matmul_tflops(jnp.float32, size=2048)
        peak_source = f"measured float32 matmul peak of this {device.platform.upper()} ({device.device_kind})"
    else:
        peak, peak_source = known, f"bf16 data-sheet peak of {device.device_kind}"
    print(f"peak: {peak:.3f} TFLOP/s per device ({peak_source})")

    runs = [("config", cfg)]
    if device.platform != "cpu" and not args.no_1b:
        big = load_config("models/1b", [f"mesh.fsdp={-1}", "model.dtype=bfloat16", "model.remat=save_dots",
                                        f"data.batch_size={max(8, jax.device_count() * 4)}", "data.seq_len=2048"])
        runs.append(("1b bf16", big))
    print(f"{'run':<10} {'params':>8} {'batch x len':>12} {'compile s':>10} {'step s':>8} {'tokens/s':>10} "
          f"{'TFLOP/s/dev':>12} {'MFU':>6}")
    for name, run_cfg in runs:
        result = measure_train(run_cfg, args.steps)
        params = result["params"]
        shape = f"{run_cfg.data.batch_size}x{run_cfg.data.seq_len}"
        print(f"{name:<10} {params / 1e6:>7.1f}M {shape:>12} {result['compile_s']:>10.1f} {result['step_s']:>8.3f} "
              f"{result['tokens_per_s']:>10,.0f} {result['tflops_per_device']:>12.3f} "
              f"{result['tflops_per_device'] / peak:>6.1%}")
        if name == "config":
            data = measure_pipeline(run_cfg.data, run_cfg.seed, max(args.steps, 5))
            print(f"{'':<10} data pipeline: {data['tokens_per_s']:,.0f} tokens/s on one host = "
                  f"{data['tokens_per_s'] / result['tokens_per_s']:.1f}x what training consumes")
    return 0


SEARCH_SECTIONS = ("overhead", "hf")  # `ponder bench search` flags; none given runs them all


def run_search(args: argparse.Namespace) -> int:
    """Runs the search benchmark sections asked for (all by default)."""
    sections = [name for name in SEARCH_SECTIONS if getattr(args, name)] or list(SEARCH_SECTIONS)
    if "overhead" in sections:
        bench_search_overhead(args)
    if "hf" in sections:
        bench_decode_vs_hf(args)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Times and sizes params-only and HF exports and an HF import of a freshly initialised model."""
    import shutil
    import tempfile
    from pathlib import Path

    import jax
    import jax.numpy as jnp

    from model.sharding import make_mesh
    from train.checkpoint import Checkpoints
    from train.interchange import export_hf, export_params, import_hf, tree_bytes
    from train.state import init_state, state_layout

    cfg = config_from_args(args)
    base = Path(args.dir or tempfile.mkdtemp(prefix="ponder-bench-export-"))
    run_dir = base / "run"
    mesh = make_mesh(cfg.mesh)
    state = init_state(cfg, state_layout(cfg, mesh), mesh)
    # Fresh AdamW moments are zeros, which orbax's compression shrinks to nothing; a trained run's
    # are dense floats, so give them random values to measure what a real checkpoint weighs.
    leaves, treedef = jax.tree.flatten(state["opt_state"])
    keys = jax.random.split(jax.random.key(0), len(leaves))
    state["opt_state"] = treedef.unflatten([
        jax.device_put(jax.random.normal(key, leaf.shape, leaf.dtype) * 1e-3, leaf.sharding)
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim else leaf
        for key, leaf in zip(keys, leaves, strict=True)])
    with Checkpoints(run_dir / "checkpoints", save_every=1, keep=1, async_save=False) as checkpoints:
        checkpoints.save(1, state, config=cfg, force=True)
    from configs.load import save_config

    save_config(cfg, run_dir)
    full = tree_bytes(run_dir / "checkpoints" / "1")
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(f"bench export: {args.config} ({params / 1e6:.1f}M params), full checkpoint {full / 2**20:.1f} MiB "
          f"({jax.devices()[0].device_kind}, best of {args.repeats})")
    del state
    runs = {
        "export params float32": lambda out: export_params(run_dir, out),
        "export params bfloat16": lambda out: export_params(run_dir, out, dtype="bfloat16"),
        "export hf float32": lambda out: export_hf(run_dir, out, dtype="float32"),
        "export hf bfloat16": lambda out: export_hf(run_dir, out, dtype="bfloat16"),
        "import hf (float32)": lambda out: import_hf(base / "export hf float32-0", out, vocab=cfg.data.vocab),
    }
    try:
        for name, fn in runs.items():
            best = float("inf")
            for attempt in range(args.repeats):
                out = base / f"{name}-{attempt}"
                start = time.perf_counter()
                fn(out)
                best = min(best, time.perf_counter() - start)
                size = tree_bytes(out)
                if attempt and not name.startswith("export hf float32"):
                    shutil.rmtree(out)
            print(f"  {name:<24} {best:7.2f} s  {size / 2**20:8.1f} MiB  ({size / full:.0%} of the full checkpoint)")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def _best_seconds(fns, repeats: int) -> list[float]:
    """The fastest of `repeats` timed calls of each of `fns`, after one untimed warm-up call each.

    The calls alternate, so a change in the machine's load during the run hits every one alike.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def bench_decode_vs_hf(args: argparse.Namespace) -> dict[str, float]:
    """Greedy decode tokens/s of ponder's jitted sampler and of HF `generate`, same Llama and weights, on CPU."""
    import os

    import jax
    import numpy as np
    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import cpu_kernels
    from model.hf import config_to_hf, from_hf_state_dict, load_params
    from model.transformer import create_model
    from search.sampler import Sampling
    from tools.generate import jit_generate

    model_cfg = config_from_args(args).model.model_copy(update={"dtype": "float32", "param_dtype": "float32"})
    rows, prompt_len, new_tokens = args.batch, args.prompt_len, args.new_tokens
    if prompt_len + new_tokens > model_cfg.max_seq_len:
        model_cfg = model_cfg.model_copy(update={"max_seq_len": prompt_len + new_tokens})
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    # No EOS id: HF's min_new_tokens would otherwise mask it, and greedy paths would part where it is the argmax.
    hf_config = LlamaConfig(**(config_to_hf(model_cfg) | dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)))
    hf = LlamaForCausalLM(hf_config).eval()
    model = create_model(model_cfg, seed=0)
    load_params(model, from_hf_state_dict(hf.state_dict(), model_cfg))
    graphdef, params = nnx.split(model)
    prompts = np.random.default_rng(0).integers(3, 259, (rows, prompt_len)).astype(np.int32)  # byte tokens

    generate = jit_generate()
    lengths, keys = np.full((rows,), prompt_len, np.int32), jax.random.split(jax.random.key(0), rows)
    compile_start = time.perf_counter()
    compiled = generate.lower(graphdef, params, model_cfg, prompts, lengths, keys, max_new_tokens=new_tokens,
                              sampling=Sampling(temperature=0.0), stop_ids=()).compile()
    compile_seconds = time.perf_counter() - compile_start
    ours = {}

    def run_ours():
        ours["out"] = jax.block_until_ready(compiled(params, prompts, lengths, keys))

    hf_out = {}
    input_ids = torch.from_numpy(prompts.astype(np.int64))
    attention_mask = torch.ones_like(input_ids)

    def run_hf():
        with torch.no_grad():
            hf_out["tokens"] = hf.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True)

    ours_seconds, hf_seconds = _best_seconds([run_ours, run_hf], args.repeats)
    ours_tokens = np.asarray(ours["out"].tokens)
    hf_tokens = hf_out["tokens"][:, prompt_len:].numpy()
    assert ours_tokens.shape == hf_tokens.shape == (rows, new_tokens), (ours_tokens.shape, hf_tokens.shape)
    differs = ours_tokens != hf_tokens
    agree = np.where(differs.any(axis=1), differs.argmax(axis=1), new_tokens)  # leading tokens equal, per row

    generated = rows * new_tokens
    ours_rate, hf_rate = generated / ours_seconds, generated / hf_seconds
    params_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    print(f"decode vs HuggingFace: {params_count / 1e6:.1f}M-param Llama ({model_cfg.num_layers} layers, "
          f"width {model_cfg.embed_dim}), float32, {jax.devices()[0].platform.upper()}, greedy, batch {rows}, "
          f"prompt {prompt_len} + {new_tokens} new tokens, best of {args.repeats}")
    hlo = compiled.as_text()
    kernel = ", ".join(f"{name} by {'native CPU kernel' if target in hlo else 'XLA'}" for name, target in
                       (("attention", cpu_kernels.TARGET), ("matmuls", cpu_kernels.MATMUL_TARGET)))
    print(f"  ponder generate (jit, paged KV): {ours_rate:>9,.0f} tokens/s  ({ours_seconds:.3f} s; "
          f"compiled in {compile_seconds:.1f} s; {kernel})")
    print(f"  HF LlamaForCausalLM.generate:    {hf_rate:>9,.0f} tokens/s  ({hf_seconds:.3f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"  ratio ponder / HF: {ours_rate / hf_rate:.2f}x")
    print(f"  greedy tokens agreeing from the start, per row: {agree.tolist()} of {new_tokens} "
          f"({int((agree == new_tokens).sum())}/{rows} rows identical)")
    return {"ponder_tokens_per_s": ours_rate, "hf_tokens_per_s": hf_rate, "ratio": ours_rate / hf_rate,
            "min_agreeing_prefix": int(agree.min())}


def bench_search_overhead(args) -> None:
    """Generated tokens/s of beam and mcts over plain batched sampling of as many tokens (same model, rows)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs.load import load_config
    from model.transformer import create_model
    from search.sampler import Sampling, encode_prompts, generate
    from search.scorers import LogProbScorer
    from search.sharded import run_search
    from search.spec import STRATEGIES, SearchSpec
    from search.state import Models
    from tasks import get_task
    from train.data import get_vocabulary

    cfg = load_config("models/small", ["model.max_seq_len=512"])
    graphdef, params = nnx.split(create_model(cfg.model, cfg.rules(), seed=0))
    vocab = get_vocabulary("byte")
    task = get_task("arithmetic")
    problems = [task.generate(0, i, 3, "test").prompt for i in range(args.problems)]
    tokens, lengths = encode_prompts(vocab, problems, 48)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    keys = jax.random.split(jax.random.key(0), args.problems)
    models = Models(graphdef, cfg.model, LogProbScorer())
    shape = dict(max_steps=6, max_step_tokens=16, max_len=256, page_size=16, sampling=Sampling(temperature=1.0))
    specs = {
        "beam": SearchSpec(strategy="beam", n=4, m=4, **shape),
        "mcts": SearchSpec(strategy="mcts", children=4, wave=4, simulations=16, **shape),
    }
    search = jax.jit(run_search, static_argnums=(0, 1))
    plain = jax.jit(generate, static_argnames=("max_new_tokens", "sampling", "stop_ids", "page_size"),
                    static_argnums=(0, 2))

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats + 1):  # the first call compiles
            start = time.perf_counter()
            out = jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return out, min(times[1:])

    print(f"search overhead: small model (random weights), {args.problems} problems, float32 on "
          f"{jax.devices()[0].platform.upper()}")
    print(f"{'strategy':<10} {'rows':>5} {'tokens':>8} {'search tok/s':>13} {'plain tok/s':>12} {'ratio':>6}")
    for name, spec in specs.items():
        (state, _), seconds = best_of(lambda spec=spec: search(spec, models, params, None, tokens, lengths, keys))
        generated = float(state.tokens.sum())
        rows = args.problems * STRATEGIES[spec.strategy].expansion_rows(spec)
        per_row = max(int(round(generated / rows)), 1)
        row_prompts = jnp.repeat(tokens, rows // args.problems, axis=0)
        row_lengths = jnp.repeat(lengths, rows // args.problems)
        row_keys = jax.random.split(jax.random.key(1), rows)
        sampling_call = functools.partial(plain, graphdef, params, cfg.model, row_prompts, row_lengths, row_keys,
                                          max_new_tokens=per_row, sampling=spec.sampling, stop_ids=(), page_size=16)
        out, plain_seconds = best_of(sampling_call)
        plain_tokens = float(out.num.sum())
        ratio = (generated / seconds) / (plain_tokens / plain_seconds)
        print(f"{name:<10} {rows:>5} {generated:>8,.0f} {generated / seconds:>13,.0f} "
              f"{plain_tokens / plain_seconds:>12,.0f} {ratio:>6.2f}")
