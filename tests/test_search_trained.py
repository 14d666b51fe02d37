"""Search on a trained policy: oracle-scored beam search solves more held-out problems than one sample; greedy search
is `ponder generate` at temperature 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.sharding import make_mesh
from search.candidates import candidates, choose
from search.sampler import Sampling, decode_text, encode_prompts
from search.scorers import LogProbScorer, OracleScorer
from search.sharded import run_search
from search.spec import SearchSpec
from search.state import Models
from tasks import get_task
from tools.generate import jit_generate
from train.checkpoint import load_params
from train.data import get_vocabulary
from train.state import state_layout

NUM_PROBLEMS = 32


@pytest.fixture(scope="module")
def policy(trained_tiny_policy):
    """(config, state layout, params on one device, byte vocabulary) of the trained tiny policy."""
    cfg, run_dir = trained_tiny_policy
    layout = state_layout(cfg, make_mesh(cfg.mesh))
    # one device: on a 2-core machine this tiny model searches fastest unsharded (sharded search: test_search.py)
    params = jax.device_put(load_params(run_dir, layout.abstract["params"]), jax.devices()[0])
    return cfg, layout, params, get_vocabulary("byte")


def test_oracle_beam_search_beats_a_single_sample(policy):
    cfg, layout, params, vocab = policy
    task = get_task("arithmetic")
    problems = [task.generate(0, i, 2, "test") for i in range(NUM_PROBLEMS)]
    tokens, lengths = encode_prompts(vocab, [p.prompt for p in problems], 48)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(1), i) for i in range(NUM_PROBLEMS)])
    shape = dict(max_steps=5, max_step_tokens=24, max_len=176, page_size=8, sampling=Sampling(temperature=1.0))
    run = jax.jit(run_search, static_argnums=(0, 1))

    def solved(spec, scorer):
        models = Models(layout.graphdef, cfg.model, scorer)
        state, chosen = run(spec, models, params, None, jnp.asarray(tokens), jnp.asarray(lengths), keys)
        picks = [choose(row, "best") for row in candidates(spec, state, chosen, vocab)]
        return np.array([task.score(p, c.text)[0] if c else 0.0 for p, c in zip(problems, picks, strict=True)])

    single = solved(SearchSpec(strategy="sample", **shape), LogProbScorer())
    oracle = OracleScorer(vocab)  # ORACLE: the task's step checker scores each step (an upper bound)
    oracle.problems = problems
    beam = solved(SearchSpec(strategy="beam", n=3, m=3, **shape), oracle)
    print(f"single sample solved {single.sum():.0f}/{NUM_PROBLEMS}, oracle beam {beam.sum():.0f}/{NUM_PROBLEMS}")
    assert 0 < single.sum() < NUM_PROBLEMS  # the policy is trained, and not perfect
    assert beam.sum() > single.sum()


def test_greedy_search_is_generate_at_temperature_0_in_any_batch(policy):
    cfg, layout, params, vocab = policy
    problems = [get_task("arithmetic").generate(0, i, 2, "test") for i in range(8)]
    tokens, lengths = encode_prompts(vocab, [p.prompt for p in problems], 48)
    spec = SearchSpec(strategy="greedy", max_steps=5, max_step_tokens=24, max_len=176, page_size=8)
    models = Models(layout.graphdef, cfg.model, LogProbScorer())
    run = jax.jit(run_search, static_argnums=(0, 1))

    def greedy(order, seed):
        keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), i) for i in order])
        state, chosen = run(spec, models, params, None, jnp.asarray(tokens[order]), jnp.asarray(lengths[order]), keys)
        return {i: row[0] for i, row in zip(order, candidates(spec, state, chosen, vocab), strict=True)}

    searched = greedy(list(range(8)), seed=0)
    # another batch order and other keys: each problem's chain is the same
    assert {i: c.text for i, c in greedy(list(range(8))[::-1], seed=5).items()} == {
        i: c.text for i, c in searched.items()}
    out = jit_generate()(layout.graphdef, params, cfg.model, jnp.asarray(tokens), jnp.asarray(lengths),
                         jax.random.split(jax.random.key(0), 8), max_new_tokens=5 * 24,
                         sampling=Sampling(temperature=0.0), stop_ids=(vocab.eos_id,), page_size=8)
    generated = [decode_text(vocab, row) for row in np.asarray(out.tokens)]
    assert sum(c.finished for c in searched.values()) >= 6  # the policy ends its chains within 5 steps
    for i, cand in searched.items():  # a chain cut at max_steps is a prefix of the free-running one
        assert generated[i] == cand.text if cand.finished else generated[i].startswith(cand.text), i
