"""The training loop: decay groups, learning rate schedule, checkpoints, export, evaluation.

A run directory holds:
    checkpoint.pt   everything needed to continue exactly (written atomically)
    log.jsonl       one JSON object per logged step and per evaluation
    best/           the model with the lowest held-out loss (Hugging Face layout)
    final/          the model at the end of training (Hugging Face layout)
Running the same command again on a run directory with a checkpoint resumes
it; the result is bit-identical to an uninterrupted run.

The loop is single-process and keeps no globals, so that torchrun/DDP can
wrap it later (the rank would pick its slice of each batch); it calls the
model itself, so a wrapper's forward hooks run.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from rgemma._io import atomic_directory, atomic_file
from rgemma.config import RECURRENT, Config
from rgemma.model import RG_LRU, RG_LRU_GATES, Griffin, block_linears
from rgemma.train.loss import next_token_loss
from rgemma.train.settings import TrainResult, TrainSettings
from rgemma.train.tokens import IGNORE, TokenFile, batch, batch_rows

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
BEST_DIR = "best"
FINAL_DIR = "final"


# Optimiser ------------------------------------------------------------------

# Weight decay applies to the matrices of linear maps only: each block's
# linears and the RG-LRU's block-diagonal gate matrices, found through the
# model's weight table. Neither the Griffin paper nor the RecurrentGemma
# report lists its decay mask, so this follows the LRU work Griffin builds on
# (Orvieto et al. 2023, arXiv 2303.06349: no weight decay on the recurrence
# parameters) and common LM practice: no decay on
#   - rg_lru.recurrent_param (Lambda, eq. 4: decay would pull a = sigmoid(...)
#     towards short memories),
#   - every bias (gate biases included), the RMSNorm scales,
#   - the embedding (tied with the output: decay would shrink rare tokens),
#   - the conv_1d taps (4 per channel, a per-channel filter, not a matrix).


def decayed_parameters(config: Config) -> set[str]:
    """Names of the parameters that weight decay applies to."""
    names = set()
    for i, kind in enumerate(config.block_types):
        names.update(f"layers.{i}.{path}.weight" for path in block_linears(kind))
        if kind == RECURRENT:
            names.update(f"layers.{i}.{RG_LRU}.{gate}" for gate in RG_LRU_GATES)
    return names


def parameter_groups(model: Griffin, weight_decay: float) -> list[dict]:
    named = dict(model.named_parameters())
    decayed = decayed_parameters(model.config)
    if not decayed <= named.keys():
        raise KeyError(f"the weight table names parameters the model lacks: {sorted(decayed - named.keys())}")
    return [
        {"params": [p for n, p in named.items() if n in decayed], "weight_decay": weight_decay},
        {"params": [p for n, p in named.items() if n not in decayed], "weight_decay": 0.0},
    ]


def learning_rate(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `min_ratio * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# Checkpoints ----------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict):
    """torch.save, atomically: a crash leaves the old checkpoint whole."""
    with atomic_file(path) as temporary:
        torch.save(payload, temporary)


CHECKPOINT_KEYS = ("settings", "step", "loss", "best_eval_loss", "model", "optimizer", "torch_rng")


def read_checkpoint(path: Path) -> dict:
    """A run's checkpoint.pt, or one line saying it is damaged (a copy cut short, another file)."""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as error:  # torch.load raises several types on a damaged file
        # Their messages run to paragraphs; the first sentence says what failed.
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot read the checkpoint ({reason}); remove it to start the run again") from None
    if not isinstance(saved, dict) or any(key not in saved for key in CHECKPOINT_KEYS):
        raise ValueError(f"{path}: not a checkpoint of `rgemma train`; remove it to start the run again")
    return saved


def export_model(model: Griffin, directory: Path, tokenizer: str | None):
    """Write a Hugging Face directory (with the tokenizer) in place of `directory`.

    The new directory is complete before the old one is moved aside.
    """
    from rgemma.checkpoint import save_model

    with atomic_directory(directory, replace=True) as staging:
        save_model(model, staging)  # save_model accepts the empty staging directory
        if tokenizer:
            shutil.copyfile(tokenizer, staging / "tokenizer.model")


