"""HuggingFace Llama <-> ponder conversion: one name-mapping table, both directions.

Works on plain arrays (numpy, or anything `np.asarray` accepts, such as CPU torch
tensors), so this module needs neither torch nor transformers. HF stores projections as
`[out_features, in_features]`; ponder stores `[in, out]` with heads split out, and stacks
all layers on a leading axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from configs.schema import ModelConfig


def _heads_in(num_heads: int, head_dim: int) -> tuple[Callable, Callable]:
    """[heads*head_dim, E] (HF q/k/v_proj) <-> [E, heads, head_dim] (ponder)."""
    return (
        lambda w: w.T.reshape(w.shape[1], num_heads, head_dim),
        lambda p: p.reshape(p.shape[0], num_heads * head_dim).T,
    )


def _heads_out(num_heads: int, head_dim: int) -> tuple[Callable, Callable]:
    """[E, heads*head_dim] (HF o_proj) <-> [heads, head_dim, E] (ponder)."""
    return (
        lambda w: w.T.reshape(num_heads, head_dim, w.shape[0]),
        lambda p: p.reshape(num_heads * head_dim, p.shape[-1]).T,
    )


_TRANSPOSE = (lambda w: w.T, lambda p: p.T)
_SAME = (lambda w: w, lambda p: p)


def _mapping(cfg: ModelConfig) -> tuple[list, list]:
    """(global entries, per-layer entries): (HF name, ponder path, (to_ponder, to_hf))."""
    n, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    global_entries = [
        ("model.embed_tokens.weight", ("embed",), _SAME),
        ("model.norm.weight", ("final_norm", "scale"), _SAME),
    ]
    if not cfg.tie_embeddings:
        global_entries.append(("lm_head.weight", ("lm_head",), _TRANSPOSE))
    layer_entries = [
        ("input_layernorm.weight", ("attn_norm", "scale"), _SAME),
        ("self_attn.q_proj.weight", ("attn", "wq"), _heads_in(n, d)),
        ("self_attn.k_proj.weight", ("attn", "wk"), _heads_in(k, d)),
        ("self_attn.v_proj.weight", ("attn", "wv"), _heads_in(k, d)),
        ("self_attn.o_proj.weight", ("attn", "wo"), _heads_out(n, d)),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), _SAME),
        ("mlp.gate_proj.weight", ("mlp", "w_gate"), _TRANSPOSE),
        ("mlp.up_proj.weight", ("mlp", "w_up"), _TRANSPOSE),
        ("mlp.down_proj.weight", ("mlp", "w_down"), _TRANSPOSE),
    ]
    return global_entries, layer_entries


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a `transformers.LlamaConfig` (or anything with its attributes)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported yet; only default RoPE converts exactly")
    fields = dict(
        vocab_size=hf_config.vocab_size,
        num_layers=hf_config.num_hidden_layers,
        embed_dim=hf_config.hidden_size,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        mlp_dim=hf_config.intermediate_size,
        rope_theta=rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=hf_config.tie_word_embeddings,
        max_seq_len=hf_config.max_position_embeddings,
    )
    return ModelConfig(**(fields | overrides))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` describing the same model."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        attention_bias=False,
        mlp_bias=False,
    )


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def from_hf_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """Ponder params (a nested dict of float32 numpy arrays) from a HF Llama state dict."""
    global_entries, layer_entries = _mapping(cfg)
    missing = [name for name, _, _ in global_entries if name not in state_dict]
    missing += [
        f"model.layers.{i}.{name}"
        for i in range(cfg.num_layers)
        for name, _, _ in layer_entries
        if f"model.layers.{i}.{name}" not in state_dict
    ]
    if missing:
        raise KeyError(f"HF state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def array(name):
        tensor = state_dict[name]
        if hasattr(tensor, "detach"):  # torch: leave autograd and bfloat16 behind
            tensor = tensor.detach().float().cpu().numpy()
        return np.asarray(tensor, dtype=np.float32)

    params: dict = {}
    for name, path, (to_ponder, _) in global_entries:
        _set(params, path, to_ponder(array(name)))
    for name, path, (to_ponder, _) in layer_entries:
        layers = [to_ponder(array(f"model.layers.{i}.{name}")) for i in range(cfg.num_layers)]
        _set(params, ("blocks", *path), np.stack(layers))
    return params


def to_hf_state_dict(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A HF Llama state dict (float32 numpy arrays) from ponder params (nested dict)."""
    global_entries, layer_entries = _mapping(cfg)
    out = {}
    for name, path, (_, to_hf) in global_entries:
        out[name] = np.array(to_hf(np.asarray(_get(params, path), np.float32)), order="C")
    for name, path, (_, to_hf) in layer_entries:
        stacked = np.asarray(_get(params, ("blocks", *path)), np.float32)
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{name}"] = np.array(to_hf(stacked[i]), order="C")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def params_of(model: nnx.Module) -> dict:
    """The model's parameters as a nested dict of arrays."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def load_params(model: nnx.Module, params: Mapping) -> None:
    """Replaces the model's parameters in place with `params` (same tree, same shapes)."""
    state = nnx.state(model, nnx.Param)
    current = dict(traverse_util.flatten_dict(state.to_pure_dict(), sep="."))
    new = dict(traverse_util.flatten_dict(dict(params), sep="."))
    if current.keys() != new.keys():
        raise KeyError(f"parameter names differ: missing {sorted(current.keys() - new.keys())}, "
                       f"unexpected {sorted(new.keys() - current.keys())}")
    for name, value in new.items():
        if tuple(np.shape(value)) != tuple(current[name].shape):
            raise ValueError(f"{name}: shape {np.shape(value)}, model expects {current[name].shape}")
    converted = {name: jnp.asarray(value, current[name].dtype) for name, value in new.items()}
    state.replace_by_pure_dict(traverse_util.unflatten_dict(converted, sep="."))
    nnx.update(model, state)
