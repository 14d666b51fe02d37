"""A fixed-shape tree of reasoning steps per problem, over one shared page pool of keys/values.

Arrays are `[B, N]` (per node) or `[B, N, K]` (children) with `-1` sentinels, in the style
of mctx. Node 0 of each tree is its prompt. A node stands for one reasoning step (a line
ending in the step delimiter, or the answer line ending in EOS) and holds:

    parent, children, depth        the tree
    visits, value_sum              MCTS statistics
    prior                          the step's log-prob under the policy
    score, path_min, path_prod     the scorer's score of the step, and aggregated along the path
    terminal                       the step ended the chain (EOS) or nothing more fits
    tokens[:step_len]              the step's tokens
    kv_len, pending                cached context slots up to this node; its last token (not cached)
    own_pages, page_table          pages this node owns; the page list of its root-to-node path

Keys/values of every tree in the batch live in one pool (`PagedKVCache`, plus one per
scorer model). A node owns the pages its step writes. Its first page, when the step starts
mid-page, is a copy of the parent's last page (copy-on-write of one page:
`PagedKVCache.copy_pages`), so a path's slots stay contiguous and the model's paged
attention needs nothing tree-specific. The
prompt's pages belong to node 0 and are shared by every path. Pages of pruned nodes go
back to the pool (`free`), so long searches reuse them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tree:
    parent: jax.Array  # [B, N]
    children: jax.Array  # [B, N, K]
    depth: jax.Array
    visits: jax.Array
    value_sum: jax.Array
    prior: jax.Array
    score: jax.Array
    path_min: jax.Array
    path_prod: jax.Array
    terminal: jax.Array
    alive: jax.Array  # created and not pruned
    tokens: jax.Array  # [B, N, S]
    step_len: jax.Array
    kv_len: jax.Array
    pending: jax.Array
    own_pages: jax.Array  # [B, N, Pn]
    page_table: jax.Array  # [B, N, P]
    node_count: jax.Array  # [B]
    free: jax.Array  # [num_pages] bool, shared by the batch
    out_of_room: jax.Array  # [B] an expansion was refused for want of nodes or pages

    @property
    def batch(self) -> int:
        return self.parent.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.parent.shape[1]

    @property
    def max_children(self) -> int:
        return self.children.shape[2]


def empty_tree(batch: int, num_nodes: int, max_children: int, max_step_tokens: int, pages_per_node: int,
               pages_per_path: int, num_pages: int) -> Tree:
    i32 = lambda shape, fill=-1: jnp.full(shape, fill, jnp.int32)  # noqa: E731
    f32 = lambda shape, fill=0.0: jnp.full(shape, fill, jnp.float32)  # noqa: E731
    bn = (batch, num_nodes)
    return Tree(
        parent=i32(bn), children=i32((*bn, max_children)), depth=i32(bn, 0), visits=f32(bn), value_sum=f32(bn),
        prior=f32(bn), score=f32(bn), path_min=f32(bn, 1.0), path_prod=f32(bn, 1.0),
        terminal=jnp.zeros(bn, bool), alive=jnp.zeros(bn, bool), tokens=i32((*bn, max_step_tokens), 0),
        step_len=i32(bn, 0), kv_len=i32(bn, 0), pending=i32(bn, 0), own_pages=i32((*bn, pages_per_node)),
        page_table=i32((*bn, pages_per_path)), node_count=i32((batch,), 1), free=jnp.ones((num_pages,), bool),
        out_of_room=jnp.zeros((batch,), bool),
    )


def allocate(free: jax.Array, counts: jax.Array, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Takes counts[r] free pages for each row r, in row order, while the pool lasts.

    Returns (pages [R, width] with -1 past each row's count, granted [R] bool, free). A row
    whose request does not fit gets nothing (granted False) and takes no pages.
    """
    available = jnp.sum(free)
    granted = jnp.cumsum(counts) <= available
    counts = jnp.where(granted, counts, 0)
    offsets = jnp.cumsum(counts) - counts
    free_ids = jnp.nonzero(free, size=free.shape[0], fill_value=-1)[0]
    index = offsets[:, None] + jnp.arange(width)[None, :]
    pages = jnp.where(jnp.arange(width)[None, :] < counts[:, None], free_ids[jnp.clip(index, 0, free.shape[0] - 1)], -1)
    free = free.at[jnp.where(pages >= 0, pages, free.shape[0])].set(False, mode="drop")
    return pages.astype(jnp.int32), granted, free


