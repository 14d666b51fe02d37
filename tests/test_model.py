"""The decoder: paged KV decode against the full forward, packing, layer-stack variants."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from configs.schema import ModelConfig
from model import create_model, init_cache
from model.decode import decode_layers, decode_step, decoder

CFG = ModelConfig(vocab_size=384, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
PAGE_SIZE = 4


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=0)


def _reference(model, sequence):
    """Logits of one unpadded sequence by a full forward pass: [T, V]."""
    return np.asarray(model(jnp.asarray(sequence)[None]))[0]


@nnx.jit
def _decode(model, tokens, positions, page_table, lengths, cache, num_new):
    return model.decode(tokens, positions, page_table, lengths, cache, num_new)


def _feed(model, cache, sequences, page_table, start, stop, chunk):
    """Decodes tokens start[row]..stop[row]-1 of each row, `chunk` per call (rows finish apart).

    Returns ({position: logits [V]} per row, cache).
    """
    start, stop = np.asarray(start), np.asarray(stop)
    padded = np.zeros((len(sequences), max(map(len, sequences)) + chunk), np.int32)
    for row, seq in enumerate(sequences):
        padded[row, : len(seq)] = seq
    lengths, got = start.copy(), [{} for _ in sequences]
    while (lengths < stop).any():
        num_new = np.clip(stop - lengths, 0, chunk)
        positions = lengths[:, None] + np.arange(chunk)[None]
        tokens = np.take_along_axis(padded, positions, axis=1)
        logits, cache = _decode(
            model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(page_table),
            jnp.asarray(lengths, jnp.int32), cache, jnp.asarray(num_new, jnp.int32),
        )
        for row in range(len(sequences)):
            for t in range(num_new[row]):
                got[row][lengths[row] + t] = np.asarray(logits[row, t])
        lengths = lengths + num_new
    return got, cache


def _assert_matches_reference(model, sequences, got, first):
    for row, seq in enumerate(sequences):
        want = _reference(model, seq)
        assert sorted(got[row]) == list(range(first[row], len(seq)))
        diff = max(np.abs(got[row][p] - want[p]).max() for p in got[row])
        assert diff <= 1e-5, f"row {row}: paged logits differ from the full forward by {diff}"


def _shuffled_tables(rng, rows_pages):
    """Disjoint page tables, -1 padded, with page ids drawn in random order from one pool."""
    ids = rng.permutation(sum(rows_pages))
    width = max(rows_pages)
    tables, start = [], 0
    for n in rows_pages:
        tables.append(np.pad(ids[start : start + n], (0, width - n), constant_values=-1))
        start += n
    return np.stack(tables)


@pytest.mark.parametrize("chunk", [1, 3])
def test_paged_decode_matches_full_forward(model, chunk):
    """Batched prefill of prompts of different lengths, then decode in chunks, on shuffled pages."""
    rng = np.random.default_rng(chunk)
    sequences = [rng.integers(0, CFG.vocab_size, n) for n in (21, 13, 17)]
    table = _shuffled_tables(rng, [6, 4, 5])
    prompt = np.array([7, 2, 5])
    padded = np.zeros((3, prompt.max()), np.int32)
    for row, seq in enumerate(sequences):
        padded[row, : prompt[row]] = seq[: prompt[row]]
    cache = init_cache(CFG, int(table.max()) + 1, PAGE_SIZE)
    prefill_logits, cache = nnx.jit(lambda m, t, p, c, n: m.prefill(t, p, c, n))(
        model, jnp.asarray(padded), jnp.asarray(table), cache, jnp.asarray(prompt, jnp.int32)
    )
    prefilled = [{p: np.asarray(prefill_logits[row, p]) for p in range(prompt[row])} for row in range(3)]
    got, _ = _feed(model, cache, sequences, table, prompt, [len(s) for s in sequences], chunk)
    _assert_matches_reference(model, sequences, [a | b for a, b in zip(prefilled, got, strict=True)], [0, 0, 0])


def test_rows_sharing_a_prefix_share_its_pages(model):
    """Row 1 reuses row 0's first two pages (8 tokens) without copying or overwriting them."""
    rng = np.random.default_rng(7)
    prefix = rng.integers(0, CFG.vocab_size, 2 * PAGE_SIZE)
    sequences = [np.concatenate([prefix, rng.integers(0, CFG.vocab_size, n)]) for n in (9, 6)]
    own = _shuffled_tables(rng, [5, 5]) + 0
    table = own.copy()
    table[1, :2] = own[0, :2]  # row 1's first pages are row 0's
    table[1, 2:] = own[1, :3]
    cache = init_cache(CFG, int(own.max()) + 1, PAGE_SIZE)
    first, cache = _feed(model, cache, sequences, table, [0, 8], [8, 8], chunk=3)
    shared = np.asarray(cache.k[:, :, own[0, :2]])
    rest, cache = _feed(model, cache, sequences, table, [8, 8], [len(s) for s in sequences], chunk=2)
    np.testing.assert_array_equal(np.asarray(cache.k[:, :, own[0, :2]]), shared)
    _assert_matches_reference(model, sequences, [first[0] | rest[0], rest[1]], [0, 8])


