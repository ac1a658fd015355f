"""FinetuneSettings: what `rgemma finetune` does, as data (no torch, so `--help` answers at once)."""

from __future__ import annotations

import dataclasses

from rgemma.train.settings import LOSS_CHUNK


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    data: str  # JSONL of {"messages": [...]} or {"text": ...}
    out: str  # log.jsonl, checkpoint/ and final/ go here
    model: str | None = None  # any checkpoint load_model reads; None: the embedded default
    eval_data: str | None = None
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # name patterns; None: every block matrix and the RG-LRU gates
    # How LoRA stores the frozen base's matrices (rgemma/train/frozen.py): "auto" keeps a bf16 or float16
    # checkpoint's dtype and stores a float32 one in bf16; "bfloat16"; "float32" (twice the memory).
    lora_base_dtype: str = "auto"
    steps: int = 100
    batch_size: int = 8  # rows per optimiser step, over all ranks
    micro_batch_size: int | None = None  # rows per forward on one rank (gradient accumulation); None: all of them
    seq_len: int = 512
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"  # "auto": bfloat16 autocast where the device computes bf16 natively, else float32
    activation_checkpointing: bool = False
    fsdp: bool = False
    device: str = "cpu"
    seed: int = 0
    loss_chunk: int = LOSS_CHUNK
    eval_every: int = 50
    checkpoint_every: int = 50
    log_every: int = 1
    progress: bool = True

    # Fields that only say how to watch a run; anything else changes its result.
    WATCH_FIELDS = ("out", "eval_data", "eval_every", "checkpoint_every", "log_every", "progress")

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "loss_chunk", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be 0 (full fine-tuning) or more, got {self.lora_rank}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {self.micro_batch_size}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.lora_base_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"lora_base_dtype must be auto, bfloat16 or float32, got {self.lora_base_dtype!r}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["lora_targets"] = None if self.lora_targets is None else list(self.lora_targets)
        return out

    def trajectory_differences(self, saved: dict) -> list[str]:
        mine = self.to_dict()
        return [f"{k}: {saved.get(k)!r} in the run, {v!r} now" for k, v in mine.items()
                if k not in self.WATCH_FIELDS and saved.get(k) != v]