@contextlib.contextmanager
def interrupt_flag(second_interrupts: bool = True) -> Iterator[dict]:
    """The first Ctrl-C or SIGTERM (`kill`, a scheduler's stop) sets flag["stop"] (the loop saves and exits);
    a second one interrupts at once, or with `second_interrupts=False` only sets the flag again."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield flag
        return

    def handler(signum, frame):
        flag["stop"] = True
        if second_interrupts:
            restore()

    def restore():
        for number, before in previous.items():
            signal.signal(number, before)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        restore()


# The loop -------------------------------------------------------------------


def autocast(dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


def batch_loss(model: Griffin, tokens: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
               settings: TrainSettings) -> torch.Tensor:
    """Mean next-token loss of one packed batch (B, T)."""
    with autocast(settings.dtype):
        hidden, _ = model(tokens, positions, hidden_only=True)
        return next_token_loss(model, hidden, targets, settings.loss_chunk)


@torch.no_grad()
def evaluate(model: Griffin, data: TokenFile, settings: TrainSettings) -> float:
    """Mean next-token loss over the first eval_batches batches of `data`, in order."""
    model.eval()
    rows = np.arange(min(data.num_rows(settings.seq_len), settings.eval_batches * settings.batch_size))
    total, count = 0.0, 0
    for start in range(0, len(rows), settings.batch_size):
        tokens, positions, targets = batch(data, rows[start : start + settings.batch_size], settings.seq_len)
        loss = batch_loss(model, tokens, positions, targets, settings)
        valid = int((targets != IGNORE).sum())
        total += float(loss) * valid
        count += valid
    model.train()
    return total / max(count, 1)


def train(settings: TrainSettings, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train, or continue the run in settings.run_dir; returns at the end or after a Ctrl-C (checkpoint saved).

    `on_step(step, loss)` is called after every optimiser step.
    """
    run_dir = Path(settings.run_dir)
    data = TokenFile.open(settings.data)
    eval_data = TokenFile.open(settings.eval_data) if settings.eval_data else None
    config = settings.model
    if data.vocab_size != config.vocab_size:
        raise ValueError(f"{data.path}: vocabulary of {data.vocab_size} tokens, the model has {config.vocab_size}")
    if eval_data is not None and eval_data.num_rows(settings.seq_len) == 0:  # its loss would read 0.0, the best
        raise ValueError(f"{eval_data.path}: fewer than {settings.seq_len + 1} tokens, not one row of "
                         f"{settings.seq_len} to evaluate on")
    num_rows = data.num_rows(settings.seq_len)
    if num_rows < settings.batch_size:
        raise ValueError(f"{data.path}: {len(data)} tokens make {num_rows} rows of {settings.seq_len}, "
                         f"fewer than one batch of {settings.batch_size}")

    torch.manual_seed(settings.seed)
    model = Griffin(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=(settings.beta1, settings.beta2), eps=settings.eps)
    step, best, loss_value = 0, None, float("nan")
    checkpoint_path = run_dir / CHECKPOINT_FILE
    if checkpoint_path.exists():
        saved = read_checkpoint(checkpoint_path)
        differences = settings.trajectory_differences(saved["settings"])
        if differences:
            raise ValueError(f"{run_dir} holds a run with other settings ({'; '.join(differences)}); "
                             "repeat its command to resume it or choose another --run-dir")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        step, best, loss_value = saved["step"], saved["best_eval_loss"], saved["loss"]
    run_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint():
        save_checkpoint(checkpoint_path, {
            "settings": settings.to_dict(), "step": step, "loss": loss_value, "best_eval_loss": best,
            # The data position is the step: batch i is a pure function of (seed, i).
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
        })

    tokens_per_step = settings.batch_size * settings.seq_len
    model.train()
    interrupted = False
    with open(run_dir / LOG_FILE, "a") as log, interrupt_flag() as flag, _progress(settings, step) as bar:

        def record(entry: dict):
            log.write(json.dumps(entry) + "\n")
            log.flush()

        started, started_step = time.perf_counter(), step
        while step < settings.steps:
            lr = learning_rate(step, settings.lr, settings.warmup, settings.steps, settings.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens, positions, targets = batch(
                data, batch_rows(num_rows, settings.batch_size, settings.seed, step), settings.seq_len)
            loss = batch_loss(model, tokens, positions, targets, settings)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            loss_value = float(loss.detach())
            if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                # Before the step: nothing non-finite reaches the weights, a checkpoint or an export.
                raise ValueError(f"step {step + 1}: the loss is {loss_value} and the gradient norm "
                                 f"{float(grad_norm)}; stopped without saving anything new; try a lower --lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            tokens_per_s = (step - started_step) * tokens_per_step / elapsed
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:.0f}")
            if step % settings.log_every == 0 or step == settings.steps:
                record({"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                        "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s, "time": time.time()})
            if eval_data is not None and (step % settings.eval_every == 0 or step == settings.steps):
                eval_loss = evaluate(model, eval_data, settings)
                record({"step": step, "eval_loss": eval_loss, "time": time.time()})
                if bar is not None:
                    bar.write(f"step {step}: held-out loss {eval_loss:.4f}")
                if best is None or eval_loss < best:
                    best = eval_loss
                    export_model(model, run_dir / BEST_DIR, settings.tokenizer)
            if on_step is not None:
                on_step(step, loss_value)
            if flag["stop"]:
                interrupted = True
                break
            if step % settings.checkpoint_every == 0:
                checkpoint()
        checkpoint()
        if not interrupted:
            export_model(model, run_dir / FINAL_DIR, settings.tokenizer)
    return TrainResult(step, loss_value, best, interrupted, run_dir)


@contextlib.contextmanager
def _progress(settings: TrainSettings, step: int):
    if not settings.progress:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=settings.steps, initial=step, unit="step", desc="training", file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
