"""HuggingFace Llama parity both ways, with a random LlamaForCausalLM built locally (no hub)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model import create_model
from model.hf import config_from_hf, config_to_hf, from_hf_state_dict, load_params, params_of, to_hf_state_dict


def _hf_model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2,  # 4 query heads per kv head
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; make them random so the mapping of each shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def _hf_logits(model: LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_ponder_and_back(tied):
    hf = _hf_model(tied)
    cfg = config_from_hf(hf.config.to_dict())
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (8, 2, 500000.0, tied)
    tokens = np.random.default_rng(0).integers(0, 320, (2, 24))
    want = _hf_logits(hf, tokens)

    ours = create_model(cfg, seed=1)
    before = np.asarray(ours(jnp.asarray(tokens)))
    load_params(ours, from_hf_state_dict(hf.state_dict(), cfg))
    got = np.asarray(ours(jnp.asarray(tokens)))
    assert np.abs(before - want).max() > 1e-2  # the check below is not vacuous
    assert np.abs(got - want).max() <= 1e-4

    back = LlamaForCausalLM(LlamaConfig(**config_to_hf(cfg))).eval()
    state = {name: torch.from_numpy(array) for name, array in to_hf_state_dict(params_of(ours), cfg).items()}
    missing, unexpected = back.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    assert np.abs(_hf_logits(back, tokens) - want).max() <= 1e-4


def test_conversion_errors_name_the_problem():
    hf = _hf_model(tied=False)
    cfg = config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        from_hf_state_dict(state, cfg)
    params = from_hf_state_dict(hf.state_dict(), cfg)
    small = create_model(cfg.model_copy(update=dict(mlp_dim=96)), seed=0)
    with pytest.raises(ValueError, match=r"blocks\.mlp\.w_\w+: shape .* model expects"):
        load_params(small, params)
