"""`rgemma build-kernels`: compile the native CPU kernels of every level this CPU runs, now rather than at first
use (each takes about a minute; each is built once per install and cached)."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level", action="append",
                        help="build only this level (repeatable; default: every level this CPU runs)")


def run(args: argparse.Namespace) -> None:
    from rgemma.backends import native

    levels = args.level or native.machine_levels()
    if not levels:
        raise ValueError("this CPU runs none of the kernels' levels "
                         f"({', '.join(native.LEVELS)}): rgemma computes with plain PyTorch here")
    for level in levels:
        native.chosen_level(level)  # an unknown level, or one this CPU lacks, is one line
    for count, level in enumerate(levels, 1):
        where = native.level_build_dir(level)
        if native.is_built(level):
            print(f"[{count}/{len(levels)}] {level}: already built in {where}", flush=True)
            continue
        print(f"[{count}/{len(levels)}] {level}: compiling into {where} ...", flush=True)
        started = time.perf_counter()
        if native.kernels(level) is None:
            print(f"rgemma: the {level} kernels could not be built (see the warning above)", file=sys.stderr)
            raise SystemExit(1)
        print(f"[{count}/{len(levels)}] {level}: built in {time.perf_counter() - started:.0f} s", flush=True)
    print(f"this process would use {native.chosen_level()}")
