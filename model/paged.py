"""Paged key/value cache: one page pool shared by every row, a page table per row.

A row's logical slot `s` lives at page `page_table[row, s // page_size]`, offset
`s % page_size`. Rows whose tables share leading pages share that prefix without a copy,
which is how the tree search forks a path. Pure functions; the cache is a pytree.

The pool is laid out kv-head first, [kv_heads, layers, num_pages, page_size, head_dim], so
that every layer's pages together are one [kv_heads, layers * num_pages, page_size, head_dim]
array by a free reshape (`flat_pools`): the layout the stock Pallas paged-attention kernels
read, handed the whole pool and page ids offset by the layer (`pool_pages`), with no
per-layer copy. This file is the one place that knows the layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from configs.schema import ModelConfig
from model import pallas_paged

PAGE_AXIS = 2  # the pool's page axis, the one a search's shards split (`pool_spec`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """k, v: [kv_heads, layers, num_pages, page_size, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[PAGE_AXIS]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[0]

    def flat_pools(self) -> tuple[jax.Array, jax.Array]:
        """k, v as [kv_heads, layers * num_pages, page_size, head_dim] (a reshape, no copy); layer l's
        page p is page l * num_pages + p (`pool_pages`)."""
        kv_heads, layers, pages, page_size, head_dim = self.k.shape
        shape = (kv_heads, layers * pages, page_size, head_dim)
        return self.k.reshape(shape), self.v.reshape(shape)

    def pool_pages(self, layer, page_table: jax.Array) -> jax.Array:
        """page_table [B, P] of `layer` as page ids of `flat_pools` [B, P] int32; -1 (unused) becomes a valid page."""
        return (jnp.clip(page_table, 0, self.num_pages - 1) + layer * self.num_pages).astype(jnp.int32)

    def copy_pages(self, sources: jax.Array, targets: jax.Array) -> PagedKVCache:
        """Pages targets[r] <- sources[r] in every layer, for r with both >= 0 (copy-on-write of a shared page).

        sources, targets: [R] int32 page ids.
        """
        valid = (sources >= 0) & (targets >= 0)
        src = jnp.where(valid, sources, 0)
        dst = jnp.where(valid, targets, self.num_pages)  # out of range: dropped
        return PagedKVCache(self.k.at[:, :, dst].set(self.k[:, :, src], mode="drop"),
                            self.v.at[:, :, dst].set(self.v[:, :, src], mode="drop"))


def pool_spec(axes) -> PartitionSpec:
    """The partition spec of a pool split by pages over mesh `axes` (each shard its own pages)."""
    return PartitionSpec(*(None,) * PAGE_AXIS, axes)


def init_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> PagedKVCache:
    """An all-zero page pool (dtype defaults to the model's compute dtype)."""
    shape = (cfg.num_kv_heads, cfg.num_layers, num_pages, page_size, cfg.resolved_head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return PagedKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_pages(cache: PagedKVCache, layer, k, v, page_table, lengths, num_new) -> PagedKVCache:
    """Writes new keys/values k, v: [B, T, kv_heads, head_dim] at slots lengths..lengths+num_new-1.

    Padding tokens (t >= num_new) and slots past the page table are dropped, never written
    into another row's pages.
    """
    batch, steps = k.shape[:2]
    kv_heads, layers, num_pages, page_size, head_dim = cache.k.shape
    slots = lengths[:, None] + jnp.arange(steps)[None, :]  # [B, T]
    capacity = page_table.shape[1] * page_size
    valid = (jnp.arange(steps)[None, :] < num_new[:, None]) & (slots < capacity)
    page_index = jnp.clip(slots // page_size, 0, page_table.shape[1] - 1)
    pages = jnp.take_along_axis(page_table, page_index, axis=1)
    # An index into the pool viewed as [kv_heads, layers * num_pages * page_size, head_dim]; out of range: dropped
    flat_slots = (layer * num_pages + pages) * page_size + slots % page_size
    flat_slots = jnp.where(valid & (pages >= 0), flat_slots, layers * num_pages * page_size)
    view = (kv_heads, layers * num_pages * page_size, head_dim)

    def write(pool, new):  # new: [B, T, kv_heads, head_dim] -> [kv_heads, B, T, head_dim], the indexed view's order
        updated = pool.reshape(view).at[:, flat_slots].set(jnp.moveaxis(new, 2, 0).astype(pool.dtype), mode="drop")
        return updated.reshape(pool.shape)

    return PagedKVCache(write(cache.k, k), write(cache.v, v))


CHUNK_SLOTS = 64  # keys per attention chunk: a row's pages are read a chunk at a time, only as far as needed


def attend_paged(q, cache: PagedKVCache, layer, page_table, lengths, num_new, *,
                 implementation: str = "auto") -> jax.Array:
    """Attention of new queries over a row's pages (causal within the new tokens).

    q: [B, T, heads, head_dim]; returns [B, T, heads, head_dim]. Query t sits at slot
    lengths + t and sees slots 0..lengths + t of its own row.

    implementation (`model.decode_attention`): "xla" is always `attend_paged_xla`. "auto" runs
    a one-token decode by the platform's kernel where it applies: the Pallas paged-attention
    kernel on TPU (bfloat16 pools) and on CUDA GPUs (Triton), ponder's native kernel on CPU.
    "pallas" runs the Pallas kernel on TPU and GPU and, on CPU, the GPU kernel interpreted
    (slow: for tests and debugging). Everything else, prefill included, is
    `attend_paged_xla`; `pallas_paged.decode_kernel` says which a config gets, and why.
    The choice is made per platform when lowering (`pallas_paged.platform_dependent`), so a
    program lowered for several platforms (`ponder export search`) takes each platform's own.
    """
    branches = pallas_paged.decode_branches(q, cache, implementation)
    if not branches:
        return attend_paged_xla(q, cache, layer, page_table, lengths, num_new)
    return pallas_paged.platform_dependent(q, cache, layer, page_table, lengths, num_new,
                                           default=attend_paged_xla, **branches)


def attend_paged_xla(q, cache: PagedKVCache, layer, page_table, lengths, num_new) -> jax.Array:
    """`attend_paged` in XLA ops, for any platform, dtype and number of new tokens.

    The pages are read in chunks of CHUNK_SLOTS keys with an online softmax, and the loop
    stops after the chunk holding the batch's longest row: a search's page table is sized
    for its longest possible path, and most of it is empty most of the time. A one-token
    decode computes scores as a multiply-and-sum, which XLA fuses with the page gather (the
    gathered keys need not be written out); longer queries use matmuls.
    """
    batch, steps, heads, head_dim = q.shape
    kv_heads, page_size = cache.kv_heads, cache.page_size
    groups, f32 = heads // kv_heads, jnp.float32
    chunk_pages = max(CHUNK_SLOTS // page_size, 1)
    chunk = chunk_pages * page_size
    num_chunks = -(-page_table.shape[1] // chunk_pages)
    table = jnp.pad(cache.pool_pages(layer, page_table), ((0, 0), (0, num_chunks * chunk_pages - page_table.shape[1])))
    k_pool, v_pool = cache.flat_pools()
    total = lengths + num_new  # [B] slots visible after the write
    query_slot = lengths[:, None] + jnp.arange(steps)[None, :]  # [B, T]
    queries = (q * head_dim**-0.5).reshape(batch, steps, kv_heads, groups, head_dim)

    def body(i, carry):
        running_max, norm, acc = carry  # [B, T, K, G], [B, T, K, G], [B, T, K, G, D]
        pages = jax.lax.dynamic_slice_in_dim(table, i * chunk_pages, chunk_pages, axis=1)
        keys = k_pool[:, pages].reshape(kv_heads, batch, chunk, head_dim).astype(q.dtype)  # [K, B, C, D]
        values = v_pool[:, pages].reshape(kv_heads, batch, chunk, head_dim).astype(q.dtype)
        key_slot = i * chunk + jnp.arange(chunk)
        visible = key_slot[None, None, :] < total[:, None, None]
        mask = (key_slot[None, None, :] <= query_slot[:, :, None]) & visible  # [B, T, C]
        if steps == 1:  # scores laid out [B, T, C, K, G]: keys broadcast over the groups, so nothing is copied
            keys, values = (jnp.moveaxis(a, 0, 2)[:, None, :, :, None].astype(f32) for a in (keys, values))
            mask = mask[:, :, :, None, None]
            scores = jnp.sum(queries[:, :, None].astype(f32) * keys, axis=-1)
            scores = jnp.where(mask, scores, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=2))
            probs = jnp.where(mask, jnp.exp(scores - new_max[:, :, None]), 0.0)
            chunk_out = jnp.sum(probs[..., None] * values, axis=2)
            chunk_norm = jnp.sum(probs, axis=2)
        else:
            mask = mask[:, :, None, None, :]  # [B, T, 1, 1, C]
            scores = jnp.einsum("btkgd,kbcd->btkgc", queries, keys, preferred_element_type=f32)
            scores = jnp.where(mask, scores, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
            chunk_out = jnp.einsum("btkgc,kbcd->btkgd", probs.astype(q.dtype), values, preferred_element_type=f32)
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
