"""The seqio input pipeline: reasoning tasks and text files -> packed, sharded, resumable batches."""

from train.data import tf_cpu  # noqa: F401, I001  (first: TensorFlow loads quietly, on host CPUs only)
from train.data.pipeline import DataStateError, Pipeline, to_global
from train.data.vocab import get_vocabulary, padded_vocab_size, train_sentencepiece

__all__ = ["DataStateError", "Pipeline", "get_vocabulary", "padded_vocab_size", "to_global", "train_sentencepiece"]
