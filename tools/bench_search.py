"""`ponder bench search`: decode throughput against its memory-bandwidth bound and against HuggingFace,
and the tree search's overhead over plain sampling."""

from __future__ import annotations

import argparse
import time

from tools.cli import config_from_args

SEARCH_SECTIONS = ("roofline", "overhead", "hf")  # `ponder bench search` flags; none given runs them all


def run_search(args: argparse.Namespace) -> int:
    """Runs the search benchmark sections asked for (all by default)."""
    sections = [name for name in SEARCH_SECTIONS if getattr(args, name)] or list(SEARCH_SECTIONS)
    if "roofline" in sections:
        bench_decode_roofline(args)
    if "overhead" in sections:
        bench_search_overhead(args)
    if "hf" in sections:
        bench_decode_vs_hf(args)
    return 0


def bench_decode_roofline(args: argparse.Namespace) -> list[dict[str, float]]:
    """Greedy decode tokens/s at each of `--roofline-batches` rows against the memory-bandwidth bound.

    A decode step must read every weight and each row's cached keys and values at least once
    (`model.flops.decode_step_bytes`); the bound is rows / (those bytes / bandwidth), with the
    device's data-sheet bandwidth on TPU/GPU and this machine's measured read bandwidth on CPU.
    Decode time excludes prefill and compilation: a run of NEW_TOKENS tokens minus a run of one.
    """
    import jax
    import numpy as np
    from flax import nnx

    from model.flops import decode_step_bytes
    from model.pallas_paged import decode_kernel
    from model.transformer import create_model
    from search.sampler import Sampling
    from tools.generate import jit_generate
    from train.flops import known_bandwidth_gbps, measure_bandwidth_gbps

    model_cfg = config_from_args(args).model
    prompt_len, new_tokens = args.prompt_len, args.new_tokens
    if new_tokens < 2:
        raise SystemExit("ponder bench search --roofline: --new-tokens must be at least 2")
    if prompt_len + new_tokens > model_cfg.max_seq_len:
        model_cfg = model_cfg.model_copy(update={"max_seq_len": prompt_len + new_tokens})
    device = jax.devices()[0]
    known = known_bandwidth_gbps(device)
    bandwidth = known or measure_bandwidth_gbps()
    source = "data sheet" if known else "measured read bandwidth"
    graphdef, params = nnx.split(create_model(model_cfg, seed=0))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    print(f"decode roofline: {count / 1e6:.1f}M-param model ({model_cfg.num_layers} layers, width "
          f"{model_cfg.embed_dim}), params {model_cfg.param_dtype}, compute {model_cfg.dtype}, greedy, prompt "
          f"{prompt_len} + {new_tokens} new tokens, on {device.device_kind} ({bandwidth:,.0f} GB/s, {source}), "
          f"best of {args.repeats}")
    print(f"decode attention: {decode_kernel(model_cfg, device.platform)[0]}")
    print(f"{'rows':>6} {'ms/step':>9} {'tokens/s':>12} {'MB/step':>9} {'bound tok/s':>12} {'of bound':>9}")
    generate, results = jit_generate(), []
    for rows in args.roofline_batches:
        rng = np.random.default_rng(rows)
        prompts = rng.integers(3, min(model_cfg.vocab_size, 259), (rows, prompt_len)).astype(np.int32)
        lengths, keys = np.full((rows,), prompt_len, np.int32), jax.random.split(jax.random.key(0), rows)
        calls = []
        for steps in (new_tokens, 1):
            compiled = generate.lower(graphdef, params, model_cfg, prompts, lengths, keys, max_new_tokens=steps,
                                      sampling=Sampling(temperature=0.0), stop_ids=()).compile()
            args_now = (params, prompts, lengths, keys)
            calls.append(lambda compiled=compiled, a=args_now: jax.block_until_ready(compiled(*a)))
        full, one = _best_seconds(calls, args.repeats)
        step_seconds = max(full - one, 1e-9) / (new_tokens - 1)
        # Steps 1..N-1 attend over prompt_len + 1 .. prompt_len + N - 1 slots.
        step_bytes = decode_step_bytes(model_cfg, rows, prompt_len + new_tokens / 2)
        bound = rows * bandwidth * 1e9 / step_bytes
        rate = rows / step_seconds
        print(f"{rows:>6} {step_seconds * 1e3:>9.3f} {rate:>12,.0f} {step_bytes / 1e6:>9.1f} {bound:>12,.0f} "
              f"{rate / bound:>9.1%}")
        results.append({"rows": rows, "tokens_per_s": rate, "bound_tokens_per_s": bound, "of_bound": rate / bound})
    return results


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

    from model.transformer import create_model
    from search.sampler import Sampling, encode_prompts, generate
    from search.scorers import LogProbScorer
    from search.sharded import run_search
    from search.spec import STRATEGIES, SearchSpec
    from search.state import Models
    from tasks import get_task
    from train.data import get_vocabulary

    cfg = config_from_args(args)
    if cfg.model.max_seq_len < 256:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_seq_len": 256})})
    graphdef, params = nnx.split(create_model(cfg.model, seed=0))
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

    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"search overhead: {count / 1e6:.1f}M-param model (random weights), {args.problems} problems, "
          f"compute {cfg.model.dtype} on {jax.devices()[0].device_kind}")
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
