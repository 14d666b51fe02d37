"""The step tree and the search strategies: invariants, paged paths vs dense forward, determinism."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.load import load_config
from model.transformer import create_model
from search.beam import beam_order, duplicates
from search.candidates import candidates, choose
from search.sampler import Sampling, encode_prompts
from search.scorers import LogProbScorer, RewardModelScorer
from search.sharded import run_search
from search.spec import SearchSpec, resolve
from search.state import Models
from search.tree import allocate, check_invariants, empty_tree, path_tokens, release
from train.data import get_vocabulary

PROMPTS = ["Compute: 1 + 2\n", "Compute: (3 * 4) - 5 + 6\n", "Numbers: 3 5 7\nTarget: 15\n"]
SPECS = {
    "sample": SearchSpec(strategy="sample"),
    "greedy": SearchSpec(strategy="greedy"),  # temperature 1 asked for (`_spec`): greedy decodes at 0 all the same
    "best_of_n": SearchSpec(strategy="best_of_n", n=3),
    "beam": SearchSpec(strategy="beam", n=2, m=3),
    "dvts": SearchSpec(strategy="dvts", n=4, m=2),
    "mcts": SearchSpec(strategy="mcts", children=3, simulations=8, wave=2),
    # a budget-sized MCTS can ask for fewer simulations than a wave: it must still finish its path
    "mcts_one_simulation": SearchSpec(strategy="mcts", children=3, simulations=1, wave=4),
}
SHAPE = dict(max_steps=5, max_step_tokens=10, max_len=128, page_size=8)


@pytest.fixture(scope="module")
def policy():
    cfg = load_config("configs/models/tiny.yaml")
    graphdef, params = nnx.split(create_model(cfg.model, cfg.rules(), seed=0))
    return cfg, graphdef, params


@pytest.fixture(scope="module")
def vocab():
    return get_vocabulary("byte")


RUN = jax.jit(run_search, static_argnums=(0, 1))
LOGPROB = LogProbScorer()
_RESULTS: dict = {}


def _run(policy, vocab, spec, prompts=PROMPTS, seeds=None, scorer=None, scorer_params=None):
    """The search's (state, chosen); plain log-prob runs are computed once per module."""
    cfg, graphdef, params = policy
    seeds = tuple(range(len(prompts)) if seeds is None else seeds)
    cache_key = (spec, tuple(prompts), seeds) if scorer is None else None
    if cache_key in _RESULTS:
        return _RESULTS[cache_key]
    tokens, lengths = encode_prompts(vocab, prompts, 40)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(0), s) for s in seeds])
    models = Models(graphdef, cfg.model, scorer or LOGPROB)
    result = RUN(spec, models, params, scorer_params, jnp.asarray(tokens), jnp.asarray(lengths), keys)
    if cache_key is not None:
        _RESULTS[cache_key] = result
    return result


def _spec(name, **changes):
    return dataclasses.replace(SPECS[name], **{**SHAPE, "sampling": Sampling(temperature=1.0), **changes})


def _inputs(policy, vocab):
    cfg, graphdef, params = policy
    tokens, lengths = encode_prompts(vocab, PROMPTS, 40)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(0), s) for s in range(len(PROMPTS))])
    return Models(graphdef, cfg.model, LOGPROB), params, None, jnp.asarray(tokens), jnp.asarray(lengths), keys


