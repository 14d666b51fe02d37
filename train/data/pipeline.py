"""One host's stream of packed batches, resumable exactly, and its hand-off to a global jax.Array.

    pipeline = Pipeline(cfg.data, seed=cfg.seed)           # this host's shard of the stream
    batch = next(pipeline)                                  # dict of numpy [host_batch, seq_len]
    arrays = to_global(batch, mesh, cfg.rules())            # jax.Arrays over the batch axes
    pipeline.save(step_dir / "data"); pipeline.restore(step_dir / "data")

Batch features (int32 unless noted), as the model and the loss use them:
  tokens      - model inputs: each segment starts with BOS (id 0), then its tokens shifted right
  targets     - the next token at each position
  loss_mask   - float32: 1 where the loss counts (solution tokens under `sft`; all under `pretrain`)
  segment_ids - which packed example a position belongs to (0 = padding)
  positions   - position within its example (RoPE restarts at 0 for each packed example)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import numpy as np
import seqio
from etils import epath

from configs.fileio import local_copy
from configs.schema import DataConfig
from train.data.sources import register_mixture
from train.data.tf_cpu import tf
from train.data.vocab import get_vocabulary
from train.host_state import DataStateError, load_host_state, save_host_state  # noqa: F401 (DataStateError re-exported)

FEATURES = {
    "decoder_input_tokens": "tokens",
    "decoder_target_tokens": "targets",
    "decoder_loss_weights": "loss_mask",
    "decoder_segment_ids": "segment_ids",
    "decoder_positions": "positions",
}


class Pipeline:
    """This host's shard of a (mixture of) seqio task(s): tokenized, packed, batched, endless."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seed: int = 0,
        split: str = "train",
        shard_index: int | None = None,
        num_shards: int | None = None,
    ):
        self.cfg, self.seed, self.split = cfg, seed, split
        self.shard_index = jax.process_index() if shard_index is None else shard_index
        self.num_shards = jax.process_count() if num_shards is None else num_shards
        if cfg.batch_size % self.num_shards:
            raise ValueError(f"data.batch_size={cfg.batch_size} does not split evenly over {self.num_shards} hosts")
        self.host_batch_size = cfg.batch_size // self.num_shards
        self.vocab = get_vocabulary(cfg.vocab)
        self.batches_read = self.examples_read = self.truncated_examples = 0
        self._warned = False
        self._dataset = self._build()
        self._iterator = iter(self._dataset)

    def _build(self) -> tf.data.Dataset:
        name = register_mixture(self.cfg, self.seed, self.split)
        lengths = {"inputs": self.cfg.max_prompt_len, "targets": self.cfg.seq_len - self.cfg.max_prompt_len}
        dataset = seqio.get_dataset(
            name,
            task_feature_lengths=lengths,
            feature_converter=seqio.DecoderFeatureConverter(pack=self.cfg.pack),
            dataset_split=self.split,
            shuffle="text" in self.cfg.mixture and self.cfg.shuffle_buffer > 0,
            num_epochs=None,
            shard_info=seqio.ShardInfo(self.shard_index, self.num_shards),
            seed=self.seed,
            verbose=False,
        )
        dataset = dataset.map(lambda ex: {ours: ex[theirs] for theirs, ours in FEATURES.items()})
        dataset = dataset.batch(self.host_batch_size, drop_remainder=True).prefetch(2)
        options = tf.data.Options()
        options.deterministic = True
        # The problem generators are pure functions of their index: safe to checkpoint around.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        return dataset.with_options(options)

    def __iter__(self) -> Pipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next host-local batch: each feature [host_batch, seq_len]."""
        batch = {name: value.numpy() for name, value in next(self._iterator).items()}
        batch["loss_mask"] = batch["loss_mask"].astype(np.float32)
        self.batches_read += 1
        self._count_truncated(batch)
        return batch

    def _count_truncated(self, batch: dict[str, np.ndarray]) -> None:
        """Counts examples cut short by seq_len / max_prompt_len and warns once: a cut solution
        has no answer line or EOS, so the model would never learn to finish."""
        segments = batch["segment_ids"]
        following = np.pad(segments[:, 1:], ((0, 0), (0, 1)))
        ends = (segments > 0) & (segments != following)
        cut_solutions = int((ends & (batch["targets"] != self.vocab.eos_id)).sum())
        prompt_lengths = [
            int(((row_ids == seg) & (row_mask == 0)).sum())
            for row_ids, row_mask in zip(segments, batch["loss_mask"], strict=True)
            for seg in np.unique(row_ids[row_ids > 0])
        ]
        cut_prompts = sum(length >= self.cfg.max_prompt_len for length in prompt_lengths)
        self.examples_read += len(prompt_lengths)
        self.truncated_examples += cut_solutions + cut_prompts
        if (cut_solutions or cut_prompts) and not self._warned:
            self._warned = True
            warnings.warn(
                f"data: {cut_solutions} solutions and {cut_prompts} prompts in batch {self.batches_read} "
                f"were cut to data.seq_len={self.cfg.seq_len} / data.max_prompt_len={self.cfg.max_prompt_len}; "
                "raise them (search traces need ~800 byte tokens)",
                stacklevel=2,
            )

    # -- exact resume --

    def _identity(self) -> dict:
        return {"data": self.cfg.model_dump(mode="json"), "seed": self.seed, "split": self.split}

    def save(self, directory: str | Path) -> epath.Path:
        """Writes this host's position to directory/host-I-of-N (atomically); returns that path."""
        state = self._identity() | {"batches_read": self.batches_read}
        return save_host_state(directory, self.shard_index, self.num_shards, state,
                               lambda staging: tf.train.Checkpoint(iterator=self._iterator).write(
                                   str(staging / "iterator")))

    def restore(self, directory: str | Path) -> None:
        """Continues from a saved position: the next batch is the one the saved pipeline would yield next."""
        target, state = load_host_state(directory, self.shard_index, self.num_shards)
        if {k: state[k] for k in self._identity()} != self._identity():
            changed = [k for k in state["data"] if state["data"][k] != self._identity()["data"].get(k)]
            changed += [k for k in ("seed", "split") if state[k] != self._identity()[k]]
            raise DataStateError(f"{target}: saved with different data settings ({', '.join(changed)})")
        with local_copy(target) as local:  # TensorFlow reads its checkpoint from a disk
            tf.train.Checkpoint(iterator=self._iterator).read(str(local / "iterator")).assert_consumed()
        self.batches_read = state["batches_read"]


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules) -> dict[str, jax.Array]:
    """Assembles every host's local batch into global arrays sharded over the mesh's batch axes."""
    from model.sharding import batch_sharding

    out = {}
    for name, local in batch.items():
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        sharding = batch_sharding(mesh, rules, global_shape)
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
