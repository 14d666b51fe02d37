"""Paged key/value cache: one page pool shared by every row, a page table per row.

A row's logical slot `s` lives at page `page_table[row, s // page_size]`, offset
`s % page_size`. Rows whose tables share leading pages share that prefix without a copy,
which is how the tree search forks a path. Pure functions; the cache is a pytree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from configs.schema import ModelConfig
from model import cpu_kernels


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """k, v: [layers, num_pages, page_size, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> PagedKVCache:
    """An all-zero page pool (dtype defaults to the model's compute dtype)."""
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.resolved_head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return PagedKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_pages(cache: PagedKVCache, layer, k, v, page_table, lengths, num_new) -> PagedKVCache:
    """Writes new keys/values k, v: [B, T, kv_heads, head_dim] at slots lengths..lengths+num_new-1.

    Padding tokens (t >= num_new) and slots past the page table are dropped, never written
    into another row's pages.
    """
    batch, steps = k.shape[:2]
    slots = lengths[:, None] + jnp.arange(steps)[None, :]  # [B, T]
    capacity = page_table.shape[1] * cache.page_size
    valid = (jnp.arange(steps)[None, :] < num_new[:, None]) & (slots < capacity)
    page_index = jnp.clip(slots // cache.page_size, 0, page_table.shape[1] - 1)
    pages = jnp.take_along_axis(page_table, page_index, axis=1)
    pages = jnp.where(valid & (pages >= 0), pages, cache.num_pages)  # out of range -> dropped
    offsets = slots % cache.page_size
    new_k = cache.k.at[layer, pages, offsets].set(k.astype(cache.k.dtype), mode="drop")
    new_v = cache.v.at[layer, pages, offsets].set(v.astype(cache.v.dtype), mode="drop")
    return PagedKVCache(new_k, new_v)


CHUNK_SLOTS = 64  # keys per attention chunk: a row's pages are read a chunk at a time, only as far as needed


def attend_paged(q, cache: PagedKVCache, layer, page_table, lengths, num_new) -> jax.Array:
    """Attention of new queries over a row's pages (causal within the new tokens).

    q: [B, T, heads, head_dim]; returns [B, T, heads, head_dim]. Query t sits at slot
    lengths + t and sees slots 0..lengths + t of its own row.

    A one-token decode lowered for CPU runs ponder's native kernel where it applies
    (`model.cpu_kernels`); every other case, and every other platform, `attend_paged_xla`.
    """
    if not cpu_kernels.decode_attention_kernel_applies(q, cache):
        return attend_paged_xla(q, cache, layer, page_table, lengths, num_new)
    return jax.lax.platform_dependent(
        q, cache, layer, page_table, lengths, num_new,
        cpu=cpu_kernels.paged_decode_attention, default=attend_paged_xla)


def attend_paged_xla(q, cache: PagedKVCache, layer, page_table, lengths, num_new) -> jax.Array:
    """`attend_paged` in XLA ops, for any platform, dtype and number of new tokens.

    The pages are read in chunks of CHUNK_SLOTS keys with an online softmax, and the loop
    stops after the chunk holding the batch's longest row: a search's page table is sized
    for its longest possible path, and most of it is empty most of the time. A one-token
    decode computes scores as a multiply-and-sum, which XLA fuses with the page gather (the
    gathered keys need not be written out); longer queries use matmuls.
    """
    batch, steps, heads, head_dim = q.shape
    kv_heads, page_size = cache.k.shape[3], cache.page_size
    groups, f32 = heads // kv_heads, jnp.float32
    chunk_pages = max(CHUNK_SLOTS // page_size, 1)
    chunk = chunk_pages * page_size
    num_chunks = -(-page_table.shape[1] // chunk_pages)
    table = jnp.pad(jnp.maximum(page_table, 0), ((0, 0), (0, num_chunks * chunk_pages - page_table.shape[1])))
    total = lengths + num_new  # [B] slots visible after the write
    query_slot = lengths[:, None] + jnp.arange(steps)[None, :]  # [B, T]
    queries = (q * head_dim**-0.5).reshape(batch, steps, kv_heads, groups, head_dim)

    def body(i, carry):
        running_max, norm, acc = carry  # [B, T, K, G], [B, T, K, G], [B, T, K, G, D]
        pages = jax.lax.dynamic_slice_in_dim(table, i * chunk_pages, chunk_pages, axis=1)
        keys = cache.k[layer, pages].reshape(batch, chunk, kv_heads, head_dim).astype(q.dtype)
        values = cache.v[layer, pages].reshape(batch, chunk, kv_heads, head_dim).astype(q.dtype)
        key_slot = i * chunk + jnp.arange(chunk)
        visible = key_slot[None, None, :] < total[:, None, None]
        mask = (key_slot[None, None, :] <= query_slot[:, :, None]) & visible  # [B, T, C]
        if steps == 1:  # scores laid out [B, T, C, K, G]: keys broadcast without a transpose, so nothing is copied
            mask = mask[:, :, :, None, None]
            scores = jnp.sum(queries[:, :, None].astype(f32) * keys[:, None, :, :, None].astype(f32), axis=-1)
            scores = jnp.where(mask, scores, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=2))
            probs = jnp.where(mask, jnp.exp(scores - new_max[:, :, None]), 0.0)
            chunk_out = jnp.sum(probs[..., None] * values[:, None, :, :, None].astype(f32), axis=2)
            chunk_norm = jnp.sum(probs, axis=2)
        else:
            mask = mask[:, :, None, None, :]  # [B, T, 1, 1, C]
            scores = jnp.einsum("btkgd,bckd->btkgc", queries, keys, preferred_element_type=f32)
            scores = jnp.where(mask, scores, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
            chunk_out = jnp.einsum("btkgc,bckd->btkgd", probs.astype(q.dtype), values, preferred_element_type=f32)
            chunk_norm = jnp.sum(probs, axis=-1)
        rescale = jnp.exp(running_max - new_max)
        return new_max, norm * rescale + chunk_norm, acc * rescale[..., None] + chunk_out

    stats = (batch, steps, kv_heads, groups)
    # A finite floor for the running max keeps exp(running_max - new_max) at 1, never nan, in
    # chunks a row does not reach.
    init = (jnp.full(stats, jnp.finfo(f32).min, f32), jnp.zeros(stats, f32), jnp.zeros((*stats, head_dim), f32))
    last_chunk = (jnp.max(total) + chunk - 1) // chunk
    _, norm, acc = jax.lax.fori_loop(0, jnp.minimum(last_chunk, num_chunks), body, init)
    out = jnp.where(norm[..., None] > 0, acc / jnp.where(norm > 0, norm, 1.0)[..., None], 0.0)
    return out.reshape(batch, steps, heads, head_dim).astype(q.dtype)
