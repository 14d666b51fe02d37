"""Scorers: a score in [0, 1] for each newly generated step, read from the node's pages.

    logprob   the policy's own confidence: exp(mean token log-prob of the step); no extra model
    reward    the scalar head of a ponder transformer (a PRM), fed only the step's tokens
              against its own page pool (same page ids as the policy's), so the prefix is
              never re-read: sigmoid(value) at the step's last token
    oracle    ORACLE, for tests and upper bounds only: the task's step checker (and verifier
              for the answer line) run on the host through `jax.pure_callback`, given the
              whole problem, reference answer included
    checker   a prompt-only verifier, legitimate at test time: the task's step checker and
              verifier that read only the prompt (countdown's numbers and target, sudoku's
              givens), on the host like the oracle; given prompts, never a reference answer
              (a task whose checking needs the reference, arithmetic, is refused)

The host-callback scorers (oracle, checker) are handed each search call's rows by `bind`; they
cannot be exported, and a sharded search runs them with every mesh axis manual.

A scorer is static configuration; its parameters travel separately (`params`) so the
jitted search does not recompile when they change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.flops import decode_flops
from model.paged import PagedKVCache, init_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Steps:
    """The rows of one expansion: each row is a new node's step.

    page_table [R, P]: the new node's path pages; start [R]: slots cached before the step;
    parent_pending [R]: the parent's last token (fed first); tokens, logprobs [R, S]; num [R];
    active [R]; tree_index [R]: which problem. Scorers that need the text of the path so far
    (`needs_path`) also get the ancestors' step tokens and lengths ([R, D, S], [R, D]).
    """

    page_table: jax.Array
    start: jax.Array
    parent_pending: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    num: jax.Array
    active: jax.Array
    tree_index: jax.Array


class Scorer:
    """The interface. `cache` is the scorer's own page pool (None when it needs none)."""

    name = "none"
    oracle = False  # reads the reference answer: accuracy with it is an upper bound, not a result
    host_callback = False  # scores on the host (jax.pure_callback): needs `bind` before each search call
    needs_path = False

    def check_problems(self, problems: list) -> None:
        """Raises ValueError if this scorer cannot score these `tasks.Problem`s (call before searching)."""

    def bind(self, problems: list) -> None:
        """Hands a host-callback scorer the `tasks.Problem` of each row of the next search call's whole batch."""

    def init_cache(self, num_pages: int, page_size: int) -> PagedKVCache | None:
        return None

    def prefill(self, params, cache, prompts, page_table, lengths):
        return cache

    def copy(self, cache, sources, targets):
        return cache if cache is None else cache.copy_pages(sources, targets)

    def score(self, params, cache, steps: Steps, path=None) -> tuple[jax.Array, Any]:
        raise NotImplementedError

    def flops(self, start: jax.Array, num: jax.Array) -> jax.Array:
        """Model FLOPs of scoring steps of `num` tokens starting at slot `start` (0 without a model)."""
        return jnp.zeros(start.shape, jnp.float32)


class LogProbScorer(Scorer):
    """exp(mean log-prob) of the step's tokens under the policy: free, and a weak signal."""

    name = "logprob"

    def score(self, params, cache, steps, path=None):
        mean = jnp.sum(steps.logprobs, axis=-1) / jnp.maximum(steps.num, 1)
        return jnp.exp(mean), cache


class RewardModelScorer(Scorer):
    """A ponder transformer with `model.value_head`; sigmoid of its head at each step's last token."""

    name = "reward"

    def __init__(self, graphdef: nnx.GraphDef, model_cfg):
        self.graphdef, self.model_cfg = graphdef, model_cfg

    def init_cache(self, num_pages, page_size):
        return init_cache(self.model_cfg, num_pages, page_size)

    def prefill(self, params, cache, prompts, page_table, lengths):
        model = nnx.merge(self.graphdef, params)
        _, cache = model.prefill(prompts, page_table, cache, lengths - 1)
        return cache

    def score(self, params, cache, steps, path=None):
        model = nnx.merge(self.graphdef, params)
        tokens = jnp.concatenate([steps.parent_pending[:, None], steps.tokens], axis=1)  # [R, S + 1]
        positions = steps.start[:, None] + jnp.arange(tokens.shape[1])[None, :]
        num_new = jnp.where(steps.active, steps.num + 1, 0)
        hidden, cache = model.decode_hidden(tokens, positions, steps.page_table, steps.start, cache, num_new)
        last = jnp.take_along_axis(hidden, steps.num[:, None, None].clip(0, tokens.shape[1] - 1), axis=1)
        return jax.nn.sigmoid(model.value(last)[:, 0]), cache

    def flops(self, start, num):
        return decode_flops(self.model_cfg, start, num + 1)


