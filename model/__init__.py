"""ponder.model: the Flax NNX decoder, paged KV cache, sharding rules, HF conversion."""

from model.paged import PagedKVCache, init_cache
from model.transformer import Transformer, create_model

__all__ = ["PagedKVCache", "Transformer", "create_model", "init_cache"]
