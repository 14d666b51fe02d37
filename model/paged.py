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


def attend_paged(q, cache: PagedKVCache, layer, page_table, lengths, num_new) -> jax.Array:
    """Attention of new queries over a row's pages (causal within the new tokens).

    q: [B, T, heads, head_dim]; returns [B, T, heads, head_dim]. Query t sits at slot
    lengths + t and sees slots 0..lengths + t of its own row.
    """
    batch, steps = q.shape[:2]
    safe_table = jnp.maximum(page_table, 0)
    keys = cache.k[layer, safe_table]  # [B, P, page_size, K, D]
    values = cache.v[layer, safe_table]
    num_slots = page_table.shape[1] * cache.page_size
    keys = keys.reshape(batch, num_slots, *keys.shape[3:]).astype(q.dtype)
    values = values.reshape(batch, num_slots, *values.shape[3:]).astype(q.dtype)
    query_slot = lengths[:, None] + jnp.arange(steps)[None, :]  # [B, T]
    key_slot = jnp.arange(num_slots)
    mask = (key_slot[None, None, :] <= query_slot[:, :, None]) & (
        key_slot[None, None, :] < (lengths + num_new)[:, None, None]
    )
    return jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None], implementation="xla")
