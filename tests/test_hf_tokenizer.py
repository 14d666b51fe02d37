"""HF tokenizer export/import: exported files load with AutoTokenizer and agree with ponder's seqio ids."""

import json
import random

import numpy as np
import pytest
import seqio
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from configs.schema import DataConfig
from tasks import TASKS
from tasks.base import solution_text
from train.data import Pipeline, get_vocabulary, train_sentencepiece
from train.data.hf_tokenizer import TokenizerJsonVocabulary, write_tokenizer
from train.data.sources import register_component
from train.data.tf_cpu import tf
from train.data.vocab import vocab_id

FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _task_texts(count: int = 12, seed: int = 0) -> list[str]:
    """Prompts and solutions (every trace style) of generated problems, as the data pipeline builds them."""
    texts = []
    for task in TASKS.values():
        for index in range(count):
            problem = task.generate(seed, index, task.difficulties[index % len(task.difficulties)], "train")
            style = task.trace_styles[index % len(task.trace_styles)]
            texts += [problem.prompt, solution_text(task.trace(problem, style), problem.answer)]
    return texts


EXTRA_TEXTS = ["", " ", "  leading, inner   and trailing spaces  ", "tab\tnew\nline\r\n", "émoji 😀, 中文, ｆｕｌｌ",
               "literal specials: </s> <pad> <unk> <0x41>", "ﬁ Ⅻ \u3000 wide", "x" * 60, "1234567890"]


def _random_texts(count: int, alphabet: str = "ab cd 0123456789+-*=:\n().é😀<>/") -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _task_texts() + EXTRA_TEXTS + _random_texts(200)


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("byte_tokenizer")
    assert write_tokenizer("byte", out, model_max_length=512) == FILES
    return out


def test_byte_export_matches_seqio_byte_vocabulary(byte_dir, texts):
    vocab, tokenizer = seqio.ByteVocabulary(), AutoTokenizer.from_pretrained(byte_dir)
    specials = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert specials == (0, 0, 1, 2)
    assert len(tokenizer) == vocab.vocab_size == 259 and tokenizer.model_max_length == 512
    for text in texts:
        ids = list(vocab.encode(text))
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tokenizer(text)["input_ids"] == [0] + ids, text  # BOS id 0, as ponder feeds it
        assert tokenizer.decode(ids) == vocab.decode(ids) == text
        assert tokenizer.decode([0, *ids, 1], skip_special_tokens=True) == text


@pytest.fixture(scope="module", params=["unigram", "bpe", "unigram-pieces-with-<"])
def spm_model(request, tmp_path_factory):
    """A SentencePiece model trained as ponder trains one, on generated task texts and a little prose.

    With "<" inside pieces (the last case) the export cannot isolate "<" and takes its other route.
    """
    folder = tmp_path_factory.mktemp("spm")
    corpus = _task_texts(40, seed=1) + ["The quick brown fox jumps over the lazy dog.", "Émile était là, à Paris."]
    if request.param.endswith("<"):
        corpus += ["if a<=b and <b>x</b> then pad unk 0xDEADBEEF"] * 50 + ["ABCDEF abcdef 0123456789 <>/"]
    (folder / "corpus.txt").write_text("\n".join(corpus) + "\n")
    model_type = request.param.split("-")[0]
    return train_sentencepiece(str(folder / "corpus.txt"), 500, folder / "spm", model_type=model_type)