@pytest.mark.parametrize("name", list(SPECS))
def test_tree_invariants_hold_no_page_leaks_and_runs_repeat(policy, vocab, name):
    state, chosen = _run(policy, vocab, _spec(name))
    assert check_invariants(state.tree) == []
    tree = state.tree
    assert not bool(tree.out_of_room.any())
    assert (np.asarray(tree.node_count) > 1 + SHAPE["max_steps"] - 2).all()
    # the stats count what the tree holds, and every problem ends with at least one finished chain
    step_tokens = np.asarray(tree.step_len).sum(axis=1)
    assert np.allclose(np.asarray(state.tokens), step_tokens)
    cands = candidates(_spec(name), state, chosen, vocab)
    assert all(any(c.finished for c in row) for row in cands)
    again, _ = RUN(_spec(name), *_inputs(policy, vocab))  # same seed: the same tree, bit for bit
    for a, b in zip(jax.tree.leaves(state.tree), jax.tree.leaves(again.tree), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_beam_search_reuses_pruned_pages(policy, vocab):
    """With a pool too small to keep every node's pages, beam search still finishes: pruned pages are reused."""
    spec = _spec("beam")
    full, _ = _run(policy, vocab, spec)
    created = int(np.asarray(full.tree.node_count).sum())
    small = dataclasses.replace(spec, num_pages=created)  # one page per node; a step can span two
    state, _ = _run(policy, vocab, small)
    assert check_invariants(state.tree) == []
    assert not bool(state.tree.out_of_room.any())
    np.testing.assert_array_equal(np.asarray(state.tree.tokens), np.asarray(full.tree.tokens))


def test_beam_ranks_a_repeated_step_after_every_distinct_one():
    tree = empty_tree(batch=1, num_nodes=8, max_children=4, max_step_tokens=4, pages_per_node=1, pages_per_path=2,
                      num_pages=8)
    # node: parent, step tokens (only the first step_len count)
    nodes = {1: (0, [5, 6, 0, 0], 2), 2: (0, [5, 6, 9, 9], 2), 3: (0, [5, 7, 0, 0], 2), 4: (1, [5, 6, 0, 0], 2),
             5: (1, [5, 6, 1, 0], 3), 6: (1, [5, 6, 0, 0], 2)}
    for n, (parent, tokens, length) in nodes.items():
        tree = dataclasses.replace(tree, parent=tree.parent.at[0, n].set(parent),
                                   tokens=tree.tokens.at[0, n].set(jnp.array(tokens)),
                                   step_len=tree.step_len.at[0, n].set(length))
    children = jnp.array([[[1, 2, 3, 4, 5, 6]]])
    everyone = jnp.ones((1, 1, 6), bool)
    # 2 repeats 1 (same parent, same first two tokens); 6 repeats 4; 4 has another parent, 5 another length
    assert duplicates(tree, children, everyone).tolist() == [[[False, True, False, False, False, True]]]
    # a child that is not open is nobody's original: 2 is then the first of its kind
    assert duplicates(tree, children, everyone.at[0, 0, 0].set(False)).tolist()[0][0][:2] == [False, False]

    scores = jnp.array([[[0.5, 0.9, 0.1, 0.3, 0.2, 0.8]]])
    repeat = duplicates(tree, children, everyone)
    open_ = everyone.at[0, 0, 2].set(False)  # child 3 is terminal or pruned
    # distinct open children by score (1, 4, 5), then the repeats by score (2, 6), then the closed one (3)
    assert beam_order(scores, repeat, open_).tolist() == [[[0, 3, 4, 1, 5, 2]]]


def test_allocator_grants_in_order_and_refuses_what_does_not_fit():
    free = jnp.ones((10,), bool).at[jnp.array([1, 4])].set(False)
    pages, granted, free_after = allocate(free, jnp.array([3, 0, 4, 2]), 4)
    assert granted.tolist() == [True, True, True, False]
    taken = np.asarray(pages)[np.asarray(pages) >= 0]
    assert sorted(taken.tolist()) == [0, 2, 3, 5, 6, 7, 8]
    assert int(free_after.sum()) == 1
    assert int(release(free_after, pages).sum()) == 8


@pytest.mark.parametrize("name", ["best_of_n", "mcts", "greedy"])
def test_a_problem_does_not_depend_on_the_rest_of_its_batch(policy, vocab, name):
    spec = _spec(name)
    batch, chosen_batch = _run(policy, vocab, spec)
    alone, chosen_alone = _run(policy, vocab, spec, prompts=[PROMPTS[1]], seeds=[1])
    texts = lambda state, chosen, b: [c.text for c in candidates(spec, state, chosen, vocab)[b]]  # noqa: E731
    assert texts(alone, chosen_alone, 0) == texts(batch, chosen_batch, 1)
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(batch.tokens)[1])


def test_greedy_is_one_chain_at_temperature_0_whatever_the_seed_or_the_asked_temperature(policy, vocab):
    spec = resolve(_spec("greedy", n=4))
    assert (spec.n, spec.sampling) == (1, Sampling(0.0))
    assert resolve(_spec("greedy", sampling=Sampling(0.7, top_k=5))) == spec  # one compiled program
    texts = lambda spec, state, chosen: [[c.text for c in row] for row in candidates(spec, state, chosen, vocab)]  # noqa: E731
    first = texts(spec, *_run(policy, vocab, _spec("greedy")))  # asks for temperature 1
    assert all(len(row) == 1 for row in first)
    assert texts(spec, *_run(policy, vocab, _spec("greedy"), seeds=[7, 8, 9])) == first
    # temperature 1 does sample (else the checks above say nothing)
    assert texts(_spec("sample"), *_run(policy, vocab, _spec("sample"))) != first


