"""`rgemma convert`: an official .pt, Flax/Orbax or HF checkpoint to the Hugging Face layout."""

from __future__ import annotations

import argparse
import sys

from rgemma.cli.numbers import gib_as_bytes
from rgemma.cli.options import DTYPES, torch_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src")
    parser.add_argument("dst", help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="convert the weights to this dtype")
    parser.add_argument("--max-shard-gb", type=gib_as_bytes, default="5", help="shard size limit in GiB")


def run(args: argparse.Namespace) -> None:
    from rgemma.checkpoint import convert

    convert(args.src, args.dst, dtype=torch_dtype(args.dtype), max_shard_bytes=args.max_shard_gb)
    print(f"wrote {args.dst}", file=sys.stderr)
