"""ponder's vocabularies <-> HuggingFace tokenizer files, both directions.

Export (`write_tokenizer`): a `tokenizer.json` (built with `tokenizers`) plus
`tokenizer_config.json` and `special_tokens_map.json` that `AutoTokenizer.from_pretrained`
loads as a `PreTrainedTokenizerFast` and that tokenizes exactly as ponder's seqio vocabulary:

    tokenizer(text, add_special_tokens=False)["input_ids"] == vocab.encode(text)
    tokenizer(text)["input_ids"] == [0] + vocab.encode(text)   # BOS `<pad>` (id 0), as ponder feeds it

Specials: `<pad>` 0 (also BOS), `</s>` 1 (EOS), `<unk>` 2. `split_special_tokens` is on, so a
literal "</s>" in text is tokenized as text, as seqio does. A SentencePiece model is also copied
as `tokenizer.model`; its `tokenizer.json` is rebuilt from the model's proto (normalizer charsmap,
whitespace rules, unigram scores or bpe merges, byte fallback).

Import (`TokenizerJsonVocabulary`): a seqio Vocabulary over any `tokenizer.json`, so a model
brought in from HF trains and searches with its own tokenizer (`data.vocab` naming the file, or
its directory, picks it: see train/data/vocab.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import seqio
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from train.data.tf_cpu import tf
from train.data.vocab import hf_tokenizer_file

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: seqio's pad, eos, unk
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<eos>")
PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
UNK_NAMES = ("<unk>", "<|unk|>")


def write_tokenizer(vocab_spec: str, out_dir: Path, *, model_max_length: int) -> list[str]:
    """Writes the HF tokenizer files for `data.vocab` = vocab_spec into out_dir; returns the names written.

    `byte` and SentencePiece models get the files described above; a HF tokenizer.json (a model
    imported from HF) is copied with its tokenizer_config.json and special_tokens_map.json.
    """
    out_dir = Path(out_dir)
    if vocab_spec == "byte":
        tokenizer, model_file = _byte_tokenizer(), None
    elif tokenizer_json := hf_tokenizer_file(vocab_spec):
        return _copy_tokenizer(TokenizerJsonVocabulary(tokenizer_json).path, out_dir)
    else:
        model_file = Path(vocab_spec) / "spm.model" if Path(vocab_spec).is_dir() else Path(vocab_spec)
        if not model_file.is_file():
            raise FileNotFoundError(f"data.vocab: {vocab_spec!r} is neither `byte`, a SentencePiece model "
                                    "nor a HF tokenizer.json (or a directory holding one)")
        tokenizer = _sentencepiece_tokenizer(model_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if model_file:
        shutil.copyfile(model_file, out_dir / "tokenizer.model")
        written.append("tokenizer.model")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<pad> $A", pair="<pad> $A $B:1", special_tokens=[("<pad>", 0)])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    specials = {"bos_token": "<pad>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": model_max_length,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    return [*written, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _copy_tokenizer(tokenizer_json: Path, out_dir: Path) -> list[str]:
    """A vocabulary imported from HF goes back out as it came: its tokenizer files, copied."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {"tokenizer.json": tokenizer_json} | {
        name: tokenizer_json.parent / name for name in ("tokenizer_config.json", "special_tokens_map.json")}
    written = [name for name, path in sources.items() if path.is_file()]
    for name in written:
        shutil.copyfile(sources[name], out_dir / name)
    return written


def _add_specials(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIALS])
    return tokenizer