def _live_contexts(state, vocab):
    """(b, node, context tokens) for every node that still holds its pages."""
    tree = jax.tree.map(np.asarray, state.tree)
    prompt_tokens, lengths = encode_prompts(vocab, PROMPTS, 40)
    out = []
    for b in range(len(PROMPTS)):
        for n in range(int(tree.node_count[b])):
            if tree.alive[b, n] and (tree.own_pages[b, n] >= 0).any():
                out.append((b, n, prompt_tokens[b, : lengths[b]].tolist() + path_tokens(tree, b, n)))
    return tree, out


def _dense(model_fn, contexts, width=128):
    """model_fn(tokens [R, width]) at each context's last position, in one jitted call."""
    tokens = np.zeros((len(contexts), width), np.int32)
    for row, context in enumerate(contexts):
        tokens[row, : len(context)] = context
    last = np.array([len(c) - 1 for c in contexts])
    return np.asarray(jax.jit(model_fn)(jnp.asarray(tokens)))[np.arange(len(contexts)), last]


@pytest.mark.parametrize("name", ["best_of_n", "beam"])
def test_paths_through_pages_match_a_dense_forward(policy, vocab, name):
    """Every live node's next-token logits from its pages equal the full forward over its path's text."""
    cfg, graphdef, params = policy
    state, _ = _run(policy, vocab, _spec(name))
    tree, nodes = _live_contexts(state, vocab)
    assert len(nodes) >= 2 * len(PROMPTS)
    dense = _dense(nnx.merge(graphdef, params), [context for _, _, context in nodes])
    b, n = np.array([x[0] for x in nodes]), np.array([x[1] for x in nodes])
    kv_len = tree.kv_len[b, n]
    np.testing.assert_array_equal(kv_len, [len(context) - 1 for _, _, context in nodes])

    @jax.jit
    def paged(pending, kv_len, table, cache):
        return nnx.merge(graphdef, params).decode(pending[:, None], kv_len[:, None], table, kv_len, cache)[0][:, 0]

    got = paged(jnp.asarray(tree.pending[b, n]), jnp.asarray(kv_len), jnp.asarray(tree.page_table[b, n]), state.cache)
    np.testing.assert_allclose(np.asarray(got), dense, atol=1e-5)


def test_reward_model_scorer_scores_steps_incrementally(policy, vocab):
    """The reward head read through the scorer's own pages equals the head on the full sequence."""
    cfg = load_config("configs/models/tiny.yaml", ["model.value_head=true", "model.num_layers=1"])
    reward = create_model(cfg.model, cfg.rules(), seed=3)
    graphdef, params = nnx.split(reward)
    state, _ = _run(policy, vocab, _spec("beam"), scorer=RewardModelScorer(graphdef, cfg.model), scorer_params=params)
    tree = jax.tree.map(np.asarray, state.tree)
    prompt_tokens, lengths = encode_prompts(vocab, PROMPTS, 40)
    nodes = [(b, n) for b in range(len(PROMPTS)) for n in range(1, int(tree.node_count[b]))]
    contexts = [prompt_tokens[b, : lengths[b]].tolist() + path_tokens(tree, b, n) for b, n in nodes]
    expected = _dense(lambda tokens: jax.nn.sigmoid(reward.value(reward.hidden(tokens))), contexts)
    got = np.array([tree.score[b, n] for b, n in nodes])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_selection_rules():
    from search.candidates import Candidate

    cands = [
        Candidate(1, "", "7", 0.9, -1.0, True),
        Candidate(2, "", "5", 0.2, -1.0, True),
        Candidate(3, "", "5", 0.3, -1.0, True),
        Candidate(4, "", None, 1.0, -1.0, False),
    ]
    assert choose(cands, "majority").answer == "5"
    assert choose(cands, "best").answer == "7"
    assert choose(cands, "weighted").answer == "7"  # 0.9 > 0.2 + 0.3
    assert choose([Candidate(4, "", None, 1.0, -1.0, False)], "majority").node == 4


