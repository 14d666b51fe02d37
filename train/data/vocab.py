"""Vocabularies: seqio's ByteVocabulary by default, SentencePiece trained locally for text corpora."""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from pathlib import Path

import seqio

VOCAB_MULTIPLE = 128  # the model's vocab is padded to a multiple of this (fast matmuls on TPU/GPU)
BOS_ID = 0  # seqio's decoder inputs start each segment with id 0 (the pad id doubles as BOS)


def get_vocabulary(spec: str) -> seqio.Vocabulary:
    """`byte` -> seqio.ByteVocabulary; a HF tokenizer.json (or a dir holding one) -> TokenizerJsonVocabulary;
    otherwise a SentencePiece model file (or a dir holding spm.model)."""
    if spec == "byte":
        return seqio.ByteVocabulary()
    if tokenizer_json := hf_tokenizer_file(spec):
        from train.data.hf_tokenizer import TokenizerJsonVocabulary

        return TokenizerJsonVocabulary(tokenizer_json)
    path = Path(spec)
    if path.is_dir():
        path = path / "spm.model"
    if not path.is_file():
        raise FileNotFoundError(f"data.vocab: {spec!r} is neither `byte`, a SentencePiece model file, a HF "
                                "tokenizer.json, nor a directory holding spm.model or tokenizer.json")
    return seqio.SentencePieceVocabulary(str(path))


def vocab_id(spec: str) -> str:
    """A short name for a vocabulary that changes when the model file does (seqio task names use it)."""
    if spec == "byte":
        return "byte"
    if tokenizer_json := hf_tokenizer_file(spec):
        return "tok" + hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()[:10]
    path = Path(spec) / "spm.model" if Path(spec).is_dir() else Path(spec)
    return "spm" + hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def hf_tokenizer_file(spec: str) -> Path | None:
    """The HF tokenizer JSON that `spec` names (a .json file, or a dir holding tokenizer.json and no spm.model)."""
    path = Path(spec)
    if path.is_dir() and not (path / "spm.model").exists():
        path = path / "tokenizer.json"
    return path if path.suffix == ".json" and path.is_file() else None


def padded_vocab_size(vocab: seqio.Vocabulary, multiple: int = VOCAB_MULTIPLE) -> int:
    """The vocabulary's size rounded up to a multiple of `multiple` (what the model must allocate)."""
    return -(-vocab.vocab_size // multiple) * multiple


def train_sentencepiece(input_glob: str, size: int, out_dir: str | Path, model_type: str = "unigram") -> Path:
    """Trains a SentencePiece model on local text files; writes out_dir/spm.model and spm.vocab.

    Ids follow seqio's conventions: 0 pad, 1 eos, 2 unk, no bos. Written atomically: a failed
    run leaves no half-written model behind.
    """
    import sentencepiece as spm

    files = sorted(glob.glob(input_glob, recursive=True))
    if not files:
        raise FileNotFoundError(f"no files match --input {input_glob!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        spm.SentencePieceTrainer.train(
            input=files,
            model_prefix=os.path.join(tmp, "spm"),
            vocab_size=size,
            model_type=model_type,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            hard_vocab_limit=False,  # small corpora may not fill `size`: stop short instead of failing
            minloglevel=2,
        )
        for name in ("spm.model", "spm.vocab"):
            os.replace(os.path.join(tmp, name), out_dir / name)
    return out_dir / "spm.model"
