"""What a training run is: its settings, its result, and the model shape it trains.

Nothing here imports torch, so that `rgemma train --help` can show the
defaults without loading it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from rgemma.config import Config, griffin_pattern

# Rows of the (N, V) logits the loss computes at once; the rest are never
# materialised. Enough rows for an efficient matmul, few enough that a
# chunk's fp32 logits (chunk x V x 4 bytes) stay small beside the model.
LOSS_CHUNK = 2048


POSITIVE_COUNTS = ("steps", "batch_size", "seq_len", "loss_chunk", "eval_every", "eval_batches", "checkpoint_every",
                   "log_every")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    data: str
    run_dir: str
    model: Config
    eval_data: str | None = None
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "float32"  # CPUs without native bf16 matmuls run bf16 autocast far slower
    seed: int = 0
    loss_chunk: int = LOSS_CHUNK
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    log_every: int = 10
    tokenizer: str | None = None  # copied into the exported models
    progress: bool = True

    def __post_init__(self):
        # A zero count divides by zero, a NaN clip exports a NaN model, no held-out batch records a loss
        # of 0.0: refused here, naming the field, before anything is read or built.
        for name, ok, requirement in (
            *((name, _is_int(getattr(self, name)) and getattr(self, name) > 0, "a positive integer")
              for name in POSITIVE_COUNTS),
            ("warmup", _is_int(self.warmup) and self.warmup >= 0, "an integer >= 0"),
            ("seed", _is_int(self.seed) and 0 <= self.seed < 2**64, "an integer in [0, 2**64 - 1]"),
            ("lr", _finite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("min_lr_ratio", _finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("weight_decay", _finite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("beta1", _finite(self.beta1) and 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", _finite(self.beta2) and 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", _finite(self.eps) and self.eps > 0, "a finite number > 0"),
            ("grad_clip", _finite(self.grad_clip) and self.grad_clip > 0, "a finite number > 0"),
            ("dtype", self.dtype in ("float32", "bfloat16"), "float32 or bfloat16"),
        ):
            if not ok:
                raise ValueError(f"training setting {name} must be {requirement}, got {getattr(self, name)!r}")

    # Fields that only say how to watch a run; anything else changes its result.
    WATCH_FIELDS = ("run_dir", "eval_data", "eval_every", "eval_batches", "checkpoint_every", "log_every",
                    "tokenizer", "progress")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = {**dataclasses.asdict(self.model), "block_types": list(self.model.block_types)}
        return out

    def trajectory_differences(self, saved: dict) -> list[str]:
        mine = self.to_dict()
        return [f"{k}: {saved.get(k)!r} in the run, {v!r} now" for k, v in mine.items()
                if k not in self.WATCH_FIELDS and saved.get(k) != v]


@dataclasses.dataclass
class TrainResult:
    step: int
    loss: float
    best_eval_loss: float | None
    interrupted: bool
    run_dir: Path


def model_config(base: Config, vocab_size: int, width: int | None = None, layers: int | None = None,
                 heads: int | None = None, lru_width: int | None = None, mlp_width: int | None = None,
                 window: int | None = None) -> Config:
    """`base` with the vocabulary of the token file and the given shape; None keeps base's value."""
    changes: dict = {"vocab_size": vocab_size}
    if width:
        # A new width brings the usual proportions unless they are given too.
        changes.update(width=width, lru_width=width, mlp_width=3 * width)
    for field, value in (("lru_width", lru_width), ("mlp_width", mlp_width), ("num_heads", heads),
                         ("attention_window", window)):
        if value:
            changes[field] = value
    if layers:
        changes["block_types"] = griffin_pattern(layers)
    return base.replace(**changes)
