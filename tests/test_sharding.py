"""Mesh construction, logical-axis rules, sharded forward, and an 8B compile without hardware."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.load import load_config
from configs.schema import MeshConfig
from model import Transformer, create_model
from model.sharding import MeshError, batch_sharding, logical_to_spec, make_mesh, state_shardings

TINY = load_config("tiny")
RULES = TINY.rules()


def test_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_that_does_not_fit_names_device_count_and_shape():
    with pytest.raises(MeshError, match=r"data=3, fsdp=1, tensor=1.*8 are available"):
        make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    with pytest.raises(MeshError, match="does not fit 8 devices"):
        make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))


def test_dcn_data_on_one_slice_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="dcn_data=2 ignored"):
        mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1, dcn_data=2))
    assert mesh.devices.size == 8


def test_rules_skip_used_axes_and_axes_that_do_not_divide():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    # activations: batch takes data+fsdp, so embed cannot also use fsdp
    assert logical_to_spec(("batch", "length", "embed"), RULES, mesh, (8, 16, 64)) == P(("data", "fsdp"), None, None)
    # a kv_heads dim of 3 cannot be split over tensor=2: replicated instead of an error
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), RULES, mesh, (64, 3, 16)) == P("fsdp", None, None)


@pytest.fixture(scope="module")
def single_device_logits():
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, TINY.model.vocab_size)
    return tokens, np.asarray(create_model(TINY.model, RULES, seed=0)(tokens))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_forward_matches_one_device(shape, single_device_logits):
    tokens, want = single_device_logits
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    model = create_model(TINY.model, RULES, seed=0, mesh=mesh)
    assert model.blocks.mlp.w_gate[...].sharding.spec == P(None, "fsdp", "tensor")
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    local = model.blocks.mlp.w_gate[...].addressable_shards[0].data.shape
    full = model.blocks.mlp.w_gate[...].shape
    assert local == (full[0], full[1] // shape[1], full[2] // shape[2])
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    with jax.set_mesh(mesh):
        logits = forward(state, jax.device_put(tokens, batch_sharding(mesh, RULES, tokens.shape)))
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5)


def test_llama3_8b_compiles_on_8_devices_from_abstract_shapes():
    """Lower and compile an 8B forward on (1, 8, 1) without allocating one parameter."""
    cfg = load_config("llama3-8b", ["mesh.fsdp=8"])
    mesh = make_mesh(cfg.mesh)
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rules=cfg.rules(), rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, cfg.rules())
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=batch_sharding(mesh, cfg.rules(), (8, 256)))

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    with jax.set_mesh(mesh):
        compiled = jax.jit(forward, in_shardings=(shardings, tokens.sharding)).lower(abstract_state, tokens).compile()
    total = sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(abstract_state))
    assert 8.0e9 * 4 < total < 8.1e9 * 4  # 8.03B float32 parameters in all
    per_device = compiled.memory_analysis().argument_size_in_bytes
    assert total / 8 <= per_device < total / 8 * 1.05, (per_device, total)
    wq_sharding = compiled.input_shardings[0][0]["blocks"]["attn"]["wq"]
    assert wq_sharding.spec == P(None, "fsdp", "tensor", None)  # layers, embed, heads, head_dim
