"""`rgemma quantize`: a checkpoint with int8 or int4 weights (the RG-LRU, conv and norms stay float)."""

from __future__ import annotations

import argparse
import functools
import sys

from rgemma.cli.numbers import gib_as_bytes
from rgemma.cli.options import DTYPES, torch_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a float checkpoint (any format `convert` reads)")
    parser.add_argument("dst", help="output directory (must not exist)")
    parser.add_argument("--bits", type=int, required=True, metavar="{8,4}",
                        help="8: int8 with a scale per output row; 4: int4 with a scale and minimum per group")
    parser.add_argument("--group-size", type=int, metavar="N",
                        help="inputs per int4 group, a multiple of 64 (default 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the parts kept in float "
                        "(default: the checkpoint's)")
    parser.add_argument("--max-shard-gb", type=gib_as_bytes, default="5", help="shard size limit in GiB")


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from rgemma.checkpoint import convert
    from rgemma.quantize import DEFAULT_GROUP_SIZE, check_format

    if args.group_size is not None and args.bits != 4:
        raise ValueError("--group-size applies to --bits 4 only (int8 keeps one scale per row)")
    group_size = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    check_format(args.bits, group_size)  # before the progress bar, so that a bad value is one line
    progress = functools.partial(tqdm, desc=f"quantizing to int{args.bits}", unit="tensor", file=sys.stderr,
                                 leave=False)
    convert(args.src, args.dst, dtype=torch_dtype(args.dtype), max_shard_bytes=args.max_shard_gb,
            quantize=args.bits, group_size=group_size, progress=progress)
    print(f"wrote {args.dst}", file=sys.stderr)