def _byte_tokenizer() -> Tokenizer:
    """seqio.ByteVocabulary as tokenizers: UTF-8 bytes (as ByteLevel characters) -> byte + 3, no merges."""
    alphabet = _bytes_to_unicode()
    vocab = {name: i for i, name in enumerate(SPECIALS)} | {alphabet[b]: b + 3 for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _add_specials(tokenizer)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the one the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _sentencepiece_tokenizer(path: Path) -> Tokenizer:
    """A tokenizers Tokenizer that encodes as the SentencePiece model at `path` does (unigram or bpe)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError, a plain Exception subclass
        raise ValueError(f"{path}: not a SentencePiece model ({error})") from None
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(piece.piece, piece.type) for piece in proto.pieces]
    problems = [
        "model_type must be unigram or bpe" * (trainer.model_type not in (1, 2)),
        "ids 0, 1, 2 must be <pad>, </s>, <unk>" * ([p for p, _ in pieces[:3]] != list(SPECIALS)),
        "user-defined pieces are not supported" * any(kind == 4 for _, kind in pieces),
        "treat_whitespace_as_suffix is not supported" * trainer.treat_whitespace_as_suffix,
        "a denormalizer is not supported" * bool(proto.denormalizer_spec.precompiled_charsmap),
    ]
    if any(problems):
        raise ValueError(f"{path}: cannot export as an exactly matching HF tokenizer: "
                         + "; ".join(p for p in problems if p))
    normal = {name: i for i, (name, kind) in enumerate(pieces) if kind == 1}
    # Every control and byte piece name starts with "<"; SentencePiece never matches them in text.
    isolate = not any("<" in name for name in normal if len(name) > 1)
    if trainer.model_type == 1:
        model = models.Unigram(_unigram_scores(proto, normal, isolate, path), unk_id=2,
                               byte_fallback=trainer.byte_fallback)
    else:
        # SentencePiece bpe merges the adjacent pair whose union has the best score (= lowest id),
        # leftmost first: BPE merges ranked by the merged piece's id, ties by position.
        merges = [(name[:cut], name[cut:]) for name in sorted(normal, key=normal.get)
                  for cut in range(1, len(name)) if name[:cut] in normal and name[cut:] in normal]
        vocab = {name: i for i, (name, _) in enumerate(pieces)}
        model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=trainer.byte_fallback)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    prepend = "always" if norm.add_dummy_prefix else "never"
    pre = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)]
    if isolate and trainer.model_type == 1:  # no unigram path can then use a "<...>" piece
        pre.append(pre_tokenizers.Split("<", behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []),
    ])
    return _add_specials(tokenizer)


def _unigram_scores(proto, normal: dict[str, int], isolate: bool, path: Path) -> list[tuple[str, float]]:
    """The unigram (piece, score) table; control and byte pieces scored out of reach unless "<" is isolated.

    tokenizers' Viterbi matches every piece, control and byte ones included. Isolating "<" (when no
    real piece contains it) keeps those out of every path with the scores untouched. Otherwise they
    score 1e6 below any piece, which is exact when each character of their names is a piece of its
    own and every character of every piece is too (so no unknown-character node, whose score
    follows the lowest, ever competes with a real piece).
    """
    if isolate:
        return [(piece.piece, piece.score) for piece in proto.pieces]
    chars = {c for name in normal for c in name} | set("<>/padsunkx0123456789ABCDEF")
    missing = sorted(c for c in chars if c not in normal)
    if missing:
        raise ValueError(f"{path}: unigram pieces contain '<' and the characters {missing} are not pieces "
                         "of their own, so no HF tokenizer matches it exactly")
    floor = min(proto.pieces[i].score for i in normal.values()) - 1e6
    return [(piece.piece, piece.score if piece.type == 1 else floor) for piece in proto.pieces]


class TokenizerJsonVocabulary(seqio.Vocabulary):
    """A seqio Vocabulary over a HF `tokenizer.json` (the file, or a directory holding it).

    Ids are the tokenizer's own with add_special_tokens=False (no BOS/EOS added). eos, pad, unk and
    bos come from the files HF keeps beside it (tokenizer_config.json, special_tokens_map.json,
    generation_config.json, config.json), else from well-known token names. Without a pad token,
    pad_id is 0, seqio's convention (its feature converters pad and start sequences with 0). As in
    transformers, `split_special_tokens: true` in tokenizer_config.json makes special-token text
    plain text. `encode_tf` takes a scalar string; `decode_tf` ids [..., T].
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer.json there")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON or an unknown model
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({error})") from None
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        config = _read_json(self.path.parent / "tokenizer_config.json", self.path)
        self.tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self._ids = {kind: self._special_id(kind, config, names) for kind, names in
                     (("eos", EOS_NAMES), ("pad", PAD_NAMES), ("unk", UNK_NAMES), ("bos", ()))}
        if self._ids["eos"] is None:
            raise ValueError(f"{self.path}: no EOS token found (set eos_token in tokenizer_config.json)")
        super().__init__()

    def _special_id(self, kind: str, config: dict, names: tuple[str, ...]) -> int | None:
        """The id of the `kind` (eos/pad/unk/bos) token: named in HF's files, else a well-known name."""
        folder = self.path.parent
        for source in (config, _read_json(folder / "special_tokens_map.json", self.path)):
            token = source.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return self.tokenizer.token_to_id(token)
        for name in ("generation_config.json", "config.json"):
            value = _read_json(folder / name, self.path).get(f"{kind}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
        return next((self.tokenizer.token_to_id(n) for n in names if self.tokenizer.token_to_id(n) is not None), None)

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        return 0 if self._ids["pad"] is None else self._ids["pad"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str | bytes) -> list[int]:
        s = s.decode() if isinstance(s, bytes) else s
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        """Text of ids up to the first EOS; specials and out-of-range ids dropped."""
        ids = [int(i) for i in ids]
        ids = ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids  # decode_tf pads past EOS with pad_id
        size = self._base_vocab_size
        return self.tokenizer.decode([i for i in ids if 0 <= i < size], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """s: scalar tf.string -> [T] int32."""
        def encode(text) -> np.ndarray:  # text: bytes in tf.data, a 0-d object array when eager
            return np.asarray(self._encode(np.asarray(text).item()), np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        return tf.ensure_shape(ids, [None])

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """ids: [..., T] int32 -> [...] tf.string."""
        def decode(rows: np.ndarray) -> np.ndarray:
            flat = rows.reshape(-1, rows.shape[-1])
            return np.array([self._decode(row).encode() for row in flat], dtype=object).reshape(rows.shape[:-1])

        text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        return tf.ensure_shape(text, ids.shape[:-1])

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenizerJsonVocabulary) and (self.digest, self._ids) == (other.digest, other._ids)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __str__(self) -> str:
        return f"TokenizerJsonVocabulary({self.path}, size={self.vocab_size}, eos={self.eos_id}, pad={self.pad_id})"


def _read_json(path: Path, owner: Path) -> dict:
    """A JSON object from path, {} if there is none; a broken file raises naming it (and what it is for)."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable JSON beside {owner.name} ({error})") from None
    return content if isinstance(content, dict) else {}
