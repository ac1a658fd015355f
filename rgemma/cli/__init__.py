"""The `rgemma` command line.

`main` imports only the module of the subcommand being run, and most of
those import torch and the model code inside `run` (train reads its
options' defaults from TrainSettings, which needs no torch), so that
`--help` and bad options answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from safetensors import SafetensorError  # torch-free, like everything imported here

# name -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "info": ("rgemma.cli.info", "config, parameter count, dtype and state size of a model"),
    "build-kernels": ("rgemma.cli.build_kernels",
                      "compile the native CPU kernels for every instruction-set level this CPU runs, now"),
    "convert": ("rgemma.cli.convert",
                "convert an official .pt, Flax/Orbax or HF checkpoint to the Hugging Face layout"),
    "quantize": ("rgemma.cli.quantize",
                 "write a checkpoint with int8 or int4 weights (the RG-LRU, conv and norms stay float)"),
    "generate": ("rgemma.cli.generate", "continue a prompt, streaming the text"),
    "chat": ("rgemma.cli.chat", "interactive multi-turn chat (reads stdin, also when not a terminal)"),
    "prepare-data": ("rgemma.cli.prepare_data",
                     "build the public-domain training corpus from registry packages"),
    "tokenize": ("rgemma.cli.tokenize", "turn a JSON-lines corpus into a token file for training"),
    "train": ("rgemma.cli.train", "train a Griffin from scratch on a token file (resumes a run)"),
    "finetune": ("rgemma.cli.finetune",
                 "fine-tune a model on chat or text JSONL: full or LoRA, one process or torchrun (resumes a run)"),
    "eval": ("rgemma.cli.eval", "loss, perplexity and bits per byte on text or JSONL; multiple-choice accuracy"),
    "merge": ("rgemma.cli.merge", "fold a LoRA adapter into its base model (Hugging Face layout)"),
    "serve": ("rgemma.cli.serve", "an OpenAI-compatible HTTP server with continuous batching and a prefix state cache"),
    "bench-serve": ("rgemma.cli.bench_serve",
                    "load the server with 1 to 64 concurrent streaming clients: requests/s, tokens/s, latencies"),
    "bench": ("rgemma.cli.bench",
              "speed and memory of rgemma, transformers and the official code, side by side on the same weights"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand by name and help; only `command`'s module is imported, for its options."""
    parser = argparse.ArgumentParser(prog="rgemma", description="Run and convert RecurrentGemma / Griffin models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = commands.add_parser(name, help=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(subparser)
            subparser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The top-level parser has no options that take a value, so the first word is the subcommand.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    # `kill` or a scheduler's stop is an interrupt like Ctrl-C: a command writing files stops as cleanly
    # (no half-written staging directory, a training checkpoint saved).
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        args.run(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Python flushes stdout at exit, so point
        # it at devnull, or that flush fails again (as the Python docs on SIGPIPE recommend).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, SafetensorError) as error:
        # Bad input, a full disk, a missing file: one line that names the problem, no traceback.
        # (safetensors reports its I/O errors, ENOSPC included, as SafetensorError.)
        print(f"{_speaker()}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{_speaker()}: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_speaker()}: interrupted", file=sys.stderr)
        return 130
    return 0


def _speaker() -> str:
    """'rgemma', or under torchrun 'rgemma[rank N]' on every worker but rank 0: each prints its own line."""
    rank = os.environ.get("RANK", "0")
    return "rgemma" if rank == "0" else f"rgemma[rank {rank}]"


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
