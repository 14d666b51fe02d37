"""The seqio pipeline: real Tasks, Mixtures, packing, host shards, exact resume, vocabularies."""

import jax
import numpy as np
import pytest
import seqio

from configs.schema import DataConfig, MeshConfig
from model.sharding import make_mesh
from tasks import get_task
from tasks.base import solution_text
from train.data import DataStateError, Pipeline, get_vocabulary, padded_vocab_size, to_global, train_sentencepiece
from train.data.shards import HostShards
from train.data.sources import register_component

RULES = (("batch", ("data", "fsdp")),)
VOCAB = seqio.ByteVocabulary()


def _cfg(**kw) -> DataConfig:
    return DataConfig(**({"mixture": {"arithmetic_d2_direct": 1.0}, "seq_len": 128, "max_prompt_len": 48,
                          "batch_size": 4} | kw))


def _segments(batch):
    """(row, segment id, targets, loss_mask, positions, tokens) of every packed example."""
    for row in range(batch["segment_ids"].shape[0]):
        ids = batch["segment_ids"][row]
        for segment in np.unique(ids[ids > 0]):
            where = ids == segment
            yield (row, segment, batch["targets"][row][where], batch["loss_mask"][row][where],
                   batch["positions"][row][where], batch["tokens"][row][where])


def _decode(ids) -> str:
    return VOCAB.decode([int(i) for i in ids if i > 1])


def test_batches_have_the_configured_shapes():
    batch = next(Pipeline(_cfg(), shard_index=0, num_shards=1))
    assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
    for name, value in batch.items():
        assert value.shape == (4, 128), name
    assert batch["loss_mask"].dtype == np.float32 and batch["tokens"].dtype == np.int32


def test_packing_and_loss_mask_cover_exactly_the_solution():
    task = get_task("arithmetic")
    problems = [task.generate(0, i, 2, "train") for i in range(400)]
    by_prompt = {p.prompt: p for p in problems}
    batch = next(Pipeline(_cfg(), shard_index=0, num_shards=1))
    segments = list(_segments(batch))
    assert len(segments) > 4  # several examples packed per row
    for _, _, targets, mask, positions, tokens in segments:
        np.testing.assert_array_equal(positions, np.arange(len(positions)))  # RoPE restarts per example
        assert tokens[0] == 0 and (tokens[1:] == targets[:-1]).all()  # BOS, then shifted targets
        prompt, solution = _decode(targets[mask == 0]), _decode(targets[mask == 1])
        assert mask[: len(prompt)].sum() == 0 and mask[len(prompt) :].all()  # prompt first, then loss on
        problem = by_prompt[prompt]
        assert solution == solution_text(problem.steps, problem.answer)
        assert targets[-1] == VOCAB.eos_id and mask[-1] == 1  # the model learns to stop


def test_pretrain_objective_puts_loss_on_every_token():
    batch = next(Pipeline(_cfg(objective="pretrain"), shard_index=0, num_shards=1))
    np.testing.assert_array_equal(batch["loss_mask"] > 0, batch["segment_ids"] > 0)


def test_host_shards_are_disjoint_and_cover_the_stream():
    """At the source: host i of n reads problems i, i+n, ...; together exactly the whole stream."""
    name = register_component("countdown_d2_direct", "sft", "byte", 0)
    task = seqio.get_mixture_or_task(name)

    def prompts(shard, shards, count):
        ds = task.get_dataset(None, split="train", shuffle=False, shard_info=seqio.ShardInfo(shard, shards))
        return [_decode(ex["inputs"]) for ex in ds.take(count).as_numpy_iterator()]

    whole = prompts(0, 1, 40)
    first, second = prompts(0, 2, 20), prompts(1, 2, 20)
    assert first == whole[0::2] and second == whole[1::2]
    # and at the batch level, two hosts' first batches hold different problems
    hosts = [next(Pipeline(_cfg(batch_size=8), shard_index=i, num_shards=2)) for i in range(2)]
    texts = [{_decode(s[2]) for s in _segments(b)} for b in hosts]
    assert not texts[0] & texts[1]


@pytest.mark.parametrize(
    "mixture", [{"arithmetic_d2_direct": 1.0}, {"arithmetic_d2_direct": 2.0, "countdown_d2_search": 1.0}]
)
def test_resume_yields_exactly_the_next_batch(tmp_path, mixture):
    cfg = _cfg(mixture=mixture)
    uninterrupted = Pipeline(cfg, seed=3, shard_index=0, num_shards=1)
    interrupted = Pipeline(cfg, seed=3, shard_index=0, num_shards=1)
    for _ in range(3):
        next(uninterrupted)
        next(interrupted)
    interrupted.save(tmp_path / "data")
    want = [next(uninterrupted) for _ in range(2)]

    resumed = Pipeline(cfg, seed=3, shard_index=0, num_shards=1)
    resumed.restore(tmp_path / "data")
    assert resumed.batches_read == 3
    for expected in want:
        got = next(resumed)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_restore_refuses_another_shard_count_or_other_settings(tmp_path):
    pipeline = Pipeline(_cfg(batch_size=8), shard_index=0, num_shards=2)
    next(pipeline)
    pipeline.save(tmp_path / "data")
    with pytest.raises(DataStateError, match="saved as 2 data shards but this run reads 1; .* Set data.shards=2"):
        Pipeline(_cfg(batch_size=8), shard_index=0, num_shards=1).restore(tmp_path / "data")
    with pytest.raises(DataStateError, match="seq_len"):
        Pipeline(_cfg(batch_size=8, seq_len=96), shard_index=0, num_shards=2).restore(tmp_path / "data")


