"""Training from scratch: token files, packing with positions, the loss, and a straight-line loop.

A token file holds a corpus tokenized once: every document as
`bos, text..., eos`, concatenated, plus the index where each document starts.
Training cuts this stream into fixed-length rows, so a row may hold the end
of one document and the start of the next; each token's position counts
from 0 within its own document, and position 0 is where the model drops its
state, so packed documents never see each other. A document cut by a row
boundary continues in the next row at its own position, from a zero state.

The loss is cross-entropy on the next token, except where the next token is
another document's bos: that target says nothing about the document before
it, so it is masked (the eos before it is still learnt, so the model learns
to end documents).

A run directory holds:
    checkpoint.pt   everything needed to continue exactly (written atomically)
    log.jsonl       one JSON object per logged step and per evaluation
    best/           the model with the lowest held-out loss (Hugging Face layout)
    final/          the model at the end of training (Hugging Face layout)
Running the same command again on a run directory with a checkpoint resumes
it; the result is bit-identical to an uninterrupted run.

The loop is single-process and keeps no globals, so that torchrun/DDP can
wrap it later (the rank would pick its slice of each batch).

Shapes: B batch, T row length, D width, V vocabulary, N = B*T tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rgemma._io import atomic_directory, atomic_file
from rgemma.config import Config, griffin_pattern
from rgemma.model import Griffin

IGNORE = -100  # target of a masked position (F.cross_entropy's ignore_index)
HEADER_BYTES = 4096  # the JSON header of a token file, padded with spaces
TOKEN_FORMAT = "rgemma-tokens"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
BEST_DIR = "best"
FINAL_DIR = "final"
# Rows of the (N, V) logits computed at once by the loss; the rest are never
# materialised (2048 x 8192 fp32 = 64 MiB at the benchmark's vocabulary).
LOSS_CHUNK = 2048


# Token files ----------------------------------------------------------------
#
# Layout: a HEADER_BYTES JSON header (format, version, dtype, num_tokens,
# num_documents, vocab_size, bos_id, eos_id, tokens_offset, starts_offset),
# the tokens (uint16 when the vocabulary fits, else int32), then the int64
# start index of every document. Both arrays are memory-mapped on reading.


@dataclasses.dataclass(frozen=True)
class TokenFile:
    path: Path
    tokens: np.ndarray  # (num_tokens,) memory-mapped
    starts: np.ndarray  # (num_documents,) int64, starts[0] == 0
    vocab_size: int
    bos_id: int
    eos_id: int

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenFile:
        path = Path(path)
        try:
            with open(path, "rb") as file:
                header = json.loads(file.read(HEADER_BYTES).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = {}
        if header.get("format") != TOKEN_FORMAT:
            raise ValueError(f"{path}: not a token file (make one with tokenize_corpus / `rgemma tokenize`)")
        size = path.stat().st_size
        needed = header["starts_offset"] + 8 * header["num_documents"]
        if size < needed:
            raise ValueError(f"{path}: truncated token file ({size} bytes, expected {needed})")
        tokens = np.memmap(path, dtype=header["dtype"], mode="r", offset=header["tokens_offset"],
                           shape=(header["num_tokens"],))
        starts = np.memmap(path, dtype=np.int64, mode="r", offset=header["starts_offset"],
                           shape=(header["num_documents"],))
        return cls(path, tokens, np.asarray(starts), header["vocab_size"], header["bos_id"], header["eos_id"])

    def __len__(self) -> int:
        return len(self.tokens)

    def num_rows(self, length: int) -> int:
        """Rows of `length` inputs; each needs one more token for its last target."""
        return max(0, (len(self.tokens) - 1) // length)


def write_token_file(out: str | os.PathLike, documents: Iterator[list[int]], vocab_size: int, bos_id: int,
                     eos_id: int) -> Path:
    """Write already-tokenized documents (each starting with bos) as a token file, atomically."""
    out = Path(out)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)
    starts, count = [], 0
    with atomic_file(out) as temporary, open(temporary, "wb") as file:
        file.write(b" " * HEADER_BYTES)
        for document in documents:
            if document[0] != bos_id:
                raise ValueError(f"document {len(starts)} does not start with bos ({bos_id})")
            starts.append(count)
            file.write(np.asarray(document, dtype=dtype).tobytes())
            count += len(document)
        if not starts:
            raise ValueError(f"{out}: no documents to write")
        tokens_end = HEADER_BYTES + count * dtype.itemsize
        starts_offset = -(-tokens_end // 8) * 8
        file.write(b"\0" * (starts_offset - tokens_end))
        file.write(np.asarray(starts, dtype=np.int64).tobytes())
        header = {
            "format": TOKEN_FORMAT, "version": 1, "dtype": dtype.name, "num_tokens": count,
            "num_documents": len(starts), "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id,
            "tokens_offset": HEADER_BYTES, "starts_offset": starts_offset,
        }
        file.seek(0)
        file.write(json.dumps(header).encode().ljust(HEADER_BYTES))
    return out


def tokenize_corpus(jsonl: str | os.PathLike, tokenizer, out: str | os.PathLike) -> Path:
    """Tokenize JSON lines {"source", "id", "text"} (one document each) into a token file.

    Each document becomes `bos, text..., eos`; documents with empty text are skipped.
    """
    jsonl = Path(jsonl)

    def documents() -> Iterator[list[int]]:
        with open(jsonl, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{jsonl}:{number}: not a JSON object with a text field ({error})") from None
                if text:
                    yield tokenizer.encode(text, bos=True) + [tokenizer.eos_id]

    return write_token_file(out, documents(), tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)


# Packing --------------------------------------------------------------------


def pack_row(data: TokenFile, start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The row of `length` tokens at stream offset `start`: inputs, positions, targets (T,) int64.

    positions count from 0 at each document's bos; a target that is the bos of
    the next document is IGNORE.
    """
    index = np.arange(start, start + length)
    document = np.searchsorted(data.starts, index, side="right") - 1
    positions = index - data.starts[document]
    inputs = data.tokens[start : start + length].astype(np.int64)
    targets = data.tokens[start + 1 : start + length + 1].astype(np.int64)
    following = np.minimum(document + 1, len(data.starts) - 1)
    next_is_bos = (document + 1 < len(data.starts)) & (data.starts[following] == index + 1)
    targets[next_is_bos] = IGNORE
    return inputs, positions, targets


