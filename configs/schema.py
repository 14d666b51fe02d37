"""Typed schema of a ponder config: every key a YAML file may set, with its type and limits.

`configs/load.py` reads YAML (with `base:` inheritance and dotted overrides) and validates
it against `Config`; unknown keys, wrong types and impossible values are errors.
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
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    max_seq_len: int = Field(2048, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "full", "save_dots"] = "none"
    attention: Literal["auto", "xla", "cudnn"] = "xla"
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
    objective: Literal["sft", "pretrain"] = "sft"
    text_files: list[str] = Field(default_factory=list)
    text_validation_files: list[str] = Field(default_factory=list)
    vocab: str = "byte"
    seq_len: int = Field(512, gt=1)
    max_prompt_len: int = Field(128, gt=0)
    batch_size: int = Field(16, gt=0)
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
        if self.max_prompt_len >= self.seq_len:
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) must be below seq_len ({self.seq_len})")
        return self


class Config(Strict):
    """A whole ponder config: what every command resolves and writes into its run directory."""

    seed: int = 0
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    # logical axis name -> mesh axis, list of mesh axes, or null (replicated)
    logical_axis_rules: dict[str, MeshAxes | list[MeshAxes] | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_rules(self) -> Config:
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
