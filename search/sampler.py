"""Batched generation on the paged KV cache, entirely inside `jit`.

The cache convention shared with the tree search: a row's cache holds every token of its
context but the last one, which is "pending" (fed at the next decode). A row of context
length L has `lengths = L - 1` cached slots and its last token pending at slot L - 1, so
forked rows (tree children) each feed their parent's pending token into their own pages.

    out = generate(model, prompts, prompt_lengths, key, max_new_tokens=64, sampling=Sampling(0.7))

`decode_loop` is the core: a `lax.while_loop` that samples one token per row per
iteration and exits when every row has hit a stop token or its token limit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.decode import decoder
from model.paged import PagedKVCache, init_cache

EOS_ID = 1
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is drawn from the logits. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generated:
    """tokens, logprobs: [R, T] (PAD / 0 after a row stops); num: [R] tokens generated; the cache after."""

    tokens: jax.Array
    logprobs: jax.Array
    num: jax.Array
    cache: PagedKVCache


def sample_logits(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> tuple[jax.Array, jax.Array]:
    """One token per row from logits [R, V] with per-row keys [R]; returns (tokens, model log-probs).

    The log-prob is the model's own (temperature 1, no truncation): what search priors and
    RL ratios need.
    """
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if sampling.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        scaled = logits / sampling.temperature
        if sampling.top_k:
            kth = jax.lax.top_k(scaled, sampling.top_k)[0][:, -1:]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        if sampling.top_p < 1.0:
            order = jnp.argsort(-scaled, axis=-1)
            sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
            cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
            drop_sorted = cumulative - jax.nn.softmax(sorted_logits, axis=-1) >= sampling.top_p  # keep the first over
            drop = jnp.zeros_like(drop_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(drop_sorted)
            scaled = jnp.where(drop, -jnp.inf, scaled)
        tokens = jax.vmap(jax.random.categorical)(keys, scaled)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def decode_loop(
    graphdef: nnx.GraphDef,
    params,
    cache: PagedKVCache,
    page_table: jax.Array,
    lengths: jax.Array,
    pending: jax.Array,
    active: jax.Array,
    keys: jax.Array,
    *,
    max_new: int,
    stop_ids: tuple[int, ...],
    sampling: Sampling,
) -> Generated:
    """Generates up to `max_new` tokens per active row; a row stops after emitting a stop id.

    page_table [R, P], lengths [R] (cached slots), pending [R] (the context's last token,
    fed first), active [R] bool, keys [R] (row t-th token uses fold_in(key, t)). The last
    generated token stays pending (not written), per the module's convention.
    """
    rows = pending.shape[0]
    decode = decoder(nnx.merge(graphdef, params), rows)  # on CPU, weights laid out here, once, for the loop
    stops = jnp.asarray(stop_ids, jnp.int32)

    def cond(carry):
        step, _, _, _, done, *_ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, cache, lengths, pending, done, tokens, logprobs, num = carry
        writing = (~done).astype(jnp.int32)
        logits, cache = decode(pending[:, None], lengths[:, None], page_table, lengths, cache, writing)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        token, logprob = sample_logits(logits[:, 0], step_keys, sampling)
        token = jnp.where(done, PAD_ID, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        lengths = lengths + writing
        num = num + writing
        pending = jnp.where(done, pending, token)
        done = done | jnp.isin(token, stops)
        return step + 1, cache, lengths, pending, done, tokens, logprobs, num

    carry = (
        jnp.zeros((), jnp.int32),
        cache,
        lengths,
        pending,
        ~active,
        jnp.full((rows, max_new), PAD_ID, jnp.int32),
        jnp.zeros((rows, max_new), jnp.float32),
        jnp.zeros((rows,), jnp.int32),
    )
    _, cache, _, _, _, tokens, logprobs, num = jax.lax.while_loop(cond, body, carry)
    return Generated(tokens, logprobs, num, cache)


def pages_for(length: int, page_size: int) -> int:
    return -(-length // page_size)


def contiguous_page_table(rows: int, pages_per_row: int) -> jax.Array:
    """Row r owns pages r * pages_per_row ... (what plain generation uses)."""
    return jnp.arange(rows * pages_per_row, dtype=jnp.int32).reshape(rows, pages_per_row)


def generate(
    graphdef: nnx.GraphDef,
    params,
    model_cfg,
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    keys: jax.Array,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: tuple[int, ...] = (EOS_ID,),
    page_size: int = 16,
) -> Generated:
    """Plain batched generation: prefill prompts [R, T] (right-padded, lengths >= 1), then decode.

    Jit it with `max_new_tokens`, `sampling`, `stop_ids` and `page_size` static. keys: [R]
    (one per row, so a row's sample does not depend on the rest of the batch).
    """
    rows, prompt_width = prompts.shape
    pages_per_row = pages_for(prompt_width + max_new_tokens, page_size)
    cache = init_cache(model_cfg, rows * pages_per_row, page_size)
    table = contiguous_page_table(rows, pages_per_row)
    model = nnx.merge(graphdef, params)
    _, cache = model.prefill(prompts, table, cache, prompt_lengths - 1)
    pending = jnp.take_along_axis(prompts, (prompt_lengths - 1)[:, None], axis=1)[:, 0]
    return decode_loop(
        graphdef, params, cache, table, prompt_lengths - 1, pending, jnp.ones((rows,), bool), keys,
        max_new=max_new_tokens, stop_ids=stop_ids, sampling=sampling,
    )


def encode_prompts(vocab, texts: list[str], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BOS + the prompt's tokens (as training saw them), right-padded to `width`; returns (tokens, lengths)."""
    encoded = [[PAD_ID] + list(vocab.encode(text)) for text in texts]
    lengths = np.array([len(row) for row in encoded], np.int32)
    width = width or int(lengths.max())
    if lengths.max() > width:
        raise ValueError(f"a prompt has {int(lengths.max())} tokens, more than the bucket width {width}")
    tokens = np.full((len(texts), width), PAD_ID, np.int32)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = ids
    return tokens, lengths


def decode_text(vocab, tokens) -> str:
    """Text of generated ids, stopping at EOS (pads dropped)."""
    ids = []
    for token in np.asarray(tokens).tolist():
        if token == vocab.eos_id:
            break
        if token != PAD_ID:
            ids.append(token)
    return vocab.decode(ids)
