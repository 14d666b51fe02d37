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

from configs.schema import ModelConfig, RopeScaling


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


# config.json keys whose value must be this for the model to be ponder's Llama (anything else is refused).
REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
ARCHITECTURES = ("LlamaForCausalLM",)
# The ModelConfig fields a HF config.json decides (the rest, numerics and layout, are ponder's choice).
ARCHITECTURE_FIELDS = ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                       "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings", "max_seq_len")


def config_from_hf(config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """A ModelConfig from a HF Llama `config.json` (a dict; transformers 4.x or 5.x keys).

    Raises ValueError naming the field for anything ponder's decoder does not compute the
    same way (another architecture, biases, another activation or RoPE type).
    """
    architectures = config.get("architectures") or list(ARCHITECTURES)
    if config.get("model_type", "llama") != "llama" or any(a not in ARCHITECTURES for a in architectures):
        raise ValueError(f"architectures: {architectures} (model_type {config.get('model_type')!r}); "
                         f"only {', '.join(ARCHITECTURES)} (model_type 'llama') converts")
    for key, value in REQUIRED.items():
        if config.get(key, value) != value:
            raise ValueError(f"{key}: {config[key]!r} is not supported; ponder's Llama needs {value!r}")
    missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if key not in config]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    # transformers 5 writes rope_parameters (with rope_theta inside); 4.x rope_theta and rope_scaling
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = None
    if rope_type == "llama3":
        known = set(RopeScaling.model_fields) - {"rope_type"}
        scaling = RopeScaling(rope_type="llama3", **{k: v for k, v in rope.items() if k in known})
    elif rope_type != "default":
        raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported; ponder computes "
                         "default and llama3 RoPE")
    num_heads = config["num_attention_heads"]
    fields = dict(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        embed_dim=config["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim"),
        mlp_dim=config["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=config.get("tie_word_embeddings", False),
        max_seq_len=config.get("max_position_embeddings", 2048),
    )
    return ModelConfig(**(fields | overrides))


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32", bos_id: int = 0, eos_id: int = 1,
                 pad_id: int | None = 0) -> dict[str, Any]:
    """A HF `config.json` (LlamaForCausalLM) describing the same model; `LlamaConfig(**it)` builds it.

    RoPE is written the transformers 4.x way (rope_theta, rope_scaling), which 5.x also reads.
    """
    config = dict(
        architectures=list(ARCHITECTURES),
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling.model_dump() if cfg.rope_scaling else None,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        pretraining_tp=1,
        initializer_range=0.02,
        use_cache=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype=dtype,
    )
    return config


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the HF state dict of `cfg` (lm_head.weight only when untied)."""
    n, k, d, e, f, v = (cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.embed_dim, cfg.mlp_dim,
                        cfg.vocab_size)
    layer = {"input_layernorm.weight": (e,), "self_attn.q_proj.weight": (n * d, e),
             "self_attn.k_proj.weight": (k * d, e), "self_attn.v_proj.weight": (k * d, e),
             "self_attn.o_proj.weight": (e, n * d), "post_attention_layernorm.weight": (e,),
             "mlp.gate_proj.weight": (f, e), "mlp.up_proj.weight": (f, e), "mlp.down_proj.weight": (e, f)}
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, e)
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _shape(state_dict: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = getattr(state_dict, "shape", None)  # SafetensorsDir reads shapes without the data
    return tuple(shape(name)) if callable(shape) else tuple(state_dict[name].shape)


def from_hf_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """Ponder params (a nested dict of float32 numpy arrays) from a HF Llama state dict.

    `state_dict` maps names to arrays (numpy, CPU torch) or is a `SafetensorsDir`, read one
    tensor at a time. A missing tensor or a shape other than `cfg` implies raises, naming it.
    """
    global_entries, layer_entries = _mapping(cfg)
    expected = hf_shapes(cfg)
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise KeyError(f"HF state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, shape in expected.items():
        if _shape(state_dict, name) != shape:
            raise ValueError(f"{name}: shape {list(_shape(state_dict, name))}, but config.json implies "
                             f"{list(shape)} (hidden_size, intermediate_size, heads, head_dim, vocab_size)")

    def array(name):
        tensor = state_dict[name]
        if hasattr(tensor, "detach"):  # torch: leave autograd and bfloat16 behind
            tensor = tensor.detach().float().cpu().numpy()
        return np.asarray(tensor, dtype=np.float32)

    params: dict = {}
    for name, path, (to_ponder, _) in global_entries:
        _set(params, path, to_ponder(array(name)))
    for name, path, (to_ponder, _) in layer_entries:
        first = to_ponder(array(f"model.layers.0.{name}"))
        stacked = np.empty((cfg.num_layers, *first.shape), np.float32)  # filled layer by layer: no second copy
        stacked[0] = first
        for i in range(1, cfg.num_layers):
            stacked[i] = to_ponder(array(f"model.layers.{i}.{name}"))
        _set(params, ("blocks", *path), stacked)
    return params


def hf_entries(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor an export writes, in the order `hf_tensor_reader` reads them best.

    Ordered by parameter, then layer: one stacked ponder parameter serves all its layers in a row.
    """
    shapes = hf_shapes(cfg)
    global_entries, layer_entries = _mapping(cfg)
    names = [name for name, _, _ in global_entries]
    names += [f"model.layers.{i}.{name}" for name, _, _ in layer_entries for i in range(cfg.num_layers)]
    return [(name, shapes[name]) for name in names]


def hf_tensor_reader(params: Mapping, cfg: ModelConfig,
                     fetch: Callable[[Any], np.ndarray] = np.asarray) -> Callable[[str], np.ndarray]:
    """`read(hf_name) -> float32 array` from ponder params; `fetch` brings one param to the host.

    Holds one fetched (stacked) parameter at a time, so reading `hf_entries` in order fetches
    each parameter once.
    """
    global_entries, layer_entries = _mapping(cfg)
    by_name = {name: (path, to_hf, None) for name, path, (_, to_hf) in global_entries}
    by_name |= {f"model.layers.{i}.{name}": (("blocks", *path), to_hf, i)
                for name, path, (_, to_hf) in layer_entries for i in range(cfg.num_layers)}
    held: dict = {}

    def read(name: str) -> np.ndarray:
        path, to_hf, layer = by_name[name]
        if path not in held:
            held.clear()
            held[path] = np.asarray(fetch(_get(params, path)), np.float32)
        value = held[path] if layer is None else held[path][layer]
        return np.ascontiguousarray(to_hf(value))

    return read


def to_hf_state_dict(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A HF Llama state dict (float32 numpy arrays) from ponder params (nested dict)."""
    read = hf_tensor_reader(params, cfg)
    out = {name: read(name) for name, _ in hf_entries(cfg)}
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
