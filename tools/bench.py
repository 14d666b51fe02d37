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
    """Registers `ponder bench {data,train}`."""
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

    from model.sharding import make_mesh
    from train.data import Pipeline, to_global
    from train.flops import flops_per_token
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
        params = _param_count(run_cfg)
        shape = f"{run_cfg.data.batch_size}x{run_cfg.data.seq_len}"
        print(f"{name:<10} {params / 1e6:>7.1f}M {shape:>12} {result['compile_s']:>10.1f} {result['step_s']:>8.3f} "
              f"{result['tokens_per_s']:>10,.0f} {result['tflops_per_device']:>12.3f} "
              f"{result['tflops_per_device'] / peak:>6.1%}")
        if name == "config":
            data = measure_pipeline(run_cfg.data, run_cfg.seed, max(args.steps, 5))
            print(f"{'':<10} data pipeline: {data['tokens_per_s']:,.0f} tokens/s on one host = "
                  f"{data['tokens_per_s'] / result['tokens_per_s']:.1f}x what training consumes")
    return 0


def _param_count(cfg) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from model.transformer import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rules=cfg.rules(), rngs=nnx.Rngs(0)))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
