"""`ponder bench`: throughput benchmarks that print ratios against a reference measured in the same run."""

from __future__ import annotations

import argparse
import time

from tools.bench_search import run_search
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
    train.add_argument("--1b-variant", dest="big_variants", action="append", default=[], metavar="KEY=VALUE,...",
                       help="also measure the 1b model with these overrides (comma-separated; repeatable), "
                       "e.g. model.attention=xla or model.param_dtype=bfloat16,optimizer.master_weights=true")
    train.set_defaults(func=run_train)

    search = commands.add_parser(
        "search",
        help="decode throughput against the memory-bandwidth bound and HuggingFace; tree-search overhead",
        description="--roofline: greedy decode tokens/s of the config's model (random weights) at each "
        "of --roofline-batches rows, against the bound of reading every weight and each row's KV pages "
        "once per step at the device's data-sheet memory bandwidth (on CPU: this machine's measured read "
        "bandwidth); prefill and compilation excluded. --overhead: generated tokens/s of beam search and "
        "MCTS against plain batched sampling of as many tokens, same model. --hf: greedy decoding of "
        "the same random Llama (the config's model shape, float32, default `small`) with the same "
        "weights, BATCH rows of PROMPT_LEN prompt tokens, "
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
    search.add_argument("--roofline", action="store_true",
                        help="decode tokens/s at --roofline-batches rows against the memory-bandwidth bound")
    search.add_argument("--roofline-batches", type=_sizes, default=[64, 256], metavar="N,N",
                        help="rows decoded together for --roofline (default 64,256)")
    search.add_argument("--overhead", action="store_true",
                        help="tokens/s of beam and mcts against plain batched sampling of as many tokens")
    search.add_argument("--problems", type=int, default=8, help="problems per search batch (--overhead; default 8)")
    search.add_argument("--batch", type=int, default=8, help="rows decoded together for --hf (default 8)")
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


def _sizes(text: str) -> list[int]:
    """`64,256` -> [64, 256] (positive integers)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, got {text!r}")
    return sizes


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
    from model.attention import attention_kernel
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
        big_overrides = ["mesh.fsdp=-1", "model.dtype=bfloat16", "model.remat=save_dots",
                         f"data.batch_size={max(8, jax.device_count() * 4)}", "data.seq_len=2048"]
        big = load_config("models/1b", big_overrides)
        runs.append(("1b bf16", big))
        for variant in args.big_variants:
            runs.append((f"1b {variant}", load_config("models/1b", [*big_overrides, *variant.split(",")])))
    print(f"{'params':>8} {'batch x len':>12} {'attention':>10} {'compile s':>10} {'step s':>8} {'tokens/s':>10} "
          f"{'TFLOP/s/dev':>12} {'MFU':>6} {'peak GiB':>9}  run")
    for name, run_cfg in runs:
        result = measure_train(run_cfg, args.steps)
        params = result["params"]
        shape = f"{run_cfg.data.batch_size}x{run_cfg.data.seq_len}"
        attention = attention_kernel(run_cfg.model, device.platform, run_cfg.data.seq_len)[0]
        peak_memory = (device.memory_stats() or {}).get("peak_bytes_in_use")
        memory = f"{peak_memory / 2**30:>9.1f}" if peak_memory else f"{'-':>9}"
        print(f"{params / 1e6:>7.1f}M {shape:>12} {attention:>10} {result['compile_s']:>10.1f} "
              f"{result['step_s']:>8.3f} {result['tokens_per_s']:>10,.0f} {result['tflops_per_device']:>12.3f} "
              f"{result['tflops_per_device'] / peak:>6.1%} {memory}  {name}")
        if name == "config":
            data = measure_pipeline(run_cfg.data, run_cfg.seed, max(args.steps, 5))
            print(f"  data pipeline: {data['tokens_per_s']:,.0f} tokens/s on one host = "
                  f"{data['tokens_per_s'] / result['tokens_per_s']:.1f}x what training consumes")
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
