"""The LM loss in vocabulary blocks equals the dense loss (values, gradients, argmax) and never holds [B, T, V]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.schema import ModelConfig
from model import create_model
from model.losses import chunked_token_loss
from train.step import token_losses

CFG = ModelConfig(vocab_size=384, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)


def _batch(rows=2, length=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (rows, length))
    return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),
            "loss_mask": jnp.asarray(rng.random((rows, length)) > 0.2, jnp.float32),
            "segment_ids": jnp.ones((rows, length), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_the_dense_loss_and_its_gradient(tied):
    dense_cfg = CFG.model_copy(update={"tie_embeddings": tied})
    chunked_cfg = dense_cfg.model_copy(update={"loss_vocab_chunk": 128})
    graphdef_dense, params = nnx.split(create_model(dense_cfg, seed=1), nnx.Param)
    graphdef_chunked, _ = nnx.split(create_model(chunked_cfg, seed=1), nnx.Param)
    batch = _batch()

    def loss(graphdef):
        return jax.value_and_grad(lambda p: token_losses(graphdef, p, batch)[0])(params)

    (dense, dense_grads), (chunked, chunked_grads) = loss(graphdef_dense), loss(graphdef_chunked)
    np.testing.assert_allclose(chunked, dense, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(dense_grads), jax.tree.leaves(chunked_grads), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)
    assert token_losses(graphdef_dense, params, batch)[2] == token_losses(graphdef_chunked, params, batch)[2]


def test_no_batch_by_vocabulary_float32_array_exists_in_the_gradient():
    hidden = jnp.ones((2, 16, 64))
    head = jnp.ones((64, 384))
    targets = jnp.zeros((2, 16), jnp.int32)

    def shapes(fn):
        jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(hidden, head)
        found = set()

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                found.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
                for sub in jax.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return found

    dense = shapes(lambda h, w: jax.nn.logsumexp(jnp.einsum("bte,ev->btv", h, w), -1).sum())
    chunked = shapes(lambda h, w: chunked_token_loss(h, w, targets, 128)[0].sum())
    assert (2, 16, 384) in dense  # the check can fail
    assert (2, 16, 384) not in chunked and (2, 16, 128) in chunked
    with pytest.raises(ValueError, match="must divide the vocabulary"):
        chunked_token_loss(hidden, head, targets, 100)