class _HostScorer(Scorer):
    """A step scorer run on the host: each active row's chain is decoded to text and judged by `_judge`.

    A sharded search passes each row's index in the whole batch (`Steps.tree_index`), the
    index into what `bind` was given.
    """

    host_callback = True
    needs_path = True

    def __init__(self, vocab):
        self.vocab = vocab

    def _judge(self, row: int, text: str, is_answer: bool) -> float:
        """The score of the last line of `text` (the chain so far, without the prompt) for batch row `row`."""
        raise NotImplementedError

    def _host_score(self, tree_index, path, path_len, tokens, num, active):
        from search.sampler import decode_text
        from tasks.base import ANSWER_PREFIX

        tree_index, path, path_len, tokens, num, active = (
            np.asarray(x) for x in (tree_index, path, path_len, tokens, num, active)
        )
        scores = np.zeros(tree_index.shape, np.float32)
        for r in range(tree_index.shape[0]):
            if not active[r]:
                continue
            ids = [t for d in range(path.shape[1]) for t in path[r, d, : path_len[r, d]].tolist()]
            ids += tokens[r, : num[r]].tolist()  # numpy: never touch jax arrays inside a callback
            step = decode_text(self.vocab, tokens[r, : num[r]])
            scores[r] = self._judge(int(tree_index[r]), decode_text(self.vocab, ids), step.startswith(ANSWER_PREFIX))
        return scores

    def score(self, params, cache, steps, path=None):
        path_tokens, path_len = path
        result = jax.pure_callback(
            self._host_score,
            jax.ShapeDtypeStruct(steps.num.shape, jnp.float32),
            steps.tree_index, path_tokens, path_len, steps.tokens, steps.num, steps.active,
        )
        return result, cache


class OracleScorer(_HostScorer):
    """ORACLE (tests and upper bounds only): the task's own step checker and verifier, on the host.

    Set `problems` (one `tasks.Problem` per row of the whole batch, e.g. by `bind`) before each
    search call. A step scores 1.0 if the checker accepts it given the path so far (the answer
    line: if the verifier accepts the answer), else 0.0.
    """

    name = "oracle"
    oracle = True

    def __init__(self, vocab):
        super().__init__(vocab)
        self.problems: list = []

    def bind(self, problems):
        self.problems = list(problems)

    def _judge(self, row, text, is_answer):
        from tasks import get_task

        problem = self.problems[row]
        task = get_task(problem.task)
        if is_answer:
            return task.score(problem, text)[0]
        labels = task.check_steps(problem, text)
        return float(labels[-1]) if labels else 0.0


class CheckerScorer(_HostScorer):
    """A prompt-only verifier (legitimate at test time): the task's checks that read only the prompt, on the host.

    Set `prompts` (one `(task name, prompt text)` per row of the whole batch; `bind` takes just
    those from Problems and refuses a prompt the task cannot check) before each search call.
    It holds nothing else of a problem, so it cannot read a reference answer. A step scores 1.0
    if `check_steps_from_prompt` accepts it given the path so far (the answer line: if
    `score_from_prompt` does), else 0.0.
    """

    name = "checker"

    def __init__(self, vocab):
        super().__init__(vocab)
        self.prompts: list[tuple[str, str]] = []

    def check_problems(self, problems):
        from tasks import get_task

        for problem in problems:
            error = get_task(problem.task).prompt_error(problem.prompt)
            if error:
                raise ValueError(f"search.scorer=checker (a prompt-only verifier) cannot score {problem.task} "
                                 f"problem {problem.id or repr(problem.prompt)}: {error}")

    def bind(self, problems):
        self.check_problems(problems)
        self.prompts = [(problem.task, problem.prompt) for problem in problems]

    def _judge(self, row, text, is_answer):
        from tasks import get_task

        name, prompt = self.prompts[row]
        task = get_task(name)
        if is_answer:
            return task.score_from_prompt(prompt, text)[0]
        labels = task.check_steps_from_prompt(prompt, text)
        return float(labels[-1]) if labels else 0.0


def make_scorer(name: str, *, vocab=None, reward_graphdef=None, reward_cfg=None) -> Scorer:
    """The scorer `name` (search.scorer); oracle and checker need `vocab`, reward its model."""
    if name == "logprob":
        return LogProbScorer()
    if name == "oracle":
        return OracleScorer(vocab)
    if name == "checker":
        return CheckerScorer(vocab)
    if name == "reward":
        if reward_graphdef is None:
            raise ValueError("search.scorer=reward needs a reward model (search.reward_checkpoint)")
        return RewardModelScorer(reward_graphdef, reward_cfg)
    raise ValueError(f"unknown scorer {name!r}; expected logprob, reward, oracle or checker")
