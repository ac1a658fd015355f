"""`rgemma tokenize`: a JSON-lines corpus to a token file for training."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jsonl", help='JSON lines {"source", "id", "text"}, one document per line')
    parser.add_argument("out", help="token file to write")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")


def run(args: argparse.Namespace) -> None:
    from rgemma.tokenizer import Tokenizer
    from rgemma.train import TokenFile, tokenize_corpus

    out = tokenize_corpus(args.jsonl, Tokenizer(args.tokenizer), args.out)
    data = TokenFile.open(out)
    print(f"wrote {out}: {len(data):,} tokens in {len(data.starts):,} documents", file=sys.stderr)