@pytest.mark.parametrize("name,scorer", [("beam", "logprob"), ("mcts", "oracle"), ("beam", "checker")])
def test_search_sharded_over_the_batch_axes_matches_one_device(vocab, name, scorer):
    """On a (2,2,2) mesh each of the 4 (data x fsdp) shards searches its own problems in its own
    page pool (params split over tensor inside), and every problem ends exactly as on one device.
    The host callbacks (oracle, checker) run inside the shards and are told each step's problem."""
    from model.sharding import make_mesh
    from search.scorers import CheckerScorer, OracleScorer
    from tasks import get_task

    cfg = load_config("configs/models/tiny.yaml", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = make_mesh(cfg.mesh)
    task = get_task("arithmetic")
    problems = [task.generate(0, i, 2, "test") for i in range(8)]
    tokens, lengths = encode_prompts(vocab, [p.prompt for p in problems], 40)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(0), i) for i in range(8)])
    inputs = (jnp.asarray(tokens), jnp.asarray(lengths), keys)
    spec = _spec(name)
    score = LOGPROB
    if scorer != "logprob":  # the scorer's host callback, reporting which problem each step came from
        class RowScorer({"oracle": OracleScorer, "checker": CheckerScorer}[scorer]):
            def _host_score(self, tree_index, *rest):
                return np.asarray(tree_index, np.float32)

        score = RowScorer(vocab)
    graphdef, params = nnx.split(create_model(cfg.model, cfg.rules(), seed=0))
    one, chosen_one = RUN(spec, Models(graphdef, cfg.model, score), params, None, *inputs)
    graphdef, sharded = nnx.split(create_model(cfg.model, cfg.rules(), seed=0, mesh=mesh))
    assert any("tensor" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(sharded))
    with jax.set_mesh(mesh):
        split, chosen_split = RUN(spec, Models(graphdef, cfg.model, score), sharded, None, *inputs)
    assert split.tree.tokens.sharding.spec[0] == ("data", "fsdp")
    assert split.tree.tokens.sharding.shard_shape(split.tree.tokens.shape)[0] == 2
    assert split.cache.k.sharding.shard_shape(split.cache.k.shape)[2] == one.cache.num_pages // 4
    ends = [candidates(spec, state, chosen, vocab) for state, chosen in ((split, chosen_split), (one, chosen_one))]
    assert [[c.text for c in row] for row in ends[0]] == [[c.text for c in row] for row in ends[1]]
    # scores agree to float rounding: tensor-split matmuls sum in another order
    np.testing.assert_allclose([c.score for row in ends[0] for c in row], [c.score for row in ends[1] for c in row],
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(one.tokens))
    if scorer != "logprob":  # every shard's callback named each step's problem by its row in the whole batch
        tree = jax.tree.map(np.asarray, split.tree)
        for b in range(8):
            assert (tree.score[b, 1 : tree.node_count[b]] == b).all()
    for shard in range(4):  # each shard's trees hold pages of its own pool only
        tree = jax.tree.map(lambda a, s=shard: np.asarray(a)[2 * s : 2 * s + 2], split.tree)
        assert check_invariants(dataclasses.replace(tree, free=np.asarray(split.tree.free)[
            shard * len(split.tree.free) // 4 : (shard + 1) * len(split.tree.free) // 4])) == []


def test_the_strategy_table_sizes_every_strategy_and_a_budget_buys_more_search():
    from search.sharded import RUNS
    from search.spec import STRATEGIES, resolve, size_for_budget

    assert RUNS.keys() == STRATEGIES.keys()  # every strategy in the table runs, and nothing else does
    sizes = {"sample": ("n=1", "n=1"), "greedy": ("n=1", "n=1"), "best_of_n": ("n=3", "n=3"),
             "beam": ("n=2 m=3", "beams=2 m=3"),
             "dvts": ("n=4 m=2", "n=4 m=2"), "mcts": ("simulations=8 children=3 wave=2", "sims=8 k=3 wave=2")}
    for name, (long, short) in sizes.items():
        spec = resolve(_spec(name))
        strategy = STRATEGIES[name]
        assert (strategy.size(spec), strategy.size(spec, short=True)) == (long, short)
        # the tree holds what the strategy makes: the root, each expansion's children, the steps to finish
        assert spec.num_nodes > spec.max_children >= 1 and strategy.expansion_rows(spec) >= 1
        small, large = (size_for_budget(spec, budget, tokens_per_chain=40.0, steps_per_chain=4.0)
                        for budget in (40.0, 4000.0))
        assert small.keys() == large.keys() <= {field for field, _ in strategy.knobs}
        assert all(large[k] >= small[k] for k in small) and (name in ("sample", "greedy") or large != small)
    with pytest.raises(ValueError, match="dvts: n"):
        resolve(SearchSpec(strategy="dvts", n=5, m=2))
    with pytest.raises(ValueError, match="unknown strategy"):
        resolve(SearchSpec(strategy="argmax"))
