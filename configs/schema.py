"""Typed schema of a ponder config: every key a YAML file may set, with its type and limits.

`configs/load.py` reads YAML (with `base:` inheritance and dotted overrides) and validates
it against `Config`; unknown keys, wrong types and impossible values are errors.

Every default lives here, the logical axis rules included: code builds sections directly
(`MeshConfig(data=2)`), so the schema needs them anyway, and a YAML file that names no base
gets the same ones. base.yaml documents each; tests/test_config.py names any key that differs.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor")


class Strict(BaseModel):
    """A config section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RopeScaling(Strict):
    """Llama 3's rotary frequency scaling (HF `rope_scaling` with `rope_type: llama3`).

    Wavelengths longer than original_max_position_embeddings / low_freq_factor are divided
    by `factor`, those shorter than .../high_freq_factor are kept, and the band between is
    interpolated smoothly.
    """

    rope_type: Literal["llama3"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, gt=0)

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling: high_freq_factor ({self.high_freq_factor}) must exceed "
                             f"low_freq_factor ({self.low_freq_factor})")
        return self


class ModelConfig(Strict):
    """Shapes and numerics of the Llama-style decoder."""

    vocab_size: int = Field(384, gt=0)
    num_layers: int = Field(2, gt=0)
    embed_dim: int = Field(128, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    head_dim: int | None = Field(None, gt=0)
    mlp_dim: int = Field(384, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    max_seq_len: int = Field(512, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "full", "save_dots", "save_qkv_proj", "save_qkv_attention"] = "none"
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    decode_attention: Literal["auto", "xla", "pallas"] = "auto"
    loss_vocab_chunk: int = Field(0, ge=0)
    value_head: bool = False

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) is not divisible by num_heads ({self.num_heads}); set head_dim"
            )
        if self.loss_vocab_chunk and self.vocab_size % self.loss_vocab_chunk:
            raise ValueError(f"loss_vocab_chunk ({self.loss_vocab_chunk}) must divide vocab_size ({self.vocab_size})")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads


class MeshConfig(Strict):
    """Device mesh sizes; -1 fills the devices left over (at most one axis may say -1)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _check_sizes(self) -> MeshConfig:
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{axis} must be a positive size or -1 (fill), got {size}")
        if sum(size == -1 for size in sizes.values()) > 1:
            raise ValueError("at most one mesh axis may be -1 (fill the remaining devices)")
        return self


MeshAxes = Literal["data", "fsdp", "tensor"]

# A mixture component: a reasoning task at a difficulty in a trace style, or `text` (data.text_files).
COMPONENT_PATTERN = r"^(text|[a-z]+_d[0-9]+_[a-z]+)$"


class DataConfig(Strict):
    """The seqio input pipeline: what to read, how to tokenize, pack and batch it."""

    mixture: dict[str, float] = Field(default_factory=lambda: {"arithmetic_d1_direct": 1.0})
    objective: Literal["sft", "pretrain", "reward"] = "sft"
    text_files: list[str] = Field(default_factory=list)
    text_validation_files: list[str] = Field(default_factory=list)
    vocab: str = "byte"
    seq_len: int = Field(512, gt=1)
    max_prompt_len: int = Field(128, gt=0)
    batch_size: int = Field(16, gt=0)
    shards: int | None = Field(None, gt=0)
    resume: Literal["exact", "restart"] = "exact"
    pack: bool = True
    shuffle_buffer: int = Field(1024, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.mixture:
            raise ValueError("mixture: at least one component is needed")
        for name, rate in self.mixture.items():
            if not re.match(COMPONENT_PATTERN, name):
                raise ValueError(f"mixture.{name}: expected TASK_dN_STYLE (e.g. countdown_d3_direct) or 'text'")
            if rate <= 0:
                raise ValueError(f"mixture.{name}: rate must be positive, got {rate}")
        if "text" in self.mixture and not self.text_files:
            raise ValueError("mixture.text needs data.text_files (globs of text files, one example per line)")
        if self.shards and self.batch_size % self.shards:
            raise ValueError(f"batch_size ({self.batch_size}) must split evenly over shards ({self.shards})")
        if self.max_prompt_len >= self.seq_len:
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) must be below seq_len ({self.seq_len})")
        return self


class OptimizerConfig(Strict):
    """AdamW with warmup then decay, global-norm clipping and a weight-decay mask."""

    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    end_learning_rate_ratio: float = Field(0.1, ge=0, le=1)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    decay_norms: bool = False
    decay_embeddings: bool = False
    grad_clip_norm: float = Field(1.0, ge=0)
    master_weights: bool = False


class TrainConfig(Strict):
    """The training loop: length, accumulation, evaluation, checkpoints, metrics, profiling."""

    run_dir: str = "runs/default"
    steps: int = Field(100, gt=0)
    microbatches: int = Field(1, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(50, ge=0)
    eval_batches: int = Field(4, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    async_checkpoints: bool = True
    init_from: str | None = None
    profile_steps: list[int] = Field(default_factory=list)
    max_nonfinite_steps: int = Field(10, gt=0)
    peak_tflops_per_device: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        steps = self.profile_steps
        if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
            raise ValueError(f"profile_steps must be [first, last) with 0 <= first < last, got {self.profile_steps}")
        return self


class SearchConfig(Strict):
    """Inference-time search over reasoning steps (`ponder search`): strategy, sizes, scorer, budget."""

    strategy: Literal["greedy", "sample", "best_of_n", "beam", "dvts", "mcts"] = "beam"
    n: int = Field(4, gt=0)
    m: int = Field(4, gt=0)
    children: int = Field(4, gt=0)
    simulations: int = Field(16, gt=0)
    wave: int = Field(4, gt=0)
    c1: float = Field(1.25, gt=0)
    c2: float = Field(19652.0, gt=0)
    max_steps: int = Field(12, gt=0)
    max_step_tokens: int = Field(48, gt=0)
    max_len: int = Field(512, gt=1)
    page_size: int = Field(16, gt=0)
    num_pages: int = Field(0, ge=0)
    aggregate: Literal["last", "min", "product"] = "last"
    select: Literal["majority", "best", "weighted"] = "weighted"
    scorer: Literal["logprob", "reward", "oracle", "checker"] = "logprob"
    reward_checkpoint: str | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    budget: float = Field(0.0, ge=0)
    budget_unit: Literal["tokens", "flops"] = "tokens"
    batch_size: int = Field(8, gt=0)
    prompt_buckets: list[int] = Field(default_factory=lambda: [32, 64, 128, 256])
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.strategy == "dvts" and self.n % self.m:
            raise ValueError(f"dvts: n ({self.n}) must be a multiple of m ({self.m})")
        if self.scorer == "reward" and not self.reward_checkpoint:
            raise ValueError("scorer: reward needs reward_checkpoint (a run or checkpoint of a value-head model)")
        if not self.prompt_buckets or any(width < 2 for width in self.prompt_buckets):
            raise ValueError(f"prompt_buckets must be widths of at least 2 tokens, got {self.prompt_buckets}")
        if self.max_step_tokens + 2 > self.max_len:
            raise ValueError(f"max_len ({self.max_len}) leaves no room for a step of max_step_tokens "
                             f"({self.max_step_tokens}) after a prompt")
        return self


class RewardConfig(Strict):
    """Reward-model training (`data.objective: reward`): labelled samples in, a value head's BCE out."""

    kind: Literal["prm", "orm"] = "prm"
    data: str | None = None
    labels: Literal["soft", "hard"] = "soft"
    eval_fraction: float = Field(0.1, ge=0, lt=1)


