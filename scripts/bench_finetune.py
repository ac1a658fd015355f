"""Fine-tuning throughput and peak memory: `rgemma finetune` run as a user runs it, in one and two processes.

Cases: model x mode x processes, each one `rgemma finetune` subprocess on a synthetic chat file:
    model      default (the embedded model) or 2b (the 2b preset with random weights, written once to --work)
    mode       full or lora (rank 8 on every block matrix and the RG-LRU gates)
    processes  1, or 2 under torchrun (gloo; DDP, or FSDP with --fsdp), the global batch split between them

tokens/s: rows x seq-len per step (padding included), from log.jsonl's timestamps between the end of the
first step and the end of the last (the first step, with its allocations, is left out: 2 steps or more).
Peak memory: `largest` is the peak RSS of the largest single process (getrusage ru_maxrss, exact; it counts
the pages of a memory-mapped checkpoint that the process reads); `total` is the largest sum of PSS over the
whole process tree (torchrun and its workers), sampled every 0.1 s: pages shared by the processes, as the
ranks of a LoRA run share their view of a checkpoint's file, are counted once in all, not once per process.
A case whose weights and optimiser state alone would not fit in the available memory is skipped, saying so.

    python scripts/bench_finetune.py --steps 3                                     # the embedded model
    python scripts/bench_finetune.py --models 2b --modes lora --procs 1 --steps 3  # one quick 2b case
    python scripts/bench_finetune.py --models default 2b --seq-len 128 --batch-size 2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# Runs the command given after it and prints its largest descendant's peak RSS (KiB on Linux) last on stderr.
PEAK_WRAPPER = ("import resource, subprocess, sys\n"
                "code = subprocess.run(sys.argv[1:]).returncode\n"
                "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
                "sys.exit(code)\n")
GIB = 2**30


def write_chat_data(path: Path, seq_len: int, rows: int, seed: int = 0):
    """Conversations of about a third to a half of a row each, so that every row holds two or three."""
    words = "the a river fox forest night ocean apple stone light winter morning small great".split()
    rng = random.Random(seed)
    with open(path, "w") as out:
        for i in range(rows * 3):
            question = " ".join(rng.choices(words, k=rng.randint(seq_len // 16, seq_len // 8)))
            answer = " ".join(rng.choices(words, k=rng.randint(seq_len // 16, seq_len // 6)))
            out.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {question}?"},
                                               {"role": "assistant", "content": answer + "."}]}) + "\n")


def random_2b(directory: Path) -> Path:
    """The 2b preset with its own initialisation, saved in bf16 with the embedded tokenizer (once)."""
    if (directory / "config.json").is_file():
        return directory
    import torch

    from rgemma import Config, Griffin, save_model
    from rgemma.hub import DEFAULT_MODEL

    print(f"writing a random 2b model to {directory} (once)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    save_model(Griffin(Config.preset("2b"), dtype=torch.bfloat16), directory)
    shutil.copyfile(Path(DEFAULT_MODEL) / "tokenizer.model", directory / "tokenizer.model")
    return directory


def parameter_count(model: Path | None) -> int:
    """From the safetensors headers: nothing is loaded."""
    from safetensors import safe_open

    from rgemma.hub import DEFAULT_MODEL

    count = 0
    for file in Path(model or DEFAULT_MODEL).glob("*.safetensors"):
        with safe_open(file, framework="pt") as stored:
            for name in stored.keys():
                shape = stored.get_slice(name).get_shape()
                count += math.prod(shape)
    return count


def state_bytes(params: int, mode: str, procs: int, fsdp: bool) -> int:
    """Full fine-tuning: twice the float32 weights in every process (each loads the whole model), plus
    gradients and AdamW's two moments (sharded under FSDP). LoRA: the 16-bit frozen base in every process
    (rgemma/train/frozen.py; before it, a float32 base made a 2b LoRA run peak at 21.8 GiB). Activations not
    counted."""
    if mode == "lora":
        return procs * 2 * params
    optimiser = 3 * 4 * params
    return procs * 8 * params + (optimiser if fsdp else procs * optimiser)


def run_case(model: Path | None, mode: str, procs: int, args, data: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "rgemma.cli", "finetune"]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "rgemma.cli",
                   "finetune"] + (["--fsdp"] if args.fsdp else [])
    command += ["--data", str(data), "--out", str(out), "--steps", str(args.steps), "--batch-size",
                str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup", "1", "--checkpoint-every",
                str(10**9), "--dtype", args.dtype, "--no-progress"]
    command += ["--lora-rank", "8"] if mode == "lora" else ["--lora-rank", "0"]
    command += ["--model", str(model)] if model else []
    if args.activation_checkpointing:
        command.append("--activation-checkpointing")
    threads = max(1, args.threads // procs)
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    errors = out.with_name(out.name + ".stderr")  # a file: a pipe left unread while polling could fill and block
    with open(errors, "w") as sink:
        process = psutil.Popen([sys.executable, "-c", PEAK_WRAPPER, *command], env=env, stdout=subprocess.DEVNULL,
                               stderr=sink)
    total_peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            total_peak = max(total_peak, sum(p.memory_full_info().pss for p in tree[1:]))  # not the wrapper
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    stderr = errors.read_text()
    errors.unlink()
    if process.returncode != 0:
        raise RuntimeError(f"rgemma finetune failed ({process.returncode}):\n{stderr[-3000:]}")
    largest = int(stderr.strip().splitlines()[-1].split()[-1]) * 1024
    log = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]
    first, last = log[0], log[-1]
    tokens_per_s = ((last["tokens"] - first["tokens"]) / (last["time"] - first["time"]) if len(log) > 1
                    else last["tokens_per_s"])
    return {"tokens_per_s": tokens_per_s, "largest_gib": largest / GIB,
            "total_gib": total_peak / GIB, "wall_s": wall, "threads_per_process": threads,
            "loss": [round(e["loss"], 4) for e in log]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default"], choices=["default", "2b"])
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=5, help="optimiser steps per case (at least 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="global rows per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--fsdp", action="store_true", help="FSDP instead of DDP for 2 processes")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads in all, split evenly between the processes")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rgemma-bench-finetune",
                        help="where the random 2b model is kept between runs, and the runs' directories")
    parser.add_argument("--force", action="store_true", help="run cases that look too big for the memory")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")

    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / f"chat-{args.seq_len}.jsonl"
    write_chat_data(data, args.seq_len, rows=max(16, args.batch_size))
    results = []
    for name in args.models:
        model = random_2b(args.work / "2b-random") if name == "2b" else None
        params = parameter_count(model)
        for mode in args.modes:
            for procs in args.procs:
                case = {"model": name, "parameters": params, "mode": mode, "procs": procs,
                        "parallel": "fsdp" if procs > 1 and args.fsdp else "ddp" if procs > 1 else "-"}
                need, available = state_bytes(params, mode, procs, args.fsdp), psutil.virtual_memory().available
                if need > available and not args.force:
                    case["skipped"] = f"needs over {need / GIB:.1f} GiB, {available / GIB:.1f} GiB available"
                else:
                    out = args.work / f"run-{name}-{mode}-{procs}"
                    shutil.rmtree(out, ignore_errors=True)
                    case |= run_case(model, mode, procs, args, data, out)
                    shutil.rmtree(out, ignore_errors=True)
                results.append(case)
                print(json.dumps(case), file=sys.stderr, flush=True)
    print(f"\nbatch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, dtype {args.dtype}, "
          f"{args.threads} threads in all\n")
    print(f"{'model':8s} {'params':>7s} {'mode':5s} {'procs':>5s} {'tokens/s':>9s} {'largest GiB':>11s} "
          f"{'total GiB':>9s} {'wall s':>7s}")
    for r in results:
        head = f"{r['model']:8s} {r['parameters'] / 1e6:6.0f}M {r['mode']:5s} {r['procs']:5d}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
        else:
            print(f"{head} {r['tokens_per_s']:9.1f} {r['largest_gib']:11.2f} {r['total_gib']:9.2f} {r['wall_s']:7.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
