"""The RL learner: the policy's train state on the mesh and its two jitted functions.

    learner = Learner(cfg, mesh)
    width = learner.batch_width(longest)          # columns of a batch whose longest row has `longest` tokens
    logp = learner.logprobs(params, batch)        # [R, W] log p(target) under params (old policy, reference)
    state, metrics = learner.step(state, batch)   # one optimizer step on a minibatch (donates the state)
    state, metrics = learner.update(state, examples, step)  # an RL step's epochs x minibatches of TrainExamples
    reference = ReferenceModel(learner, params)   # the frozen policy of the KL term: its log-probs

Both are compiled ahead of time with explicit in/out shardings, like the SFT trainer's step:
params and optimizer state in the training layout (`state_layout`), batches split over the
batch axes. A batch is only as wide as its longest row needs, from a few widths: the full
one (rl.max_prompt_len + rl.max_new_tokens), its half, quarter, ... (multiples of
WIDTH_BUCKET), since prompts and completions are mostly far shorter than their limits. Each
function compiles once per (rows, width) it meets, so a long row costs one more compile
the first time a batch has one. The step sums gradients over `rl.microbatches` slices and
divides by the summed loss denominator, so the split never changes the update.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.schema import Config
from model.distributed import host_values
from model.sharding import batch_sharding, constrain
from train.optim import apply_gradients, learning_rate_schedule, zero_gradients
from train.rl_examples import TrainExamples
from train.rl_loss import LossSettings, policy_loss_sums, token_logprobs_and_entropy
from train.state import StateLayout, state_layout

TOKEN_FEATURES = ("tokens", "targets")  # int32 [B, W]
FLOAT_FEATURES = ("loss_mask", "old_logprobs", "ref_logprobs")  # float32 [B, W]
ROW_FEATURES = ("advantages", "weights")  # float32 [B]
WIDTH_BUCKET = 16  # batch widths are the full width or halvings of it rounded up to a multiple of this


def optimizer_steps(cfg: Config) -> int:
    """Optimizer steps of the whole RL run (what the learning-rate schedule spans)."""
    return cfg.rl.steps * cfg.rl.epochs * cfg.rl.minibatches


def learner_layout(cfg: Config, mesh: Mesh) -> StateLayout:
    """The train state layout with the optimizer's schedule over the RL run's optimizer steps."""
    steps = optimizer_steps(cfg)
    return state_layout(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})}), mesh)


def loss_settings(cfg: Config) -> LossSettings:
    rl = cfg.rl
    return LossSettings("grpo" if rl.algorithm == "grpo" else "sft", rl.clip_eps, rl.clip_eps_high, rl.kl_coef,
                        rl.kl_estimator, rl.loss_aggregation)


def _split(x: jax.Array, parts: int, rules) -> jax.Array:
    """[B, ...] -> [parts, B/parts, ...]; part m takes rows m, m + parts, ... (each spread over the devices)."""
    x = x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch", "length")[: x.ndim], rules)


class Learner:
    """Owns the layout and the compiled `logprobs` and `step` functions for batches of `rows` rows."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh, self.rules = cfg, mesh, cfg.rules()
        self.layout = learner_layout(cfg, mesh)
        self.settings = loss_settings(cfg)
        self.width = cfg.rl.max_prompt_len + cfg.rl.max_new_tokens
        self.compile_seconds = 0.0
        self._logprobs: dict = {}
        self._steps: dict = {}

    def batch_width(self, longest: int) -> int:
        """Columns of a batch whose longest row has `longest` tokens: the narrowest width of the
        full width, half of it, a quarter, ... (each rounded up to a multiple of WIDTH_BUCKET) that holds it."""
        width = self.width
        while (half := -(-width // 2 // WIDTH_BUCKET) * WIDTH_BUCKET) < width and half >= longest:
            width = half
        return width

    def batch_shardings(self, rows: int, width: int, names) -> dict:
        shard_2d = batch_sharding(self.mesh, self.rules, (rows, width))
        shard_1d = batch_sharding(self.mesh, self.rules, (rows,))
        return {name: shard_1d if name in ROW_FEATURES else shard_2d for name in names}

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host arrays -> global arrays split over the batch axes (single process)."""
        rows, width = batch["tokens"].shape
        shardings = self.batch_shardings(rows, width, batch)
        return {name: jax.device_put(value, shardings[name]) for name, value in batch.items()}

    def _abstract(self, rows: int, width: int, names) -> dict:
        shardings = self.batch_shardings(rows, width, names)
        def shape(name):
            return (rows,) if name in ROW_FEATURES else (rows, width)
        return {name: jax.ShapeDtypeStruct(shape(name), jnp.int32 if name in TOKEN_FEATURES else jnp.float32,
                                           sharding=shardings[name]) for name in names}

    def logprobs(self, params, batch: dict[str, jax.Array]) -> jax.Array:
        """log p(targets) [R, W] under `params` (in the training layout), in rl.microbatches slices."""
        rows, width = key = batch["tokens"].shape
        if key not in self._logprobs:
            graphdef, parts, rules = self.layout.graphdef, self.cfg.rl.microbatches, self.rules

            def logprobs(params, batch):
                model = nnx.merge(graphdef, params)

                def one(micro):
                    logits = model(micro["tokens"])
                    return token_logprobs_and_entropy(logits, micro["targets"])[0]

                out = jax.lax.map(one, {name: _split(batch[name], parts, rules) for name in TOKEN_FEATURES})
                return out.swapaxes(0, 1).reshape(rows, -1)

            abstract = self._abstract(rows, width, TOKEN_FEATURES)
            out_sharding = batch_sharding(self.mesh, self.rules, (rows, width))
            start = time.perf_counter()
            with jax.set_mesh(self.mesh):
                self._logprobs[key] = jax.jit(
                    logprobs, in_shardings=(self.layout.shardings["params"], _shardings(abstract)),
                    out_shardings=out_sharding,
                ).lower(self.layout.abstract["params"], abstract).compile()
            self.compile_seconds += time.perf_counter() - start
        with jax.set_mesh(self.mesh):
            return self._logprobs[key](params, {name: batch[name] for name in TOKEN_FEATURES})

    def step(self, state, batch: dict[str, jax.Array]):
        """One optimizer step on a minibatch; returns (new state, metrics). Donates `state`.

        A step whose loss or gradient norm is not finite leaves params and optimizer state as
        they were (`finite` = 0 in the metrics).
        """
        rows, width = key = batch["tokens"].shape
        if key not in self._steps:
            names = TOKEN_FEATURES + FLOAT_FEATURES + ROW_FEATURES
            abstract = self._abstract(rows, width, names)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            start = time.perf_counter()
            with jax.set_mesh(self.mesh):
                self._steps[key] = jax.jit(
                    self._make_step(), in_shardings=(self.layout.shardings, _shardings(abstract)),
                    out_shardings=(self.layout.shardings, replicated), donate_argnums=(0,),
                ).lower(self.layout.abstract, abstract).compile()
            self.compile_seconds += time.perf_counter() - start
        with jax.set_mesh(self.mesh):
            return self._steps[key](state, batch)

    def update(self, state, examples: TrainExamples | None, step: int) -> tuple[Any, list[dict[str, float]]]:
        """rl.epochs passes over `examples` in rl.minibatches optimizer steps; returns (state, each step's metrics).

        Each epoch shuffles the rows by (rl.seed, step, epoch), so a resumed run repeats the same
        minibatches; minibatch m takes the shuffled rows m, m + minibatches, ... No examples: no step.
        """
        rl, metrics = self.cfg.rl, []
        batch = examples.features() if examples is not None else {}
        for epoch in range(rl.epochs if examples is not None else 0):
            order = np.random.default_rng([rl.seed, step, epoch]).permutation(examples.rows)
            for m in range(rl.minibatches):
                picked = order[m :: rl.minibatches]
                state, step_metrics = self.step(state, self.put({k: v[picked] for k, v in batch.items()}))
                metrics.append(step_metrics)
        return state, [{k: float(v) for k, v in m.items()} for m in host_values(metrics)]

    def _make_step(self):
        graphdef, optimizer, settings = self.layout.graphdef, self.layout.optimizer, self.settings
        parts, rules = self.cfg.rl.microbatches, self.rules
        schedule = optimizer_schedule(self.cfg)

        def sums(params, micro):
            model = nnx.merge(graphdef, params)
            logp, entropy = token_logprobs_and_entropy(model(micro["tokens"]), micro["targets"])
            out = policy_loss_sums(logp, micro["old_logprobs"], micro["ref_logprobs"], micro["advantages"],
                                   micro["weights"], micro["loss_mask"], settings)
            mask = micro["loss_mask"] * (micro["weights"][:, None] > 0)
            out["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * mask)
            return out["loss"], out

        def step(state, batch):
            params = state["params"]

            def accumulate(carry, micro):
                grads, totals = carry
                (_, out), micro_grads = jax.value_and_grad(sums, has_aux=True)(params, micro)
                grads = jax.tree.map(lambda g, m: g + m.astype(g.dtype), grads, micro_grads)
                return (grads, jax.tree.map(jnp.add, totals, out)), None

            zero_sums = {k: jnp.zeros(()) for k in ("loss", "denominator", "tokens", "kl", "clipped", "ratio",
                                                    "entropy")}
            carry = (zero_gradients(params, state["opt_state"]), zero_sums)
            (grads, totals), _ = jax.lax.scan(accumulate, carry, jax.tree.map(lambda x: _split(x, parts, rules), batch))
            denominator = jnp.maximum(totals["denominator"], 1.0)
            grads = jax.tree.map(lambda g: g / denominator, grads)
            loss, grad_norm = totals["loss"] / denominator, optax.tree.norm(grads)
            new_params, opt_state = apply_gradients(optimizer, grads, state["opt_state"], params)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            new_state = {"params": jax.tree.map(keep, new_params, params),
                         "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]), "step": state["step"] + 1}
            tokens = jnp.maximum(totals["tokens"], 1.0)
            metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
                       "kl": totals["kl"] / tokens, "clip_fraction": totals["clipped"] / tokens,
                       "ratio": totals["ratio"] / tokens, "entropy": totals["entropy"] / tokens,
                       "trained_tokens": totals["tokens"], "finite": finite.astype(jnp.float32)}
            return new_state, metrics

        return step


def _shardings(abstract: dict) -> dict:
    return {name: spec.sharding for name, spec in abstract.items()}


def optimizer_schedule(cfg: Config):
    """The learning rate at each optimizer step of the RL run."""
    return learning_rate_schedule(cfg.optimizer, optimizer_steps(cfg))


class ReferenceModel:
    """The frozen policy the KL term pulls towards: its params (training layout, never updated) and log-probs."""

    def __init__(self, learner: Learner, params: Any):
        self.learner, self.params = learner, params

    def logprobs(self, batch: dict[str, jax.Array]) -> jax.Array:
        """log p(targets) [R, W] under the reference, by the learner's compiled function."""
        return self.learner.logprobs(self.params, batch)
