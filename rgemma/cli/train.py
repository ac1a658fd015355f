"""`rgemma train`: train a Griffin from scratch on a token file, or resume a run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rgemma.cli.numbers import non_negative_float, non_negative_int, positive_float, positive_int, seed
from rgemma.config import PRESETS, Config
from rgemma.train import TrainSettings, model_config  # torch-free: --help stays fast


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="token file to train on (made by `rgemma tokenize`)")
    parser.add_argument("--run-dir", required=True,
                        help="checkpoint, log and exported models go here; an existing run is resumed")
    parser.add_argument("--eval-data", help="held-out token file: its loss is logged and the best model kept")
    parser.add_argument("--tokenizer", help="tokenizer.model to copy into the exported models")
    shape = parser.add_argument_group("model (the vocabulary size comes from the token file)")
    shape.add_argument("--preset", default="tiny", help=f"starting config: {', '.join(PRESETS)} (default tiny)")
    shape.add_argument("--config", help="starting config from a Hugging Face config.json instead")
    shape.add_argument("--width", type=positive_int,
                       help="model width (lru width = width, mlp = 3 x width unless given)")
    shape.add_argument("--layers", type=positive_int,
                       help="number of blocks, in the (recurrent, recurrent, attention) pattern")
    shape.add_argument("--heads", type=positive_int)
    shape.add_argument("--lru-width", type=positive_int)
    shape.add_argument("--mlp-width", type=positive_int, help="per branch")
    shape.add_argument("--window", type=positive_int, help="local attention window")
    opt = parser.add_argument_group("optimisation")
    # The defaults live with TrainSettings, so that the library and the command agree.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    for name, kind, help_text in (
        ("steps", positive_int, "optimiser steps in all"),
        ("batch_size", positive_int, "rows per step"),
        ("seq_len", positive_int, "tokens per row"),
        ("lr", positive_float, "peak learning rate"),
        ("min_lr_ratio", non_negative_float, "final learning rate / peak (cosine decay)"),
        ("warmup", non_negative_int, "linear warmup steps"),
        ("weight_decay", non_negative_float, "AdamW decay of the linear maps' matrices"),
        ("beta1", non_negative_float, None), ("beta2", non_negative_float, None), ("eps", positive_float, None),
        ("grad_clip", positive_float, "clip the gradient's global norm at this"),
        ("seed", seed, "initialisation and data order"),
        ("loss_chunk", positive_int, "tokens per chunk of the output projection in the loss"),
        ("eval_every", positive_int, "steps between held-out evaluations"),
        ("eval_batches", positive_int, "batches of the held-out file per evaluation"),
        ("checkpoint_every", positive_int, "steps between checkpoints"),
        ("log_every", positive_int, "steps between log lines"),
    ):
        opt.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name],
                         help=f"{help_text + ' ' if help_text else ''}(default {defaults[name]})")
    opt.add_argument("--dtype", choices=("float32", "bfloat16"), default=defaults["dtype"],
                     help="bfloat16 autocasts the matmuls (default float32: faster on CPUs without native bf16)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_settings(args: argparse.Namespace) -> TrainSettings:
    from rgemma.train import TokenFile

    data = TokenFile.open(args.data)
    if args.eval_data and TokenFile.open(args.eval_data).num_rows(args.seq_len) == 0:
        raise ValueError(f"{args.eval_data}: fewer than {args.seq_len + 1} tokens, not one row of --seq-len "
                         f"{args.seq_len} to evaluate on")
    base = _starting_config(args)
    model = model_config(base, data.vocab_size, width=args.width, layers=args.layers, heads=args.heads,
                         lru_width=args.lru_width, mlp_width=args.mlp_width, window=args.window)
    names = {f.name for f in dataclasses.fields(TrainSettings)} - {"model", "progress", "data", "run_dir", "eval_data"}
    # Absolute paths: the run's saved settings must match when it is resumed from another directory.
    return TrainSettings(
        data=str(Path(args.data).resolve()), run_dir=str(args.run_dir), model=model,
        eval_data=str(Path(args.eval_data).resolve()) if args.eval_data else None,
        progress=not args.no_progress, **{name: getattr(args, name) for name in names},
    )


def _starting_config(args: argparse.Namespace) -> Config:
    if not args.config:
        return Config.preset(args.preset)
    try:
        hf = json.loads(Path(args.config).read_text(encoding="utf-8"))
        if not isinstance(hf, dict):
            raise ValueError("expected a JSON object")
        return Config.from_hf_dict(hf)
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{args.config}: {error}") from None


def run(args: argparse.Namespace) -> None:
    import torch

    from rgemma.train import CHECKPOINT_FILE, FINAL_DIR, train

    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(train_settings(args))
    where = result.run_dir / (CHECKPOINT_FILE if result.interrupted else FINAL_DIR)
    state = "interrupted" if result.interrupted else "done"
    best = "" if result.best_eval_loss is None else f", best held-out loss {result.best_eval_loss:.4f}"
    print(f"{state} at step {result.step}, loss {result.loss:.4f}{best}; wrote {where}", file=sys.stderr)
