"""RL: group-relative advantages and the clipped loss by hand, sharded rollouts, a GRPO run that learns, kill + resume.

The runs start from the session's SFT-trained tiny policy (`trained_tiny_policy`, 2-operation
arithmetic) and train on one device of the simulated eight (the fastest on a 2-core machine);
the rollout test compares that device with a (2, 2, 2) mesh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import ROOT

from configs.load import load_config, save_config
from model.sharding import make_mesh
from search.sampler import Sampling
from train.checkpoint import load_params
from train.data import get_vocabulary
from train.rl import RLError, check_policy, train_rl, with_policy
from train.rl_learner import Learner
from train.rl_loss import LossSettings, aggregate, clipped_surrogate, group_advantages, kl_penalty, policy_loss_sums
from train.rl_rollout import PromptStream, RolloutWorker, reason_category, row_keys, score_rollouts, sequences
from train.state import init_state, state_layout

CONFIG = "configs/experiments/rl_tiny.yaml"


def rl_config(policy_dir, run_dir, *overrides):
    return load_config(CONFIG, [f"rl.init_from={policy_dir}", f"rl.run_dir={run_dir}", *overrides])


def one_device_mesh(cfg):
    return make_mesh(cfg.mesh.model_copy(update={"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])


# -- the objective by hand --


def test_group_advantages_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = np.asarray(group_advantages(rewards, std_normalize=True, eps=0.0 + 1e-12))
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)  # mean .5, std .5
    np.testing.assert_allclose(adv[1], [0, 0, 0, 0], atol=1e-5)  # no signal in a uniform group
    std = np.sqrt(0.75 * 0.25)  # mean .25
    np.testing.assert_allclose(adv[2], [-0.25 / std] * 3 + [0.75 / std], atol=1e-5)
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, std_normalize=False))[2],
                               [-0.25, -0.25, -0.25, 0.75], atol=1e-6)


def test_clipped_surrogate_by_hand():
    ratios = np.array([[1.5, 0.5, 1.0, 1.1], [1.5, 0.5, 1.0, 0.7]])
    old = np.zeros_like(ratios)
    logp = jnp.log(jnp.asarray(ratios, jnp.float32))
    adv = jnp.array([1.0, -2.0])
    loss, clipped, _ = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    # A = +1: min(r, clip(r)) -> 1.2, 0.5, 1.0, 1.1; A = -2: min(-2r, -2 clip(r)) -> -3.0, -1.6, -2.0, -1.6
    np.testing.assert_allclose(np.asarray(loss), [[-1.2, -0.5, -1.0, -1.1], [3.0, 1.6, 2.0, 1.6]], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(clipped), [[1, 0, 0, 0], [0, 1, 0, 1]])
    # where the clip binds the token gives no gradient; elsewhere d loss / d logp = -A * ratio
    grad = jax.grad(lambda lp: clipped_surrogate(lp, old, adv, 0.2, 0.2)[0].sum())(logp)
    np.testing.assert_allclose(np.asarray(grad), [[0, -0.5, -1.0, -1.1], [3.0, 0, 2.0, 0]], atol=1e-5)
    # clip-higher: a wider upper clip lets the r = 1.5 token of a positive advantage through
    assert float(clipped_surrogate(logp, old, adv, 0.2, 0.6)[1][0, 0]) == 0.0


def test_kl_estimators_and_aggregation_by_hand():
    logp, ref = jnp.array([np.log(0.5)]), jnp.array([np.log(0.25)])  # ratio p_ref / p = 0.5
    np.testing.assert_allclose(float(kl_penalty(logp, ref, "k1")[0]), np.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(kl_penalty(logp, ref, "k2")[0]), 0.5 * np.log(2) ** 2, rtol=1e-6)
    np.testing.assert_allclose(float(kl_penalty(logp, ref, "k3")[0]), 0.5 - 1 + np.log(2), rtol=1e-6)
    per_token = jnp.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    total, count = aggregate(per_token, mask, "token")
    assert float(total / count) == pytest.approx(8 / 5)  # every token counts once
    total, count = aggregate(per_token, mask, "sequence")
    assert float(total / count) == pytest.approx((1 + 4) / 2)  # every completion counts once


def test_policy_loss_sums_with_kl_and_expert_iteration_weights():
    logp = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.5]]))
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    settings = LossSettings("grpo", 0.2, None, 0.1, "k1", "token")
    out = policy_loss_sums(logp, logp, logp + 0.1, jnp.array([1.0, -1.0]), jnp.ones(2), mask, settings)
    # ratio 1 everywhere: surrogate -A per token (-1, -1, +1); k1 = logp - ref = -0.1 per token
    assert float(out["loss"]) == pytest.approx(-1 - 1 + 1 + 3 * 0.1 * -0.1, abs=1e-6)
    assert float(out["denominator"]) == 3 and float(out["clipped"]) == 0
    sft = LossSettings("sft", kl_coef=0.0)
    out = policy_loss_sums(logp, logp, logp, jnp.zeros(2), jnp.array([1.0, 0.0]), mask, sft)
    assert float(out["loss"] / out["denominator"]) == pytest.approx(-np.log(0.5), abs=1e-6)  # row 2 left out


def test_rewards_guard_over_length_and_count_reasons():
    cfg = load_config(CONFIG, ["rl.format_reward=0.1"])
    stream = PromptStream(cfg, get_vocabulary("byte"))
    problem = stream.problem(0)
    texts = [f"Answer: {problem.answer}", f"Answer: {problem.answer}", "Answer: 1234567", "no answer here"]
    scored = score_rollouts([problem] * 4, texts, np.array([True, False, True, True]), cfg.rl)
    np.testing.assert_allclose(scored.reward, [1.1, 0.0, 0.1, 0.0], atol=1e-6)  # over length: nothing
    assert scored.reasons == {"correct": 1, "over_length": 1, "wrong_answer": 1, "no_answer_line": 1}
    assert reason_category("uses 25 twice (available 1)") == "uses"


def test_prompt_stream_is_deterministic_and_resumes(tmp_path):
    cfg = load_config(CONFIG)
    vocab = get_vocabulary("byte")
    first = PromptStream(cfg, vocab)
    head = first.take(5)
    key = first.next_key()
    first.save(tmp_path)
    rest = [p.id for _, p in first.take(5)]
    resumed = PromptStream(cfg, vocab)
    resumed.restore(tmp_path)
    assert [p.id for _, p in resumed.take(5)] == rest
    assert [i for i, _ in head] == list(range(5)) and head[0][1].split == "train"
    assert jax.random.key_data(resumed.next_key()).tolist() != jax.random.key_data(key).tolist()
    other = PromptStream(load_config(CONFIG, ["rl.seed=1"]), vocab)
    with pytest.raises(Exception, match="other settings"):
        other.restore(tmp_path)
    batch = sequences(vocab, ["ab\n"], [np.array([10, 11, 1])], 8)
    assert batch["tokens"][0].tolist() == [0, 100, 101, 13, 10, 11, 1, 0]  # BOS, prompt bytes + 3, completion
    assert batch["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]  # predicting the completion (EOS included)


def test_learner_trims_a_batch_to_its_longest_row_without_changing_the_update(tmp_path):
    """The learner's batches are as wide as their longest row, in buckets of 16: the log-probs and the
    optimizer step on the trimmed batch equal those on the batch padded to the config's full width."""
    cfg = rl_config(tmp_path / "policy", tmp_path, "rl.max_prompt_len=32", "rl.max_new_tokens=48",
                    "optimizer.learning_rate=0.01", "optimizer.warmup_steps=0")
    mesh = one_device_mesh(cfg)
    learner = Learner(cfg, mesh)
    assert learner.width == 80
    assert [learner.batch_width(n) for n in (1, 16, 17, 40, 79, 500)] == [16, 16, 32, 48, 80, 80]
    vocab = get_vocabulary("byte")
    rng = np.random.default_rng(0)
    completions = [rng.integers(3, 200, size=n) for n in (5, 19, 12, 1)]
    full = sequences(vocab, ["Compute: 1 + 2\n", "Compute: 3 * 4 - 5\n", "ab\n", "x\n"], completions, learner.width)
    used = int(np.flatnonzero(full["loss_mask"].any(axis=0))[-1]) + 1  # as train.rl cuts a batch
    width = learner.batch_width(used)
    assert used == 1 + 19 + 19 - 1 and width == 48 and not full["loss_mask"][:, width:].any()
    rows = {"advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32), "weights": np.ones(4, np.float32)}
    states, results = [], []
    for columns in (learner.width, width):
        batch = {name: value[:, :columns] for name, value in full.items()} | rows
        state = init_state(cfg, learner.layout, mesh)
        logp = np.asarray(learner.logprobs(state["params"], learner.put({k: batch[k] for k in ("tokens", "targets")})))
        assert logp.shape == (4, columns)
        batch |= {"old_logprobs": logp - 0.05, "ref_logprobs": logp + 0.1}
        state, metrics = learner.step(state, learner.put(batch))
        results.append((logp, jax.device_get(metrics)))
        states.append(state)
    (logp_full, metrics_full), (logp_trim, metrics_trim) = results
    np.testing.assert_allclose(logp_trim, logp_full[:, :width], atol=1e-5)  # float32, other matmul shapes
    for key in ("loss", "grad_norm", "kl", "clip_fraction", "entropy", "trained_tokens"):
        np.testing.assert_allclose(metrics_trim[key], metrics_full[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert metrics_full["trained_tokens"] == 19 + 12 + 5 + 1 and metrics_full["grad_norm"] > 0
    # the same update: Adam's first step is ~lr * sign(grad), so compare what the new params predict
    tokens = learner.put({k: full[k][:, :width] for k in ("tokens", "targets")})
    after = [np.asarray(learner.logprobs(state["params"], tokens)) * full["loss_mask"][:, :width] for state in states]
    np.testing.assert_allclose(after[1], after[0], atol=1e-4)
    assert np.abs(after[0] - logp_full[:, :width] * full["loss_mask"][:, :width]).max() > 1e-2  # the step moved them


# -- on the mesh, with the trained tiny policy --


def test_rollouts_on_a_sharded_mesh_equal_one_device(trained_tiny_policy, tmp_path):
    _, policy_dir = trained_tiny_policy
    cfg = rl_config(policy_dir, tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    vocab = get_vocabulary("byte")
    problems = [p for _, p in PromptStream(cfg, vocab).take(4)]
    prompts = [p.prompt for p in problems for _ in range(2)]
    keys = row_keys(jax.random.key(3), [i // 2 for i in range(8)], [i % 2 for i in range(8)])
    outs = []
    for mesh in (one_device_mesh(cfg), make_mesh(cfg.mesh)):
        layout = state_layout(cfg, mesh)
        params = load_params(policy_dir, layout.abstract["params"])
        worker = RolloutWorker(cfg, mesh, vocab, layout.shardings["params"])
        rollout_params = worker.rollout_params(params)
        outs.append(worker(rollout_params, prompts, keys, Sampling(1.0)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert not worker.same_layout  # FSDP-sharded for training, gathered for sampling
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].num, outs[1].num)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-4)


def test_grpo_raises_reward(trained_tiny_policy, tmp_path):
    """The tiny policy gets only a few percent of its arithmetic right, too little signal for a minute of RL; what
    it can learn in one: finishing, with an answer line, within a token limit its chains overrun (the over-length
    guard gives nothing; format_reward pays for the answer line, the verifier for a right one)."""
    _, policy_dir = trained_tiny_policy
    cfg = rl_config(policy_dir, tmp_path / "grpo", "rl.steps=12", "rl.max_new_tokens=28", "rl.format_reward=1.0",
                    "rl.minibatches=2", "rl.kl_coef=0.01", "rl.eval_every=6", "rl.eval_problems=16")
    start = time.perf_counter()
    result = train_rl(cfg, show_progress=False, mesh=one_device_mesh(cfg))
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    rewards = [r["reward_mean"] for r in steps]
    early, late = float(np.mean(rewards[:3])), float(np.mean(rewards[-3:]))
    print(f"GRPO {cfg.rl.steps} steps in {seconds:.0f}s: reward {early:.3f} -> {late:.3f}; over length "
          f"{steps[0]['over_length']:.2f} -> {steps[-1]['over_length']:.2f}; pass@1 "
          f"{[r['pass_at_1'] for r in records if 'pass_at_1' in r]}")
    assert late > early + 0.4, rewards
    assert steps[-1]["over_length"] < steps[0]["over_length"]
    assert [r["step"] for r in records if "pass_at_1" in r] == [0, 6, 12]
    assert result["stopped"] == "done" and "pass_at_1_start" in result
    trained = [r for r in steps if r["optimizer_steps"] == 2]
    assert trained, "every step had uniform groups"
    for key in ("kl", "clip_fraction", "entropy", "completion_length", "rollout_tokens_per_s", "train_tokens_per_s",
                "reward_std", "rollout_logprob_gap", "grad_norm", "learning_rate"):
        assert key in trained[-1], key
    assert max(r["kl"] for r in trained) > 0  # the policy moved away from the reference
    assert all(r["rollout_logprob_gap"] < 1e-3 for r in trained)  # the sampler and the trainer agree on log-probs
    assert sum(r.get("verifier/over_length", 0) for r in steps) > 0


def test_kill_and_resume_continues_the_prompt_stream(trained_tiny_policy, tmp_path):
    _, policy_dir = trained_tiny_policy
    run_dir = tmp_path / "run"
    overrides = [f"rl.init_from={policy_dir}", f"rl.run_dir={run_dir}", "rl.eval_every=0", "rl.checkpoint_every=2",
                 "rl.prompts_per_step=4", "rl.group_size=4"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", "rl", "--no-progress", "--config", CONFIG,
                                *overrides, "rl.steps=100"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    log = run_dir / "rollouts.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and process.poll() is None:
            steps = [int(d.name) for d in (run_dir / "checkpoints").glob("*") if d.name.isdigit()]
            logged = len(log.read_text().splitlines()) if log.exists() else 0
            if steps and logged > max(steps):
                break
            time.sleep(0.1)
        assert process.poll() is None, process.stdout.read()[-3000:]
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    before = [json.loads(line) for line in log.read_text().splitlines()]
    saved = max(int(d.name) for d in (run_dir / "checkpoints").glob("*") if d.name.isdigit())
    assert len(before) > saved  # steps past the checkpoint were done, and will be done again

    cfg = load_config(CONFIG, [*overrides, f"rl.steps={saved + 3}"])
    train_rl(cfg, show_progress=False, mesh=one_device_mesh(cfg))
    after = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in after] == list(range(1, saved + 4))
    assert after[:saved] == before[:saved]
    stream = [i for r in after for i in r["stream"]]
    assert stream == list(range(len(stream)))  # no prompt repeated or skipped
    vocab = get_vocabulary("byte")
    assert [p for r in after for p in r["problems"]] == [PromptStream(cfg, vocab).problem(i).id for i in stream]
    # the steps redone after the checkpoint drew the same samples (the RNG came back with the position)
    for redone in before[saved:]:
        assert after[redone["step"] - 1] == redone
    metrics = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, saved + 4))


def test_kept_groups_put_informative_groups_first_in_stream_order():
    from train.rl_examples import kept_groups

    informative = np.array([False, True, False, True, True, False])
    assert kept_groups(informative, 2).tolist() == [1, 3]
    assert kept_groups(informative, 4).tolist() == [0, 1, 3, 4]  # the three with a signal and the first other
    assert kept_groups(np.zeros(4, bool), 2).tolist() == [0, 1]
    assert kept_groups(informative, 6).tolist() == list(range(6))  # oversample 1: every group, in order


def test_oversampled_grpo_trains_on_the_groups_with_a_signal(trained_tiny_policy, tmp_path):
    _, policy_dir = trained_tiny_policy
    cfg = rl_config(policy_dir, tmp_path / "over", "rl.steps=2", "rl.prompts_per_step=4", "rl.group_size=4",
                    "rl.oversample=2", "rl.max_new_tokens=28", "rl.format_reward=1.0", "rl.eval_every=0")
    train_rl(cfg, show_progress=False, mesh=one_device_mesh(cfg))
    rollouts = [json.loads(line) for line in (tmp_path / "over" / "rollouts.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (tmp_path / "over" / "metrics.jsonl").read_text().splitlines()]
    stream = [i for r in rollouts for i in r["stream"]]
    assert stream == list(range(16))  # 2 x 4 prompts sampled per step, none skipped or repeated
    for record, metric in zip(rollouts, metrics, strict=True):
        rewards = np.asarray(record["reward"]).reshape(8, 4)
        informative = rewards.min(axis=1) < rewards.max(axis=1)
        # the first 4 groups with unequal rewards, in stream order, topped up with the first uniform ones
        expected = sorted(([g for g in range(8) if informative[g]] + [g for g in range(8) if not informative[g]])[:4])
        assert record["trained"] == [record["stream"][g] for g in expected]
        assert metric["groups_informative"] == pytest.approx(informative.mean())
        assert metric["groups_trained_informative"] == pytest.approx(min(informative.sum(), 4) / 4)
        assert metric["reward_mean"] == pytest.approx(rewards.mean(), abs=1e-4)  # over all 32 samples
    assert any(m["groups_informative"] < 1 for m in metrics), "no uniform group: the test checks nothing"


def test_rl_needs_a_policy(tmp_path, capsys):
    from tools import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rl", "--config", CONFIG, f"rl.run_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "rl.init_from" in capsys.readouterr().err
    with pytest.raises(RLError, match="no such directory"):
        train_rl(load_config(CONFIG, [f"rl.init_from={tmp_path / 'missing'}", f"rl.run_dir={tmp_path}"]))


def test_expert_iteration_with_search_distillation(trained_tiny_policy, tmp_path):
    from train.rl import with_policy

    _, policy_dir = trained_tiny_policy
    base = load_config(CONFIG, ["search.n=2", "search.m=2", "search.max_steps=4", "search.max_step_tokens=16",
                                "search.max_len=96"])
    cfg = with_policy(base, policy_dir, tmp_path / "ei", algorithm="expert_iteration", search="beam", steps=2,
                      prompts_per_step=4, group_size=4, eval_every=0)
    result = train_rl(cfg, show_progress=False, mesh=one_device_mesh(cfg))
    records = [json.loads(line) for line in (tmp_path / "ei" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["search_found"] <= 1 and r["search_tokens"] > 0
        # kept: verified samples and search chains over the 4 x 4 + 4 rows; trained iff any was kept
        assert (r["optimizer_steps"] > 0) == (r["kept"] > 0)
        assert r["kept"] * 20 >= r["correct"] * 16 - 1e-6
    assert result["stopped"] == "done"


def test_init_from_accepts_the_same_model_written_differently_and_names_a_real_difference(tmp_path):
    policy = tmp_path / "policy"
    save_config(load_config("experiments/demo_tiny"), policy)  # head_dim: null (embed_dim // num_heads = 32)
    same = with_policy(load_config("experiments/demo_tiny", ["model.head_dim=32"]), policy, tmp_path / "rl")
    assert check_policy(same) == policy
    other = with_policy(load_config("experiments/demo_tiny", ["model.num_layers=3"]), policy, tmp_path / "rl")
    with pytest.raises(RLError, match="num_layers: policy 2, this config 3"):
        check_policy(other)