def test_mixture_rates_are_respected():
    cfg = _cfg(mixture={"arithmetic_d1_direct": 3.0, "sudoku_d1_direct": 1.0}, batch_size=16, seq_len=256)
    pipeline = Pipeline(cfg, seed=0, shard_index=0, num_shards=1)
    kinds = [_decode(s[2]).startswith("Compute") for _ in range(4) for s in _segments(next(pipeline))]
    assert len(kinds) > 100
    assert 0.6 < np.mean(kinds) < 0.9  # 0.75 expected


def test_text_files_task_with_a_trained_sentencepiece_vocab(tmp_path):
    task = get_task("countdown")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(2):
        lines = [task.generate(0, 500 * part + i, 2, "train") for i in range(500)]
        text = "\n".join(p.prompt.replace("\n", " ") + solution_text(p.steps, p.answer).replace("\n", " ")
                         for p in lines)
        (corpus / f"part{part}.txt").write_text(text + "\n")
    model_path = train_sentencepiece(str(corpus / "*.txt"), 300, tmp_path / "spm")
    vocab = get_vocabulary(str(model_path))
    sample = "Numbers: 25 17 3 6 Target: 42 25 + 17 = 42 | left: 42 3 6 Answer: 25 + 17"
    assert vocab.decode(vocab.encode(sample)) == sample
    assert len(vocab.encode(sample)) < len(sample)  # it learned pieces longer than one character
    assert padded_vocab_size(vocab) % 128 == 0 and 0 <= padded_vocab_size(vocab) - vocab.vocab_size < 128

    cfg = _cfg(mixture={"text": 1.0}, text_files=[str(corpus / "*.txt")], vocab=str(model_path), objective="pretrain")
    batch = next(Pipeline(cfg, shard_index=0, num_shards=1))
    np.testing.assert_array_equal(batch["loss_mask"] > 0, batch["segment_ids"] > 0)
    assert "Target:" in vocab.decode([int(t) for t in batch["targets"][0] if t > 1])


def test_local_batches_become_one_global_array_over_the_batch_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    batch = next(Pipeline(_cfg(batch_size=8), shard_index=0, num_shards=1))
    arrays = to_global(batch, mesh, RULES)
    assert arrays["tokens"].shape == (8, 128)
    assert arrays["tokens"].sharding.spec[0] == ("data", "fsdp")
    shards = arrays["tokens"].addressable_shards
    assert len(shards) == 8 and shards[0].data.shape == (1, 128)
    np.testing.assert_array_equal(np.asarray(arrays["targets"]), batch["targets"])
    assert jax.process_count() == 1


def test_examples_cut_by_the_sequence_length_are_counted_and_warned_about():
    short = Pipeline(_cfg(mixture={"countdown_d3_search": 1.0}), shard_index=0, num_shards=1)
    with pytest.warns(UserWarning, match="were cut to data.seq_len=128"):
        next(short)
    assert short.truncated_examples > 0
    fits = Pipeline(_cfg(), shard_index=0, num_shards=1)
    next(fits)
    assert fits.truncated_examples == 0 and fits.examples_read > 4


def test_one_host_reading_two_shards_sees_what_two_hosts_see_and_resumes_on_either(tmp_path):
    """data.shards=2: one process's batch is the two processes' batches one after the other, and a
    position saved by one process restores onto two (and back) without repeating or skipping."""
    cfg = _cfg(batch_size=8)

    def host(index, count, seed=0):
        return HostShards(lambda k, n: Pipeline(cfg, seed=seed, shard_index=k, num_shards=n), 2,
                          process_index=index, process_count=count)

    alone, pair = host(0, 1), [host(0, 2), host(1, 2)]
    assert list(alone.shards) == [0, 1] and [list(h.shards) for h in pair] == [[0], [1]]
    for _ in range(2):
        together = next(alone)
        apart = [next(h) for h in pair]
        for name in together:
            np.testing.assert_array_equal(together[name], np.concatenate([b[name] for b in apart]), err_msg=name)
    alone.save(tmp_path / "one")
    expected = next(alone)
    resumed = [host(0, 2), host(1, 2)]
    for h in resumed:
        h.restore(tmp_path / "one")
    got = [next(h) for h in resumed]
    np.testing.assert_array_equal(expected["tokens"], np.concatenate([b["tokens"] for b in got]))
    with pytest.raises(DataStateError, match="does not split evenly over 3 processes"):
        host(0, 3)
