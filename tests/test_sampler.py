"""The batched sampler on the paged KV cache: greedy parity with the full forward, stops, sampling filters, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.load import load_config, save_config
from model.sharding import make_mesh
from model.transformer import create_model
from search.sampler import EOS_ID, PAD_ID, Sampling, decode_text, encode_prompts, sample_logits
from tools.cli import main
from tools.generate import jit_generate
from train.checkpoint import Checkpoints
from train.data import get_vocabulary
from train.state import init_state, state_layout

ROOT = Path(__file__).parents[1]
VOCAB = get_vocabulary("byte")
NEWLINE_ID = 13  # "\n" in the byte vocabulary (3 special ids come first)
PROMPTS = ["Compute: (12 + 7) * 3", "hi", "Numbers: 25 17 3 6\nTarget: 42"]  # 22, 3 and 30 tokens with BOS
MAX_NEW = 12
GREEDY = Sampling(temperature=0.0)
WIDTH = 32  # prompts padded to one width, so every batch below shares compiled programs


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    graphdef, params = nnx.split(create_model(cfg.model, seed=0))
    return graphdef, params, cfg.model


def _keys(seeds) -> jax.Array:
    return jnp.stack([jax.random.key(seed) for seed in seeds])


def _generate(tiny, prompts=PROMPTS, sampling=GREEDY, seeds=(0, 1, 2), stop_ids=()):
    graphdef, params, model_cfg = tiny
    tokens, lengths = encode_prompts(VOCAB, prompts, width=WIDTH)
    out = jit_generate()(graphdef, params, model_cfg, tokens, lengths, _keys(seeds),
                         max_new_tokens=MAX_NEW, sampling=sampling, stop_ids=stop_ids)
    return np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.num)


@pytest.fixture(scope="module")
def greedy(tiny):
    """Greedy continuations with no stop ids: every row runs MAX_NEW tokens."""
    return _generate(tiny)


def _reference_greedy(tiny, prompts, steps):
    """Argmax decoding that re-runs the full forward on the whole growing sequence at every step."""
    graphdef, params, _ = tiny
    forward = jax.jit(lambda params, tokens: jax.nn.log_softmax(nnx.merge(graphdef, params)(tokens), axis=-1))
    tokens, lengths = encode_prompts(VOCAB, prompts, width=WIDTH + steps)
    rows = np.arange(len(prompts))
    out_tokens, out_logprobs = [], []
    for _ in range(steps):
        log_probs = np.asarray(forward(params, tokens))[rows, lengths - 1]  # causal: padding after is unseen
        token = log_probs.argmax(axis=-1)
        out_tokens.append(token)
        out_logprobs.append(log_probs[rows, token])
        tokens[rows, lengths] = token
        lengths += 1
    return np.stack(out_tokens, axis=1), np.stack(out_logprobs, axis=1)


def test_greedy_matches_full_forward_reference(tiny, greedy):
    tokens, logprobs, num = greedy
    want_tokens, want_logprobs = _reference_greedy(tiny, PROMPTS, MAX_NEW)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(num, [MAX_NEW] * len(PROMPTS))


def test_rows_stop_at_stop_ids_and_pad_after(tiny, greedy):
    free_tokens, free_logprobs, _ = greedy
    # A random model rarely says EOS or newline: also stop on a token row 0 emits later that row 1 never does.
    stop = next(int(t) for t in free_tokens[0, 3:] if t not in free_tokens[1] and t not in free_tokens[0, :3])
    stop_ids = (EOS_ID, NEWLINE_ID, stop)
    tokens, logprobs, num = _generate(tiny, stop_ids=stop_ids)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(free_tokens[row], stop_ids))
        want_num = hits[0] + 1 if hits.size else MAX_NEW
        assert num[row] == want_num, row
        np.testing.assert_array_equal(tokens[row, :want_num], free_tokens[row, :want_num])
        np.testing.assert_allclose(logprobs[row, :want_num], free_logprobs[row, :want_num], atol=1e-6)
        assert (tokens[row, want_num:] == PAD_ID).all() and (logprobs[row, want_num:] == 0).all()
    assert num[0] < MAX_NEW and tokens[0, num[0] - 1] == stop  # stopped by the stop id, which it emitted
    assert num[1] == MAX_NEW  # never met a stop id: ran to max_new_tokens


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)],
                         ids=["top_k=1", "top_p=1e-6"])
def test_filters_that_keep_one_token_are_greedy(tiny, greedy, sampling):
    tokens, logprobs, _ = _generate(tiny, sampling=sampling)
    np.testing.assert_array_equal(tokens, greedy[0])
    np.testing.assert_allclose(logprobs, greedy[1], atol=1e-6)  # the model's own log-probs, not the filtered ones


def test_sampling_is_deterministic_per_key_and_independent_of_other_rows(tiny, greedy):
    sampling = Sampling(temperature=1.0)
    first = _generate(tiny, sampling=sampling, seeds=(0, 1, 2))
    again = _generate(tiny, sampling=sampling, seeds=(0, 1, 2))
    for got, want in zip(again, first, strict=True):
        np.testing.assert_array_equal(got, want)
    assert (first[0] != greedy[0]).any()  # it did sample

    # Row 0 keeps its prompt and key while its neighbours get other prompts and keys: same sample.
    mixed = _generate(tiny, [PROMPTS[0], "A different prompt", "x"], sampling, seeds=(0, 7, 8))
    assert (mixed[0][1:] != first[0][1:]).any()
    np.testing.assert_array_equal(mixed[0][0], first[0][0])
    np.testing.assert_allclose(mixed[1][0], first[1][0], atol=1e-6)
    # And its key alone decides its sample.
    rekeyed = _generate(tiny, sampling=sampling, seeds=(5, 1, 2))
    assert (rekeyed[0][0] != first[0][0]).any()
    np.testing.assert_array_equal(rekeyed[0][1:], first[0][1:])


def test_sample_logits_draws_only_from_the_top_k_and_top_p():
    log_probs = np.log(np.array([0.05, 0.5, 0.02, 0.3, 0.1, 0.03], np.float32))
    draws = 4000
    logits = jnp.broadcast_to(jnp.asarray(log_probs) + 2.0, (draws, log_probs.size))  # shifted: same softmax
    keys = jax.random.split(jax.random.key(0), draws)
    expected_logprob = jnp.asarray(log_probs)

    tokens, logprobs = jax.jit(sample_logits, static_argnums=2)(logits, keys, Sampling(temperature=1.0, top_k=2))
    counts = np.bincount(np.asarray(tokens), minlength=log_probs.size)
    assert set(np.flatnonzero(counts)) == {1, 3}  # only the two largest logits, over many keys
    assert abs(counts[1] / draws - 0.5 / 0.8) < 0.03  # renormalised over the two kept
    np.testing.assert_allclose(logprobs, expected_logprob[tokens], atol=1e-6)  # untruncated model log-probs

    # top_p=0.85 keeps the smallest prefix by probability whose mass reaches 0.85: 0.5, 0.3, 0.1.
    tokens, _ = jax.jit(sample_logits, static_argnums=2)(logits, keys, Sampling(temperature=1.0, top_p=0.85))
    counts = np.bincount(np.asarray(tokens), minlength=log_probs.size)
    assert set(np.flatnonzero(counts)) == {1, 3, 4}
    assert abs(counts[4] / draws - 0.1 / 0.9) < 0.03


@pytest.fixture(scope="module")
def saved_run(tiny, tmp_path_factory):
    """A run directory with config.yaml and one checkpoint: the tiny experiment's initial state, `tiny`'s params."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config("experiments/tiny", [f"train.run_dir={run_dir}"])
    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    state = init_state(cfg, layout, mesh, params=nnx.to_pure_dict(tiny[1]))
    save_config(cfg, run_dir)
    checkpoints = Checkpoints(run_dir / "checkpoints", save_every=1, keep=1)
    checkpoints.save(1, state, config=cfg, force=True)
    checkpoints.close()
    problems = run_dir / "problems.jsonl"
    problem = {"id": "p1", "task": "arithmetic", "prompt": "Compute: 2 + 3", "answer": "5"}
    problems.write_text(json.dumps(problem) + "\n")
    return {"dir": run_dir, "problems": problems}


