"""seqio Tasks and Mixtures: generated reasoning problems and plain-text corpora.

Every task emits the same two text features, so any of them mix:
  inputs  - the prompt (no loss under `sft`; empty under `pretrain` and for text lines)
  targets - the solution steps and answer line, then EOS (the whole text under `pretrain`)
Registration is idempotent: names encode everything that defines a task.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

import seqio

from tasks import get_task
from tasks.base import SPLITS, solution_text
from train.data.tf_cpu import tf
from train.data.vocab import get_vocabulary, vocab_id

_COMPONENT = re.compile(r"^(?P<task>[a-z]+)_d(?P<difficulty>[0-9]+)_(?P<style>[a-z]+)$")


@dataclasses.dataclass(frozen=True)
class Component:
    """A reasoning-task stream: `countdown_d3_search` is countdown, difficulty 3, search traces."""

    task: str
    difficulty: int
    style: str

    @classmethod
    def parse(cls, name: str) -> Component:
        match = _COMPONENT.match(name)
        if not match:
            raise ValueError(f"data.mixture: {name!r} is not TASK_dN_STYLE (e.g. countdown_d3_direct) or `text`")
        component = cls(match["task"], int(match["difficulty"]), match["style"])
        task = get_task(component.task)  # raises on an unknown task, listing the known ones
        if component.difficulty not in task.difficulties:
            raise ValueError(f"data.mixture.{name}: difficulty must be one of {task.difficulties}")
        if component.style not in task.trace_styles:
            raise ValueError(f"data.mixture.{name}: trace style must be one of {task.trace_styles}")
        return component


class GeneratedSource(seqio.FunctionDataSource):
    """A FunctionDataSource that passes the shard to its function, so each host generates only its part."""

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **unused) -> tf.data.Dataset:
        return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed, shard_info=shard_info)


def _problem_texts(component: Component, objective: str, split: str, seed: int, index) -> tuple[bytes, bytes]:
    task = get_task(component.task)
    problem = task.generate(seed, int(index), component.difficulty, split)
    solution = solution_text(task.trace(problem, component.style), problem.answer)
    if objective == "pretrain":
        return b"", (problem.prompt + solution).encode()
    return problem.prompt.encode(), solution.encode()


def _problem_dataset(component, objective, data_seed, split, shuffle_files, seed=None, shard_info=None):
    """Problems index, index + num_shards, ... of `split`: an endless, deterministic stream."""
    del shuffle_files, seed  # the order is the index order; sampling seeds come from data_seed
    first, step = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    texts = functools.partial(_problem_texts, component, objective, split, data_seed)

    def to_features(index):
        inputs, targets = tf.numpy_function(texts, [index], [tf.string, tf.string], stateful=False)
        return {"inputs": tf.ensure_shape(inputs, []), "targets": tf.ensure_shape(targets, [])}

    return tf.data.Dataset.range(first, 2**62, step).map(
        to_features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


@seqio.map_over_dataset
def _line_to_features(line):
    return {"inputs": tf.constant("", tf.string), "targets": line}


def _drop_blank_lines(dataset):
    return dataset.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)


def _output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {"inputs": seqio.Feature(vocab, add_eos=False), "targets": seqio.Feature(vocab, add_eos=True)}


_PREPROCESSORS = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]


def register_component(name: str, objective: str, vocab: str, data_seed: int) -> str:
    """Registers (once) the seqio Task for a reasoning component; returns its registry name."""
    component = Component.parse(name)
    task_name = f"ponder_{name}_{objective}_{vocab_id(vocab)}_seed{data_seed}"
    if task_name not in seqio.TaskRegistry.names():
        dataset_fn = functools.partial(_problem_dataset, component, objective, data_seed)
        seqio.TaskRegistry.add(
            task_name,
            GeneratedSource(dataset_fn, splits=SPLITS),
            preprocessors=_PREPROCESSORS,
            output_features=_output_features(get_vocabulary(vocab)),
        )
    return task_name


def register_text(train_files: list[str], validation_files: list[str], vocab: str) -> str:
    """Registers (once) a Task reading lines of local text files (globs); returns its name."""
    key = repr((sorted(train_files), sorted(validation_files), vocab_id(vocab))).encode()
    task_name = "ponder_text_" + hashlib.sha256(key).hexdigest()[:12]
    if task_name not in seqio.TaskRegistry.names():
        patterns = {"train": train_files} | ({"validation": validation_files} if validation_files else {})
        seqio.TaskRegistry.add(
            task_name,
            seqio.TextLineDataSource(split_to_filepattern=patterns),
            preprocessors=[_drop_blank_lines, _line_to_features, *_PREPROCESSORS],
            output_features=_output_features(get_vocabulary(vocab)),
        )
    return task_name


def register_mixture(data_cfg, data_seed: int, split: str = "train") -> str:
    """The seqio Task (one component) or Mixture (several, with rates) a DataConfig names.

    For a split other than train, a text component without files for that split is left out.
    """
    names = {}
    for name, rate in data_cfg.mixture.items():
        if name == "text" and split != "train" and not data_cfg.text_validation_files:
            continue
        if name == "text":
            task_name = register_text(data_cfg.text_files, data_cfg.text_validation_files, data_cfg.vocab)
        else:
            task_name = register_component(name, data_cfg.objective, data_cfg.vocab, data_seed)
        names[task_name] = rate
    if not names:
        raise ValueError(f"data.mixture has no component with a {split!r} split")
    if len(names) == 1:
        return next(iter(names))
    mixture_name = "ponder_mix_" + hashlib.sha256(repr(sorted(names.items())).encode()).hexdigest()[:12]
    if mixture_name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(mixture_name, list(names.items()))
    return mixture_name
