"""ponder: search over reasoning steps, one jitted call per batch of problems.

    spec.py        SearchSpec and the per-strategy table (sizes, budgets, descriptions)
    state.py       SearchState, Models, init_search: a search in flight
    tree.py        the fixed-shape step tree and its page allocator
    sampler.py     token sampling and the paged decode loop
    scorers.py     step scorers: log-prob, reward model, oracle
    expand.py      one expansion: allocate -> generate -> score -> write children
    best_of_n.py   sample and best_of_n;  beam.py: beam and DVTS;  mcts.py: PUCT waves, backup
    sharded.py     run_search: the whole search, split over the mesh with shard_map
    candidates.py  on the host: the finished chains, and the answer chosen among them
    runner.py      a problem file in batches: plan, search, choose, write records
    scaling.py     the scaling table: rows, their runs, the table and the plot
"""