def batch(data: TokenFile, rows: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (by row number) -> tokens, positions, targets (B, T) int64."""
    packed = [pack_row(data, int(row) * length, length) for row in rows]
    return tuple(torch.from_numpy(np.stack(part)) for part in zip(*packed))


def row_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh shuffle of the rows each epoch, a pure function of (seed, epoch): resuming needs no RNG state."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batch_rows(num_rows: int, batch_size: int, seed: int, batch_index: int) -> np.ndarray:
    """The rows of the `batch_index`-th batch of training; a partial batch at an epoch's end is dropped."""
    per_epoch = num_rows // batch_size
    epoch, within = divmod(batch_index, per_epoch)
    return row_order(num_rows, seed, epoch)[within * batch_size : (within + 1) * batch_size]


# Loss -----------------------------------------------------------------------


def _chunk_loss(h, weight, target, valid, soft_cap: float, with_grad: bool):
    """Summed loss of one chunk h (C, D), and d(loss)/d(logits before the cap) (C, V) if asked."""
    logits = F.linear(h, weight.to(h.dtype)).float()  # (C, V)
    if soft_cap:
        capped = torch.tanh(logits.div_(soft_cap))
        logits = capped * soft_cap
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    picked = logits.gather(1, target.clamp(min=0)[:, None])[:, 0]
    loss = ((lse - picked) * valid).sum()
    if not with_grad:
        return loss, None
    # d(lse - picked)/dlogits = softmax - onehot; masked rows get zero.
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(target)), target.clamp(min=0)] -= 1.0
    grad.mul_(valid[:, None])
    if soft_cap:
        grad.mul_(1.0 - capped * capped)  # d cap*tanh(z/cap)/dz
    return loss, grad.to(h.dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of tied soft-capped logits, `chunk` rows at a time.

    The gradient is computed in the forward pass, chunk by chunk, so the (N, V)
    logits and their gradient never exist whole; backward only scales it.
    Must match `Griffin.logits` (tested against it, values and gradients).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, soft_cap: float, chunk: int):
        valid = targets != IGNORE
        count = valid.sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            h = hidden[part]  # (C, D)
            loss, grad = _chunk_loss(h, weight, targets[part], valid[part], soft_cap, with_grad=True)
            total += loss
            grad_hidden[part] = grad @ weight.to(h.dtype)
            grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden / count, (grad_weight / count).to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss, None, None, None


