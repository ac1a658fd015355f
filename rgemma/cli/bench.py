"""`rgemma bench`: its options, checked into a bench.Settings before anything is measured."""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
from pathlib import Path

import torch

from rgemma import bench
from rgemma.cli.numbers import positive_int
from rgemma.cli.options import DTYPES
from rgemma.config import PRESETS
from rgemma.hub import resolve_model

ENGINES = (*bench.ENGINE_NAMES, *bench.QUANTIZED_ENGINES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = bench.__doc__.split("\n\n")[0]

    source = parser.add_argument_group("model (one of)")
    source.add_argument("--preset", help="random weights of a preset (2b, 9b, griffin-7b, hawk-7b, tiny)")
    source.add_argument("--model", help="checkpoint directory or file, or a Hugging Face hub id")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--engines", default=",".join(bench.ENGINE_NAMES),
                        help=f"comma-separated (default: {','.join(bench.ENGINE_NAMES)}); "
                             f"{' and '.join(bench.QUANTIZED_ENGINES)} are rgemma on the same weights quantized at load")
    parser.add_argument("--prompt-lengths", default="256,1024,4096", help="prefill lengths; decode follows the shortest")
    parser.add_argument("--batch-sizes", default="1,4", help="decode batch sizes")
    parser.add_argument("--decode-steps", type=int, default=16, help="timed greedy steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=1,
                        help="decode this many times, the engines taking turns, and report each engine's median "
                             "round and every round's speed-ups: the bandwidth drifts between engines; default 1")
    parser.add_argument("--prefill-repeats", type=int, default=1,
                        help="read each prompt this many times and keep the fastest: the first read in a process "
                             "also pays one-off costs (kernel compilation, library set-up); default 1")
    parser.add_argument("--context-growth", nargs="?", const=bench.DEFAULT_CONTEXT_LENGTHS, metavar="LENGTHS",
                        help="also decode at these context lengths against a transformer "
                             f"(default {bench.DEFAULT_CONTEXT_LENGTHS})")
    parser.add_argument("--context-fill", choices=("random", "prefill"), default="random",
                        help="build each context's cache from random keys/values of the right shape, or by prefill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--plot", help="draw tokens/s and memory to this PNG (needs matplotlib)")


def _positive_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{option}: expected positive integers separated by commas, got {text!r}")
    return values


def bench_settings(args: argparse.Namespace) -> bench.Settings:
    """Every option checked here, so that a bad one fails in one line before the first measurement."""
    if (args.preset is None) == (args.model is None):
        raise ValueError("give either --preset NAME (random weights) or --model PATH")
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    if args.model is not None:
        resolve_model(args.model)  # a missing model fails now, not after the first measurements
    engines = tuple(e.strip() for e in args.engines.split(","))
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise ValueError(f"--engines: unknown {', '.join(unknown)!s}; valid: {','.join(ENGINES)}")
    for option, value in (("--decode-steps", args.decode_steps), ("--prefill-repeats", args.prefill_repeats),
                          ("--rounds", args.rounds), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be at least 0, got {args.warmup}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'rgemma[bench]'")
    return bench.Settings(
        source=args.preset or args.model, is_preset=args.preset is not None, dtype=DTYPES[args.dtype],
        device=str(device), threads=args.threads, engines=tuple(dict.fromkeys(engines)),
        prompt_lengths=_positive_list(args.prompt_lengths, "--prompt-lengths"),
        batch_sizes=_positive_list(args.batch_sizes, "--batch-sizes"),
        decode_steps=args.decode_steps, warmup=args.warmup, prefill_repeats=args.prefill_repeats, rounds=args.rounds,
        context_lengths=_positive_list(args.context_growth, "--context-growth") if args.context_growth else (),
        context_fill=args.context_fill, seed=args.seed,
    )


def run(args: argparse.Namespace) -> None:
    settings = bench_settings(args)
    # SIGTERM (`timeout`, kill) as Ctrl-C: report what was measured and remove the temporary checkpoint.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = bench.run(settings)
    print(bench.report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        bench.plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    growth = results.get("context_growth", {}).get("engines", {})
    if any(e["status"] == "interrupted" for e in [*results["engines"].values(), *growth.values()]):
        raise KeyboardInterrupt  # after the partial report: the exit status says it is partial
