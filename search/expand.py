"""One expansion: K next steps under each of many leaves of every tree, decoded in one batched call.

    expand = allocate_children -> generate_steps -> score_steps -> write_children

As in mctx's `search.py`, where `recurrent_fn` is the model step between selection and
backup, the model calls are two of these pure steps (the policy's decode, the scorer), and
the tree bookkeeping around them is plain array code. Each step takes and returns the
`SearchState`; `Children` carries the rows of the expansion between them: one row per
(tree, leaf, child slot), R = B * E * K, in that order. `complete` extends leaves one step
at a time until every chain has ended.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.flops import decode_flops
from search.sampler import Generated, decode_loop
from search.scorers import Steps
from search.spec import SearchSpec
from search.state import Models, SearchState
from search.tree import Tree, allocate, release


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Children:
    """The rows of one expansion, [R] each (R = B * E * K), the page arrays [R, pages]."""

    tree_index: jax.Array  # which tree (problem of this batch)
    parent: jax.Array  # the leaf expanded (-1: none)
    slot: jax.Array  # the child slot under the leaf, 0..K-1
    node: jax.Array  # the new node's id (-1: none made)
    valid: jax.Array  # bool: a node is made
    start: jax.Array  # context slots cached before the step (the parent's kv_len)
    pending: jax.Array  # the parent's last token, not cached yet: fed first
    pages: jax.Array  # [R, pages_per_node] pages the new node owns (-1: none)
    page_table: jax.Array  # [R, pages_per_path] the new node's root-to-node pages


def expand(spec: SearchSpec, models: Models, params, scorer_params, keys: jax.Array, state: SearchState,
           leaves: jax.Array, num_children: int) -> tuple[SearchState, jax.Array]:
    """Generates `num_children` next steps under each leaf [B, E] (-1: none) in one batched decode.

    keys [B]: each problem's sampling key. Returns the new state and the new node ids
    [B, E, num_children] (-1 where nothing was made: no leaf, a terminal leaf, or no room for
    nodes or pages, which sets `out_of_room`).
    """
    children, state = allocate_children(spec, models, state, leaves, num_children)
    generated, children, state = generate_steps(spec, models, params, keys, state, children)
    scores, state = score_steps(spec, models, scorer_params, state, children, generated)
    state = write_children(spec, models, state, children, generated, scores)
    return state, children.node.reshape(leaves.shape + (num_children,))


def allocate_children(spec: SearchSpec, models: Models, state: SearchState, leaves: jax.Array,
                      k: int) -> tuple[Children, SearchState]:
    """Chooses the leaves [B, E] to expand and gives each of their K children a node id and pages.

    A leaf is expanded once (listed twice, or already expanded: not again), never when terminal
    or dead. A child gets pages for its whole step (the first one a copy of the parent's last,
    when the step starts mid-page) and a node id; a child with no room for either is not made
    and marks its tree `out_of_room`.
    """
    tree = state.tree
    batch, leaves_per_tree = leaves.shape
    ps, width = spec.page_size, spec.pages_per_node
    b_idx = jnp.broadcast_to(jnp.arange(batch)[:, None, None], (batch, leaves_per_tree, k)).reshape(-1)
    parent = jnp.broadcast_to(leaves[:, :, None], (batch, leaves_per_tree, k)).reshape(-1)
    safe_parent = jnp.maximum(parent, 0)
    first_of_leaf = jnp.arange(leaves_per_tree)[None, :, None] == jnp.argmax(
        leaves[:, :, None] == leaves[:, None, :], axis=2
    )[:, :, None]  # a leaf listed twice is expanded once
    unexpanded = ~(tree.children[b_idx, safe_parent] >= 0).any(axis=1)
    wanted = ((parent >= 0) & tree.alive[b_idx, safe_parent] & ~tree.terminal[b_idx, safe_parent] & unexpanded
              & jnp.broadcast_to(first_of_leaf, (batch, leaves_per_tree, k)).reshape(-1))

    start = tree.kv_len[b_idx, safe_parent]
    first_page = start // ps
    counts = jnp.where(wanted, (start + spec.max_step_tokens) // ps - first_page + 1, 0)
    pages, granted, free = allocate(tree.free, counts, width)
    valid = wanted & granted
    per_tree = valid.reshape(batch, -1)
    new_id = (tree.node_count[:, None] + jnp.cumsum(per_tree, axis=1) - 1).reshape(-1)
    fits = new_id < spec.num_nodes
    free = release(free, jnp.where((valid & ~fits)[:, None], pages, -1))
    pages = jnp.where((valid & fits)[:, None], pages, -1)
    out_of_room = tree.out_of_room | (wanted & ~(granted & fits)).reshape(batch, -1).any(axis=1)
    valid = valid & fits
    new_id = jnp.where(valid, new_id, -1)

    slots = first_page[:, None] + jnp.arange(width)[None, :]
    in_table = (pages >= 0) & (slots < spec.pages_per_path)
    parent_table = tree.page_table[b_idx, safe_parent]
    rows = jnp.arange(parent.shape[0])[:, None]
    table = parent_table.at[rows, jnp.where(in_table, slots, spec.pages_per_path)].set(pages, mode="drop")
    shares_page = (start % ps != 0) & valid
    parent_first = parent_table[jnp.arange(parent.shape[0]), first_page.clip(0, spec.pages_per_path - 1)]
    source = jnp.where(shares_page, parent_first, -1)
    cache = state.cache.copy_pages(source, jnp.where(shares_page, pages[:, 0], -1))
    scorer_cache = models.scorer.copy(state.scorer_cache, source, jnp.where(shares_page, pages[:, 0], -1))

    slot = jnp.tile(jnp.repeat(jnp.arange(k)[None, :], leaves_per_tree, axis=0).reshape(-1), batch)
    children = Children(b_idx, parent, slot, new_id, valid, start, tree.pending[b_idx, safe_parent], pages, table)
    tree = dataclasses.replace(tree, free=free, out_of_room=out_of_room)
    return children, dataclasses.replace(state, tree=tree, cache=cache, scorer_cache=scorer_cache)


def generate_steps(spec: SearchSpec, models: Models, params, keys: jax.Array, state: SearchState,
                   children: Children) -> tuple[Generated, Children, SearchState]:
    """Decodes one step (up to the delimiter or EOS) for every made child, all rows in one call.

    Row r of tree b samples with fold_in(fold_in(keys[b], iteration), r mod E*K). The pages
    past the step's end go back to the pool.
    """
    ps, width = spec.page_size, spec.pages_per_node
    rows_per_tree = children.parent.shape[0] // state.tree.batch
    row_keys = jax.vmap(lambda key, r: jax.random.fold_in(jax.random.fold_in(key, state.iteration), r))(
        keys[children.tree_index], jnp.tile(jnp.arange(rows_per_tree), state.tree.batch)
    )
    start, valid, pages = children.start, children.valid, children.pages
    generated = decode_loop(
        models.graphdef, params, state.cache, children.page_table, start, children.pending, valid, row_keys,
        max_new=spec.max_step_tokens, stop_ids=(spec.delimiter, spec.eos), sampling=spec.sampling,
    )
    num = generated.num

    # Keep the pages covering slots start..start+num (the new pending token's slot too); free the rest.
    slots = (start // ps)[:, None] + jnp.arange(width)[None, :]
    keep = valid[:, None] & (slots <= (start + num)[:, None] // ps) & (pages >= 0)
    free = release(state.tree.free, jnp.where(keep, -1, pages))
    pages = jnp.where(keep, pages, -1)
    table = jnp.where(jnp.arange(spec.pages_per_path)[None, :] <= ((start + num) // ps)[:, None],
                      children.page_table, -1)
    children = dataclasses.replace(children, pages=pages, page_table=table)
    state = dataclasses.replace(state, tree=dataclasses.replace(state.tree, free=free), cache=generated.cache)
    return generated, children, state


def score_steps(spec: SearchSpec, models: Models, scorer_params, state: SearchState, children: Children,
                generated: Generated) -> tuple[jax.Array, SearchState]:
    """[R] the scorer's score of each new step (0 where no node was made), from the scorer's own pages."""
    tree, b_idx, valid = state.tree, children.tree_index, children.valid
    steps = Steps(children.page_table, children.start, children.pending, generated.tokens, generated.logprobs,
                  generated.num, valid, state.rows[b_idx])
    path = None
    if models.scorer.needs_path:
        chain = _ancestors(tree, b_idx, jnp.where(valid, children.parent, 0), spec.max_steps)
        path = (tree.tokens[b_idx[:, None], chain.clip(0)] * (chain >= 0)[..., None],
                jnp.where(chain >= 0, tree.step_len[b_idx[:, None], chain.clip(0)], 0))
    scores, scorer_cache = models.scorer.score(scorer_params, state.scorer_cache, steps, path)
    return jnp.where(valid, scores, 0.0), dataclasses.replace(state, scorer_cache=scorer_cache)


def write_children(spec: SearchSpec, models: Models, state: SearchState, children: Children, generated: Generated,
                   scores: jax.Array) -> SearchState:
    """Writes the made children into their trees (links, step, score, pages) and counts their cost."""
    tree, b_idx, valid, parent = state.tree, children.tree_index, children.valid, children.parent
    batch = tree.batch
    safe_parent = jnp.maximum(parent, 0)
    start, num = children.start, generated.num
    last_token = jnp.take_along_axis(generated.tokens, (num - 1).clip(0)[:, None], axis=1)[:, 0]
    depth = tree.depth[b_idx, safe_parent] + 1
    kv_len = start + num
    terminal = (last_token == spec.eos) | (depth >= spec.max_steps) | (kv_len + spec.max_step_tokens + 1 > spec.max_len)
    node = jnp.where(valid, children.node, spec.num_nodes)  # out of range -> dropped
    parent_min = tree.path_min[b_idx, safe_parent]
    parent_prod = tree.path_prod[b_idx, safe_parent]

    def put(array, values):
        return array.at[b_idx, node].set(values, mode="drop")

    tree = dataclasses.replace(
        tree,
        parent=put(tree.parent, parent),
        children=tree.children.at[b_idx, jnp.where(valid, parent, spec.num_nodes), children.slot].set(
            children.node, mode="drop"),
        depth=put(tree.depth, depth),
        prior=put(tree.prior, jnp.sum(generated.logprobs, axis=1)),
        score=put(tree.score, scores),
        path_min=put(tree.path_min, jnp.minimum(parent_min, scores)),
        path_prod=put(tree.path_prod, parent_prod * scores),
        terminal=put(tree.terminal, terminal),
        alive=put(tree.alive, True),
        tokens=tree.tokens.at[b_idx, node].set(generated.tokens, mode="drop"),
        step_len=put(tree.step_len, num),
        kv_len=put(tree.kv_len, kv_len),
        pending=put(tree.pending, last_token),
        own_pages=tree.own_pages.at[b_idx, node].set(children.pages, mode="drop"),
        page_table=tree.page_table.at[b_idx, node].set(children.page_table, mode="drop"),
        node_count=tree.node_count + valid.reshape(batch, -1).sum(axis=1),
    )
    per_row = lambda x: jnp.zeros((batch,), jnp.float32).at[b_idx].add(jnp.where(valid, x, 0))  # noqa: E731
    return SearchState(
        tree, state.cache, state.scorer_cache,
        tokens=state.tokens + per_row(num.astype(jnp.float32)),
        policy_flops=state.policy_flops + per_row(decode_flops(models.model_cfg, start, num)),
        scorer_flops=state.scorer_flops + per_row(models.scorer.flops(start, num)),
        expansions=state.expansions + per_row(jnp.ones_like(start, jnp.float32)),
        iteration=state.iteration + 1,
        rows=state.rows,
    )


def _ancestors(tree: Tree, b: jax.Array, node: jax.Array, depth: int) -> jax.Array:
    """[R, depth] node ids from the root's child down to `node` (-1 padding in front)."""

    def up(carry, _):
        current = carry
        parent = jnp.where(current > 0, tree.parent[b, jnp.maximum(current, 0)], -1)
        return parent, current

    _, chain = jax.lax.scan(up, node, None, length=depth)  # chain[i] = i-th ancestor (0: node itself)
    chain = jnp.where(chain > 0, chain, -1).T  # [R, depth], node first
    return chain[:, ::-1]


def complete(spec: SearchSpec, models: Models, params, scorer_params, keys: jax.Array, state: SearchState,
             leaves: jax.Array) -> tuple[SearchState, jax.Array]:
    """Extends every non-terminal leaf [B, E] one step at a time until all are terminal (or stuck).

    Returns the state and the leaves' ends [B, E].
    """

    def cond(carry):
        state, leaves, steps = carry
        tree = state.tree
        b = jnp.arange(leaves.shape[0])[:, None]
        open_ = (leaves >= 0) & ~tree.terminal[b, leaves.clip(0)] & tree.alive[b, leaves.clip(0)]
        return jnp.any(open_) & (steps < spec.max_steps)

    def body(carry):
        state, leaves, steps = carry
        state, new = expand(spec, models, params, scorer_params, keys, state, leaves, 1)
        new = new[:, :, 0]
        return state, jnp.where(new >= 0, new, leaves), steps + 1

    state, leaves, _ = jax.lax.while_loop(cond, body, (state, leaves, jnp.zeros((), jnp.int32)))
    return state, leaves
