"""`ponder vocab train`: a SentencePiece vocabulary trained on local text files."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder vocab train`."""
    parser = subparsers.add_parser("vocab", help="train a SentencePiece vocabulary on local text")
    commands = parser.add_subparsers(dest="vocab_command", metavar="SUBCOMMAND", required=True)
    train = commands.add_parser(
        "train",
        help="train a SentencePiece model",
        description="Train a SentencePiece model (pad 0, eos 1, unk 2, byte fallback, digits split) "
        "on the files matching --input and write DIR/spm.model and DIR/spm.vocab. Point "
        "data.vocab at DIR/spm.model to use it; the model's vocab_size must be at least the "
        "vocabulary size rounded up to a multiple of 128.",
    )
    train.add_argument("--input", required=True, help="glob of text files, quoted: 'corpus/*.txt'")
    train.add_argument("--size", type=int, required=True, help="vocabulary size")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"))
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Trains and reports the written model and the padded model vocab size."""
    from train.data.vocab import get_vocabulary, padded_vocab_size, train_sentencepiece

    try:
        path = train_sentencepiece(args.input, args.size, args.out, args.model_type)
    except RuntimeError as err:  # SentencePiece's own complaint, e.g. a size below the alphabet's
        print(f"ponder vocab train: error: SentencePiece refused: {str(err).split('] ')[-1]}", file=sys.stderr)
        return 2
    vocab = get_vocabulary(str(path))
    print(f"wrote {path} ({vocab.vocab_size} pieces; set model.vocab_size >= {padded_vocab_size(vocab)})")
    return 0
