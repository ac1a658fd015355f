"""`rgemma tokenize`: a JSON-lines corpus to a token file for training."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jsonl", help='JSON lines {"source", "id", "text"}, one document per line')
    parser.add_argument("out", help="token file to write")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--force", action="store_true", help="replace an existing token file")


def check_out(out: Path, inputs: dict[str, str], force: bool) -> None:
    """Never write onto a file this command reads (`rgemma tokenize corpus.jsonl corpus.jsonl`), nor onto
    an existing file without --force."""
    if not out.exists():
        return
    for name, source in inputs.items():
        if Path(source).exists() and os.path.samefile(out, source):
            raise ValueError(f"{out}: is the {name} this command reads; will not overwrite it")
    if out.is_dir():
        raise IsADirectoryError(f"{out}: is a directory")
    if not force:
        raise FileExistsError(f"{out}: already exists; will not overwrite it without --force")


def run(args: argparse.Namespace) -> None:
    from rgemma.tokenizer import Tokenizer
    from rgemma.train import TokenFile, tokenize_corpus

    check_out(Path(args.out), {"corpus": args.jsonl, "tokenizer": args.tokenizer}, args.force)
    out = tokenize_corpus(args.jsonl, Tokenizer(args.tokenizer), args.out)
    data = TokenFile.open(out)
    print(f"wrote {out}: {len(data):,} tokens in {len(data.starts):,} documents", file=sys.stderr)