CLI_PROMPTS = ["Compute: 1 + 2", "hi", "Compute: 2 + 3"]  # the last from the problem file


@pytest.fixture(scope="module", autouse=True)
def cli_generate(saved_run):
    """`ponder generate --json` in a subprocess, started before the in-process tests (it spends ~15 s importing)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one plain CPU device, as test_cli runs
    env["JAX_PLATFORMS"] = "cpu"
    args = ["generate", "--checkpoint", str(saved_run["dir"] / "checkpoints"), "--prompt", CLI_PROMPTS[0],
            "--prompt", CLI_PROMPTS[1], "--prompts-file", str(saved_run["problems"]), "--max-new-tokens", "6",
            "--batch-size", "2", "--json"]
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def cli_greedy(tiny) -> list[list[int]]:
    """What `ponder generate` must print for CLI_PROMPTS from the saved run (`tiny`'s params): greedy, EOS or 6."""
    tokens = _generate(tiny, CLI_PROMPTS)[0][:, :6].tolist()
    return [row[: row.index(EOS_ID) + 1] if EOS_ID in row else row for row in tokens]


def _main(*argv: str) -> int:
    """`ponder ARGV` in this process (8 devices, so the run's FSDP mesh shards the params 8 ways)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code


def test_generate_in_process_on_8_devices_prints_text(saved_run, cli_greedy, capsys):
    code = _main("generate", "--checkpoint", str(saved_run["dir"]), "--prompt", CLI_PROMPTS[0], "--prompt",
                 CLI_PROMPTS[1], "--prompts-file", str(saved_run["problems"]), "--max-new-tokens", "6")
    out = capsys.readouterr().out
    assert code == 0
    expected = ""
    for name, prompt, ids in zip(["prompt 1", "prompt 2", "p1"], CLI_PROMPTS, cli_greedy, strict=True):
        expected += f"=== {name}: {prompt}\n{decode_text(VOCAB, ids)}\n"
    assert out == expected


def test_generate_errors_are_clean(saved_run, tmp_path, capsys):
    def fails_with(message: str, *argv: str) -> None:
        assert _main("generate", *argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

    fails_with("nowhere: no such checkpoint directory", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi")
    fails_with("no config.yaml", "--checkpoint", str(tmp_path), "--prompt", "hi")
    (tmp_path / "checkpoints").mkdir()
    fails_with("neither a checkpoint step", "--checkpoint", str(tmp_path), "--config", "experiments/tiny",
               "--prompt", "hi")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    fails_with(f"{bad}:1:", "--checkpoint", str(saved_run["dir"]), "--prompts-file", str(bad))
    fails_with("--top-p", "--checkpoint", str(saved_run["dir"]), "--prompt", "hi", "--top-p", "0")


def test_cli_generate_prints_the_greedy_completions_as_json(cli_generate, cli_greedy):
    stdout, stderr = cli_generate.communicate(timeout=120)
    assert cli_generate.returncode == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["name"] for r in records] == ["prompt 1", "prompt 2", "p1"]
    assert [r["prompt"] for r in records] == CLI_PROMPTS
    for record, want in zip(records, cli_greedy, strict=True):
        assert record["tokens"] == want
        assert record["completion"] == decode_text(VOCAB, want)
        assert record["stopped"] == (want[-1] == EOS_ID)