def test_packed_segments_do_not_attend_across_documents(model):
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, CFG.vocab_size, 9), rng.integers(0, CFG.vocab_size, 7)
    tokens = jnp.asarray(np.concatenate([doc_a, doc_b]))[None]
    segments = jnp.asarray([1] * 9 + [2] * 7)[None]
    positions = jnp.asarray(list(range(9)) + list(range(7)))[None]
    packed = np.asarray(model(tokens, positions, segments))[0]
    np.testing.assert_allclose(packed[:9], _reference(model, doc_a), atol=1e-5)
    np.testing.assert_allclose(packed[9:], _reference(model, doc_b), atol=1e-5)


@pytest.mark.parametrize("rows", [3, 9])
def test_the_cpu_decode_layout_computes_what_decode_does(model, rows):
    """`decoder` on CPU: per-layer weights sliced, fused and (at most 8 rows) packed for the native kernels.

    One decode step after a prefill gives `Transformer.decode`'s logits and writes the same keys/values.
    """
    rng = np.random.default_rng(rows)
    prompts, lengths = rng.integers(0, CFG.vocab_size, (rows, 6)), rng.integers(1, 7, rows)
    table = jnp.arange(rows * 3, dtype=jnp.int32).reshape(rows, 3)
    _, cache = nnx.jit(lambda m, t, p, c, n: m.prefill(t, p, c, n))(
        model, jnp.asarray(prompts), table, init_cache(CFG, rows * 3, PAGE_SIZE), jnp.asarray(lengths, jnp.int32))
    tokens, lengths = jnp.asarray(rng.integers(0, CFG.vocab_size, (rows, 1))), jnp.asarray(lengths, jnp.int32)
    writing = jnp.asarray(rng.permutation(rows) > 0, jnp.int32)  # one row writes nothing

    @nnx.jit
    def three(model, cache):
        args = (tokens, lengths[:, None], table, lengths, cache, writing)
        layout = decode_step(model, decode_layers(model, rows), *args)  # the CPU layout, called directly
        return decoder(model, rows)(*args), layout, model.decode(*args)

    (got, got_cache), (layout, _), (want, want_cache) = three(model, cache)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(layout))  # on CPU the decoder runs the layout
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(want_cache.k), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cache.v), np.asarray(want_cache.v), atol=1e-5)
    assert np.abs(np.asarray(got_cache.k) - np.asarray(cache.k)).max() > 0  # the step wrote its keys


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"), dict(remat="save_dots"),
                                     dict(remat="save_qkv_proj"), dict(remat="save_qkv_attention", scan_layers=False)])
def test_layer_stack_variants_compute_the_same_function(model, variant):
    """Unrolled or rematerialized layers: same params, same logits and gradients as scan."""
    other = create_model(CFG.model_copy(update=variant), seed=0)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(tokens), axis=-1))

    want_loss, want_grads = nnx.value_and_grad(loss)(model)
    got_loss, got_grads = nnx.value_and_grad(loss)(other)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_remat_policies_keep_what_they_say(model):
    """Arrays kept for the backward pass: full < q/k/v < q/k/v + attention out < every matmul < no remat."""
    tokens = jnp.zeros((2, 12), jnp.int32)

    def kept(remat):
        graphdef, params = nnx.split(create_model(CFG.model_copy(update={"remat": remat}), seed=0))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens)), params)
        return len(out.getvalue().splitlines())

    counts = [kept(remat) for remat in ("full", "save_qkv_proj", "save_qkv_attention", "save_dots", "none")]
    assert counts[1] == counts[0] + 3 and counts[2] == counts[1] + 1, counts  # stacked over layers by the scan
    assert counts == sorted(set(counts)), counts


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = CFG.model_copy(update=dict(dtype="bfloat16"))
    m = create_model(cfg, seed=0)
    assert m.blocks.attn.wq[...].dtype == jnp.float32
    logits = m(jnp.zeros((1, 5), jnp.int32))
    assert logits.dtype == jnp.float32
    ref = create_model(CFG, seed=0)(jnp.zeros((1, 5), jnp.int32))
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.1  # bf16 rounding, same function


def test_value_head_scores_every_token():
    m = create_model(CFG.model_copy(update=dict(value_head=True)), seed=0)
    values = m.value(m.hidden(jnp.zeros((2, 6), jnp.int32)))
    assert values.shape == (2, 6) and values.dtype == jnp.float32
    with pytest.raises(ValueError, match="value head"):
        create_model(CFG, seed=0).value(jnp.zeros((1, 1, CFG.embed_dim)))