def next_token_loss(model: Griffin, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of hidden (B, T, D) against targets (B, T); IGNORE targets are left out."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    targets = targets.reshape(-1)
    weight, cap = model.embed_tokens.weight, model.config.logits_soft_cap
    if torch.is_grad_enabled():
        return _ChunkedCrossEntropy.apply(flat, weight, targets, cap, chunk)
    valid = targets != IGNORE
    total = sum(_chunk_loss(flat[s : s + chunk], weight, targets[s : s + chunk], valid[s : s + chunk], cap, False)[0]
                for s in range(0, len(targets), chunk))
    return total / valid.sum().clamp(min=1)


# Optimiser ------------------------------------------------------------------

# Weight decay applies to the matrices of linear maps only (nn.Linear weights
# and the block-diagonal RG-LRU gate matrices). Neither the Griffin paper nor
# the RecurrentGemma report lists its decay mask, so this follows the LRU work
# Griffin builds on (Orvieto et al. 2023, arXiv 2303.06349: no weight decay on
# the recurrence parameters) and common LM practice: no decay on
#   - rg_lru.recurrent_param (Lambda, eq. 4: decay would pull a = sigmoid(...)
#     towards short memories),
#   - every bias (gate biases included), the RMSNorm scales,
#   - the embedding (tied with the output: decay would shrink rare tokens),
#   - the conv_1d taps (4 per channel, a per-channel filter, not a matrix).
NO_DECAY_SUFFIXES = ("recurrent_param", "bias", "conv_1d.weight")
NO_DECAY_MODULES = ("embed_tokens", "final_norm", "temporal_pre_norm", "channel_pre_norm")


def decays(name: str) -> bool:
    if name.endswith(NO_DECAY_SUFFIXES):
        return False
    return not any(part in NO_DECAY_MODULES for part in name.split("."))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if decays(n)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
    ]


def learning_rate(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `min_ratio * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# Settings -------------------------------------------------------------------


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


# Checkpoints ----------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict):
    """torch.save, atomically: a crash leaves the old checkpoint whole."""
    with atomic_file(path) as temporary:
        torch.save(payload, temporary)


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
def interrupt_flag() -> Iterator[dict]:
    """The first Ctrl-C sets flag["stop"] (the loop saves and exits); a second one interrupts at once."""
    flag = {"stop": False}
    if not _in_main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["stop"] = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# The loop -------------------------------------------------------------------


def autocast(dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


@torch.no_grad()
def evaluate(model: Griffin, data: TokenFile, settings: TrainSettings) -> float:
    """Mean next-token loss over the first eval_batches batches of `data`, in order."""
    model.eval()
    rows = np.arange(min(data.num_rows(settings.seq_len), settings.eval_batches * settings.batch_size))
    total, count = 0.0, 0
    for start in range(0, len(rows), settings.batch_size):
        tokens, positions, targets = batch(data, rows[start : start + settings.batch_size], settings.seq_len)
        with autocast(settings.dtype):
            hidden, _ = model.hidden_states(tokens, positions)
            loss = next_token_loss(model, hidden, targets, settings.loss_chunk)
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
        saved = torch.load(checkpoint_path, weights_only=True)
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
            with autocast(settings.dtype):
                hidden, _ = model.hidden_states(tokens, positions)
                loss = next_token_loss(model, hidden, targets, settings.loss_chunk)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = float(loss.detach())
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


# Model shape ----------------------------------------------------------------


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