class RLConfig(Strict):
    """Reinforcement learning with verifiable rewards (`ponder rl`): GRPO or expert iteration from a policy."""

    algorithm: Literal["grpo", "expert_iteration"] = "grpo"
    init_from: str | None = None
    run_dir: str = "runs/rl"
    steps: int = Field(100, gt=0)
    prompts_per_step: int = Field(16, gt=0)
    oversample: int = Field(1, gt=0)
    group_size: int = Field(8, gt=0)
    problem_start: int = Field(200_000, ge=0)
    max_prompt_len: int = Field(64, gt=1)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    epochs: int = Field(1, gt=0)
    minibatches: int = Field(1, gt=0)
    microbatches: int = Field(1, gt=0)
    clip_eps: float = Field(0.2, gt=0, lt=1)
    clip_eps_high: float | None = Field(None, gt=0)
    kl_coef: float = Field(0.04, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    std_normalize: bool = True
    loss_aggregation: Literal["token", "sequence"] = "token"
    format_reward: float = Field(0.0, ge=0)
    step_reward: float = Field(0.0, ge=0)
    search: Literal["none", "beam", "dvts", "mcts"] = "none"
    rollout_fsdp: bool = False
    eval_every: int = Field(10, ge=0)
    eval_problems: int = Field(64, gt=0)
    eval_samples: int = Field(1, gt=0)
    eval_temperature: float | None = Field(None, ge=0)
    log_every: int = Field(1, gt=0)
    checkpoint_every: int = Field(10, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError("group_size must be at least 2 for grpo (advantages are relative to the group)")
        if self.search != "none" and self.algorithm != "expert_iteration":
            raise ValueError(f"search: {self.search} distils search into the policy under algorithm: "
                             "expert_iteration only")
        rows = self.train_rows
        if rows % self.minibatches or (rows // self.minibatches) % self.microbatches:
            raise ValueError(f"minibatches ({self.minibatches}) must divide the {rows} rows trained on per step "
                             "(prompts_per_step * group_size, + prompts_per_step with search) and microbatches "
                             f"({self.microbatches}) each minibatch")
        return self

    @property
    def train_rows(self) -> int:
        """Rows of one step's training batch: every sample, and one search chain per prompt with `search`."""
        return self.prompts_per_step * (self.group_size + (self.search != "none"))


class DemoConfig(Strict):
    """`ponder demo`: the sizes of its stages (the policy's own training is `train.*`)."""

    run_dir: str = "runs/demo"
    problems: int = Field(200, gt=0)
    budgets: list[int] = Field(default_factory=lambda: [1, 4, 16, 64])
    best_of_n_budgets: list[int] | None = None
    strategies: list[Literal["greedy", "sample", "best_of_n", "beam", "dvts", "mcts"]] = Field(
        default_factory=lambda: ["greedy", "sample", "best_of_n", "beam", "dvts", "mcts"])
    reward_problems: int = Field(256, gt=0)
    reward_problem_offset: int = Field(100_000, ge=0)
    reward_samples: int = Field(4, gt=0)
    mc_rollouts: int = Field(4, ge=0)
    label_source: Literal["auto", "checker", "mc"] = "auto"
    reward_steps: int = Field(100, gt=0)
    reward_eval_problems: int = Field(0, ge=0)
    orm_steps: int | None = Field(None, gt=0)
    rl_steps: int = Field(0, ge=0)
    rl_overrides: list[str] = Field(default_factory=list)
    rl_strategies: list[Literal["greedy", "sample", "best_of_n", "beam", "dvts", "mcts"]] = Field(
        default_factory=lambda: ["greedy", "sample", "best_of_n"])
    rl_budgets: list[int] | None = None
    pass_samples: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _check_budgets(self) -> DemoConfig:
        for name in ("budgets", "best_of_n_budgets", "rl_budgets"):
            budgets = getattr(self, name)
            if budgets is not None and (not budgets or min(budgets) < 1):
                raise ValueError(f"demo.{name}: multiples of one sample's tokens, each >= 1")
        return self


class Config(Strict):
    """A whole ponder config: what every command resolves and writes into its run directory."""

    seed: int = 0
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    reward: RewardConfig = RewardConfig()
    demo: DemoConfig = DemoConfig()
    rl: RLConfig = RLConfig()
    # logical axis name -> mesh axis, list of mesh axes, or null (replicated); base.yaml says why
    logical_axis_rules: dict[str, MeshAxes | list[MeshAxes] | None] = Field(default_factory=lambda: {
        "batch": ["data", "fsdp"], "length": None, "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
        "head_dim": None, "mlp": "tensor", "vocab": "tensor", "layers": None})

    @model_validator(mode="after")
    def _check_rules(self) -> Config:
        if self.data.batch_size % self.train.microbatches:
            raise ValueError(
                f"train.microbatches ({self.train.microbatches}) must divide data.batch_size ({self.data.batch_size})"
            )
        if self.search.max_len > self.model.max_seq_len:
            raise ValueError(
                f"search.max_len ({self.search.max_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        rl = self.rl
        if rl.max_prompt_len + rl.max_new_tokens > self.model.max_seq_len:
            raise ValueError(f"rl.max_prompt_len + rl.max_new_tokens ({rl.max_prompt_len + rl.max_new_tokens}) "
                             f"exceeds model.max_seq_len ({self.model.max_seq_len})")
        if self.optimizer.master_weights and self.model.param_dtype == "float32":
            raise ValueError("optimizer.master_weights keeps float32 copies of bfloat16 params; with "
                             "model.param_dtype: float32 the params are that copy already. Set "
                             "model.param_dtype=bfloat16 or optimizer.master_weights=false")
        if self.data.objective == "reward" and not (self.model.value_head and self.reward.data):
            raise ValueError("data.objective: reward trains the value head on reward.data: set model.value_head=true "
                             "and reward.data (a JSONL file from `ponder reward data`)")
        for name, axes in self.logical_axis_rules.items():
            if name not in LOGICAL_AXES:
                raise ValueError(f"logical_axis_rules: unknown logical axis {name!r}; known: {', '.join(LOGICAL_AXES)}")
            listed = axes if isinstance(axes, list) else [axes] if axes else []
            if len(set(listed)) != len(listed):
                raise ValueError(f"logical_axis_rules.{name}: a mesh axis appears twice in {listed}")
        return self

    def rules(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The logical axis rules as `((logical, (mesh axes...)), ...)`."""
        out = []
        for name, axes in self.logical_axis_rules.items():
            listed = axes if isinstance(axes, list) else [axes] if axes else []
            out.append((name, tuple(listed)))
        return tuple(out)