def test_sentencepiece_export_matches_seqio(spm_model, texts, tmp_path):
    assert write_tokenizer(str(spm_model.parent), tmp_path, model_max_length=256) == ["tokenizer.model", *FILES]
    assert (tmp_path / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    vocab, tokenizer = seqio.SentencePieceVocabulary(str(spm_model)), AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == vocab.vocab_size and tokenizer.eos_token_id == 1
    for text in texts:
        ids = list(vocab.encode(text))
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tokenizer(text)["input_ids"] == [0] + ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == vocab.decode(ids), text


def test_unigram_that_cannot_match_exactly_is_refused(tmp_path):
    """Pieces holding "<" rule out isolating it; then every character of "<pad>" etc. must be a piece."""
    (tmp_path / "corpus.txt").write_text("\n".join(f"a{i % 7}<=b c<=d{i % 5} e<=f" for i in range(300)) + "\n")
    model = train_sentencepiece(str(tmp_path / "corpus.txt"), 300, tmp_path / "spm", model_type="unigram")
    with pytest.raises(ValueError, match=r"spm\.model: unigram pieces contain '<'"):
        write_tokenizer(str(model), tmp_path / "out", model_max_length=64)


def _train_bpe_tokenizer(folder, texts: list[str]) -> None:
    """A byte-level BPE tokenizer.json trained with `tokenizers`, EOS named `<|end|>` in tokenizer_config.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    folder.mkdir(exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "pad_token": "<pad>"}))


def test_tokenizer_json_vocabulary_in_a_seqio_task_and_pipeline(tmp_path):
    folder = tmp_path / "bpe"
    _train_bpe_tokenizer(folder, _task_texts(40, seed=1))
    tokenizer, vocab = Tokenizer.from_file(str(folder / "tokenizer.json")), get_vocabulary(str(folder))
    assert isinstance(vocab, TokenizerJsonVocabulary) and vocab == TokenizerJsonVocabulary(folder / "tokenizer.json")
    assert (vocab.eos_id, vocab.pad_id, vocab.unk_id, vocab.vocab_size) == (1, 0, None, tokenizer.get_vocab_size())

    name = register_component("arithmetic_d2_direct", "sft", str(folder), data_seed=0)
    assert vocab_id(str(folder)) in name and vocab_id(str(folder)).startswith("tok")
    dataset = seqio.get_mixture_or_task(name).get_dataset({"inputs": 64, "targets": 64}, shuffle=False)
    task = TASKS["arithmetic"]
    for index, example in enumerate(dataset.take(5).as_numpy_iterator()):
        problem = task.generate(0, index, 2, "train")
        solution = solution_text(task.trace(problem, "direct"), problem.answer)
        assert example["inputs"].tolist() == tokenizer.encode(problem.prompt, add_special_tokens=False).ids
        assert example["targets"].tolist() == tokenizer.encode(solution, add_special_tokens=False).ids + [1]
        assert vocab.decode(example["targets"].tolist()) == solution

    cfg = DataConfig(mixture={"arithmetic_d2_direct": 1.0}, vocab=str(folder), seq_len=96, max_prompt_len=32,
                     batch_size=2)
    batch = next(Pipeline(cfg, shard_index=0, num_shards=1))
    first = batch["segment_ids"][0] == 1
    problem = task.generate(0, 0, 2, "train")
    expected = [tokenizer.encode(text).ids for text in (problem.prompt, solution_text(problem.steps, problem.answer))]
    assert batch["targets"][0][first].tolist() == [*expected[0], *expected[1], 1] and batch["tokens"][0][0] == 0


def test_exported_byte_tokenizer_reads_back_as_a_vocabulary(byte_dir, texts):
    vocab, byte_vocab = get_vocabulary(str(byte_dir)), seqio.ByteVocabulary()
    assert isinstance(vocab, TokenizerJsonVocabulary)
    assert (vocab.eos_id, vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.vocab_size) == (1, 0, 2, 0, 259)
    for text in texts[:40] + EXTRA_TEXTS:
        assert list(vocab.encode(text)) == list(byte_vocab.encode(text)), text  # "</s>" in text stays bytes
        assert vocab.decode([*byte_vocab.encode(text), 1, 50]) == text  # stops at EOS
        assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == list(byte_vocab.encode(text))
    rows = [[*byte_vocab.encode("2 + 3"), 1, 60], list(byte_vocab.encode("é😀"))]  # after EOS: dropped
    ids = tf.constant([row + [0] * (10 - len(row)) for row in rows], tf.int32)
    assert vocab.decode_tf(ids).numpy().tolist() == [b"2 + 3", "é😀".encode()]
    assert write_tokenizer(str(byte_dir), byte_dir.parent / "again", model_max_length=512) == FILES


def test_special_ids_come_from_hf_files_or_well_known_names(tmp_path):
    tokens = ["<|begin_of_text|>", "!", "a", "<|eot_id|>", "<|end_of_text|>"]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="!"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab = TokenizerJsonVocabulary(tmp_path)
    assert (vocab.eos_id, vocab.pad_id, vocab.unk_id, vocab.bos_id) == (4, 0, None, None)  # no pad: seqio's 0
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4], "bos_token_id": 0}))
    assert (TokenizerJsonVocabulary(tmp_path).eos_id, TokenizerJsonVocabulary(tmp_path).bos_id) == (3, 0)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|end_of_text|>"}}))
    assert TokenizerJsonVocabulary(tmp_path).eos_id == 4


def test_bad_vocab_specs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.vocab: 'bytes'"):
        write_tokenizer("bytes", tmp_path / "out", model_max_length=8)
    with pytest.raises(FileNotFoundError, match="data.vocab: .*tokenizer.json"):
        get_vocabulary(str(tmp_path))  # neither spm.model nor tokenizer.json there
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/tokenizer.json: no tokenizer.json"):
        TokenizerJsonVocabulary(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=f"{tmp_path}/tokenizer.json: not a readable tokenizer.json"):
        get_vocabulary(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable"):
        write_tokenizer(str(tmp_path), tmp_path / "out", model_max_length=8)
    Tokenizer(models.WordLevel({"</s>": 0}, unk_token="</s>")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: unreadable JSON"):
        TokenizerJsonVocabulary(tmp_path)
    Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="no EOS token found"):
        TokenizerJsonVocabulary(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="spm.model: not a SentencePiece model"):
        write_tokenizer(str(tmp_path), tmp_path / "out", model_max_length=8)
    np.testing.assert_equal(vocab_id("byte"), "byte")
