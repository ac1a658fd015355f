"""`rgemma finetune`: full or LoRA fine-tuning on chat or text JSONL, in one process or under torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from rgemma.cli.numbers import positive_int
from rgemma.train.finetune_settings import FinetuneSettings  # torch-free: --help stays fast


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint to start from (default: the model embedded in rgemma)")
    parser.add_argument("--data", required=True,
                        help='JSONL: one {"messages": [{"role", "content"}, ...]} or {"text": ...} per line')
    parser.add_argument("--out", required=True,
                        help="log.jsonl, checkpoint/ and final/ go here; an existing run is resumed")
    parser.add_argument("--eval-data", help="held-out JSONL of the same kind: its loss is logged")
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneSettings)}
    lora = parser.add_argument_group("LoRA (--lora-rank 0, the default, is full fine-tuning)")
    lora.add_argument("--lora-rank", type=int, default=0)
    lora.add_argument("--lora-alpha", type=float, default=defaults["lora_alpha"], help="scaling = alpha / rank")
    lora.add_argument("--lora-dropout", type=float, default=defaults["lora_dropout"], help="on the linears' inputs")
    lora.add_argument("--lora-targets", help="comma-separated name patterns, e.g. q_proj,linear_x,input_gate_weight "
                      "(default: every block linear and the RG-LRU gates)")
    lora.add_argument("--lora-base-dtype", choices=("auto", "bfloat16", "float32"), default=defaults["lora_base_dtype"],
                      help="how the frozen base's matrices (embedding, linears) are stored; auto: a bf16 or float16 "
                      "checkpoint's own dtype, bf16 for a float32 checkpoint (its weights rounded to bf16; half the "
                      "memory of float32). Norms, biases, conv, RG-LRU and the adapters stay float32 (default auto)")
    opt = parser.add_argument_group("optimisation")
    for name, kind, help_text in (
        ("steps", int, "optimiser steps in all"),
        ("batch_size", int, "rows per step, over all processes"),
        ("micro_batch_size", int, "rows per forward in one process (gradient accumulation)"),
        ("seq_len", int, "tokens per row; a conversation never spans two"),
        ("lr", float, "peak learning rate"),
        ("min_lr_ratio", float, "final learning rate / peak (cosine decay)"),
        ("warmup", int, "linear warmup steps"),
        ("weight_decay", float, "AdamW decay of the linear maps' matrices"),
        ("beta1", float, None), ("beta2", float, None), ("eps", float, None),
        ("grad_clip", float, "clip the gradient's global norm at this"),
        ("seed", int, "adapter initialisation, dropout and data order"),
        ("loss_chunk", int, "tokens per chunk of the output projection in the loss"),
        ("eval_every", int, "steps between held-out evaluations"),
        ("checkpoint_every", int, "steps between checkpoints"),
        ("log_every", int, "steps between log lines"),
    ):
        opt.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name],
                         help=f"{help_text + ' ' if help_text else ''}(default {defaults[name]})")
    opt.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                     help="bfloat16 autocast; auto: where the device computes bf16 natively (default auto)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward pass (less memory)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard parameters, gradients and optimiser state (default: DDP)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def finetune_settings(args: argparse.Namespace) -> FinetuneSettings:
    names = {f.name for f in dataclasses.fields(FinetuneSettings)} - {
        "model", "data", "out", "eval_data", "lora_targets", "activation_checkpointing", "progress"}
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
    # Absolute paths: the run's saved settings must match when it is resumed from another directory.
    return FinetuneSettings(
        data=str(Path(args.data).resolve()), out=str(args.out),
        model=str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model,
        eval_data=str(Path(args.eval_data).resolve()) if args.eval_data else None, lora_targets=targets,
        activation_checkpointing=args.activation_checkpointing, progress=not args.no_progress,
        **{name: getattr(args, name) for name in names},
    )


def run(args: argparse.Namespace) -> None:
    import torch

    from rgemma.train.finetune import CHECKPOINT_DIR, FINAL_DIR, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    result = finetune(finetune_settings(args))
    if os.environ.get("RANK", "0") != "0":  # only rank 0 prints
        return
    where = result.out / (CHECKPOINT_DIR if result.interrupted else FINAL_DIR)
    state = "interrupted" if result.interrupted else "done"
    held_out = "" if result.eval_loss is None else f", held-out loss {result.eval_loss:.4f}"
    print(f"{state} at step {result.step}, loss {result.loss:.4f}{held_out}; wrote {where}", file=sys.stderr)
