"""Search distillation for expert iteration: a tree search per prompt, its chain kept when it verifies.

    distiller = SearchDistiller(cfg, mesh, vocab, rollout_graphdef)
    chains, found, metrics = distiller(rollout_params, problems, key, stream_indices)

The search is `search.sharded.run_search` with `search.*` settings and `rl.search` as the
strategy, one jitted call for all the step's prompts, on the policy's rollout-layout params.
The chain the strategy picks (by search.select) joins the SFT batch when the task's verifier
accepts it: that is how search is distilled into the policy (STaR with a search teacher).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from configs.schema import Config
from model.distributed import host_values
from search.candidates import Candidate, candidates, pick_answer
from search.sampler import encode_prompts
from search.scorers import make_scorer
from search.sharded import run_search
from search.spec import spec_from_config
from search.state import Models
from tasks import get_task
from tasks.base import Problem


class SearchDistiller:
    """Runs rl.search on a step's prompts and returns the verified chains as completions to train on."""

    def __init__(self, cfg: Config, mesh, vocab, graphdef):
        if cfg.search.scorer not in ("logprob", "oracle", "checker"):
            raise ValueError(f"rl.search uses search.scorer logprob, oracle or checker, not {cfg.search.scorer!r}")
        if cfg.search.scorer == "checker":  # refused now, not at the first RL step's search
            for task in {get_task(name.split("_")[0]) for name in cfg.data.mixture if name != "text"}:  # TASK_dN_STYLE
                if not task.checks_from_prompt:
                    raise ValueError(f"search.scorer=checker (a prompt-only verifier) cannot score the "
                                     f"data.mixture task {task.prompt_error('')}")
        if cfg.rl.max_prompt_len + cfg.search.max_step_tokens + 1 > cfg.search.max_len:
            raise ValueError(f"search.max_len ({cfg.search.max_len}) leaves no room for a step after a prompt of "
                             f"rl.max_prompt_len ({cfg.rl.max_prompt_len})")
        self.cfg, self.mesh, self.vocab = cfg, mesh, vocab
        self.spec = spec_from_config(cfg.search, vocab, strategy=cfg.rl.search)
        self.models = Models(graphdef, cfg.model, make_scorer(cfg.search.scorer, vocab=vocab))
        self.search = jax.jit(run_search, static_argnums=(0, 1))

    def __call__(self, params, problems: list[Problem], key: jax.Array, stream_indices: list[int]):
        """(token arrays to train on, found [P] bool, metrics); a chain that does not verify is kept out."""
        tokens, lengths = encode_prompts(self.vocab, [p.prompt for p in problems], self.cfg.rl.max_prompt_len)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, np.asarray(stream_indices, np.uint32))
        self.models.scorer.bind(problems)  # the host-callback scorers (oracle, checker) read each row's problem
        with jax.set_mesh(self.mesh):
            state, chosen = self.search(self.spec, self.models, params, None, tokens, lengths, keys)
        # every host reads every problem's result (gathered on a pod); the page pools stay on device
        state, chosen = host_values((dataclasses.replace(state, cache=None, scorer_cache=None), chosen))
        per_problem = candidates(self.spec, state, chosen, self.vocab)
        chains, found = verified_chains(problems, per_problem, self.cfg.search.select, self.vocab,
                                        self.cfg.rl.max_new_tokens)
        generated = float(state.tokens.mean())
        return chains, found, {"search_found": float(found.mean()), "search_tokens": generated}


def verified_chains(problems: list[Problem], per_problem: list[list[Candidate]], select: str, vocab,
                    max_new_tokens: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Each problem's chosen chain as tokens (+ EOS, at most max_new_tokens), and found [P]: it finished and verifies.

    The choice is `ponder search`'s (`pick_answer`: votes by the task's answer key).
    """
    chains, found = [], np.zeros(len(problems), bool)
    for p, (problem, cands) in enumerate(zip(problems, per_problem, strict=True)):
        pick, correct = pick_answer(problem, cands, select)
        found[p] = bool(pick and pick.finished and correct)
        ids = list(vocab.encode(pick.text if pick else "")) + [vocab.eos_id]
        chains.append(np.asarray(ids[:max_new_tokens], np.int32))
    return chains, found