def release(free: jax.Array, pages: jax.Array) -> jax.Array:
    """Returns pages (any shape, -1 ignored) to the pool."""
    flat = pages.reshape(-1)
    return free.at[jnp.where(flat >= 0, flat, free.shape[0])].set(True, mode="drop")


def prune(tree: Tree, nodes: jax.Array) -> Tree:
    """Marks nodes [B, N] bool dead and returns their pages to the pool (node 0 is never pruned)."""
    nodes = nodes & tree.alive & (jnp.arange(tree.num_nodes) > 0)[None, :]
    pages = jnp.where(nodes[..., None], tree.own_pages, -1)
    return dataclasses.replace(
        tree,
        free=release(tree.free, pages),
        alive=tree.alive & ~nodes,
        own_pages=jnp.where(nodes[..., None], -1, tree.own_pages),
    )


# -- host-side views (numpy), for results and invariant checks --


def path_nodes(tree, batch_index: int, node: int) -> list[int]:
    """Node ids from the root's first child down to `node` (the root, the prompt, is left out)."""
    parent = np.asarray(tree.parent[batch_index])
    path = []
    while node > 0:
        path.append(int(node))
        node = int(parent[node])
    return path[::-1]


def path_tokens(tree, batch_index: int, node: int) -> list[int]:
    """The generated token ids of the path to `node` (its steps, concatenated)."""
    tokens, lengths = np.asarray(tree.tokens[batch_index]), np.asarray(tree.step_len[batch_index])
    out: list[int] = []
    for n in path_nodes(tree, batch_index, node):
        out.extend(tokens[n, : lengths[n]].tolist())
    return out


def check_invariants(tree) -> list[str]:
    """Every broken structural invariant of a tree batch, as messages (empty: all hold)."""
    problems = []
    t = jax.tree.map(np.asarray, tree)
    owner: dict[int, tuple[int, int]] = {}
    for b in range(t.parent.shape[0]):
        count = int(t.node_count[b])
        for n in range(count):
            p = int(t.parent[b, n])
            if n == 0:
                if p != -1 or t.depth[b, 0] != 0:
                    problems.append(f"tree {b}: the root has parent {p}, depth {t.depth[b, 0]}")
            else:
                if not 0 <= p < n:
                    problems.append(f"tree {b}: node {n} has parent {p}")
                    continue
                if n not in t.children[b, p]:
                    problems.append(f"tree {b}: node {n} is not among its parent {p}'s children")
                if t.depth[b, n] != t.depth[b, p] + 1:
                    problems.append(f"tree {b}: node {n} depth {t.depth[b, n]} != parent's + 1")
                if t.kv_len[b, n] != t.kv_len[b, p] + t.step_len[b, n]:
                    problems.append(f"tree {b}: node {n} kv_len does not extend its parent's by its step")
                if t.alive[b, n] and not t.alive[b, p]:
                    problems.append(f"tree {b}: node {n} is alive under a pruned parent {p}")
            for c in t.children[b, n]:
                if c >= 0 and (c >= count or t.parent[b, c] != n):
                    problems.append(f"tree {b}: node {n} lists child {c} whose parent is {t.parent[b, c]}")
            for page in t.own_pages[b, n]:
                if page < 0:
                    continue
                if not t.alive[b, n]:
                    problems.append(f"tree {b}: pruned node {n} still owns page {page}")
                if page in owner:
                    problems.append(f"page {page} owned by node {owner[page]} and by {(b, n)}")
                owner[int(page)] = (b, n)
                if t.free[page]:
                    problems.append(f"page {page} of node {(b, n)} is marked free")
        for n in range(count, t.parent.shape[1]):
            if t.alive[b, n] or (t.own_pages[b, n] >= 0).any():
                problems.append(f"tree {b}: unused node slot {n} is alive or owns pages")
    used = int((~t.free).sum())
    if used != len(owner):
        problems.append(f"{used} pages are taken but live nodes own {len(owner)}: {used - len(owner)} leaked")
    return problems
