"""Fine-tuning a trained Griffin on chat or text data: full or LoRA, in one process or under torchrun.

An output directory holds:
    log.jsonl    one JSON object per logged step ({"step", "loss", ...}) and per held-out evaluation
    checkpoint/  everything needed to continue exactly (torch.distributed.checkpoint shards and meta.pt;
                 replaced atomically)
    final/       at the end: the model in the Hugging Face layout (full) or the adapter (LoRA)
Running the same command on a directory with a checkpoint resumes it, with the
same loss curve as an uninterrupted run; another config or world size is refused.

Each optimiser step reads `batch_size` rows (the global batch: under torchrun
each rank reads its slice), `micro_batch_size` rows per forward. Every
micro-batch's summed loss is divided by the number of target tokens in the
whole step, so the gradient is that of the step's mean loss whatever the split;
the loss is computed inside the wrapped module's forward, so that DDP's and
FSDP's hooks see it. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from rgemma._io import atomic_directory, atomic_file
from rgemma.backends.base import Options
from rgemma.checkpoint import TOKENIZER_FILES, load_model, save_model
from rgemma.hub import resolve_model
from rgemma.lora import LoraSettings, add_lora, peft_name, save_adapter
from rgemma.model import Griffin, ResidualBlock
from rgemma.tokenizer import Tokenizer
from rgemma.train.chat_data import Rows, load_rows
from rgemma.train.distributed import World, full_state, join_world, leave_world, load_sharded, save_sharded, wrap
from rgemma.train.finetune_settings import FinetuneSettings
from rgemma.train.frozen import base_dtype, base_matrices, freeze_linears
from rgemma.train.loop import interrupt_flag, learning_rate, parameter_groups
from rgemma.train.loss import next_token_loss
from rgemma.train.tokens import IGNORE, batch_rows

LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoint"
META_FILE = "meta.pt"
FINAL_DIR = "final"


@dataclasses.dataclass
class FinetuneResult:
    step: int
    loss: float
    eval_loss: float | None
    interrupted: bool
    out: Path
    model: Griffin  # the trained model (this rank's shards under FSDP), adapters unmerged


class LossModel(nn.Module):
    """The model and its loss in one forward, so that DDP and FSDP wrap both."""

    def __init__(self, model: Griffin, loss_chunk: int, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.loss_chunk = loss_chunk
        self.autocast_dtype = autocast_dtype

    def forward(self, tokens, positions, targets, count: int) -> torch.Tensor:
        """Summed next-token loss of the rows (B, T) divided by `count`."""
        autocast = (torch.autocast(tokens.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            hidden, _ = self.model(tokens, positions, hidden_only=True)
            return next_token_loss(self.model, hidden, targets, self.loss_chunk, count=count)


class CheckpointedBlock(ResidualBlock):
    """A residual block whose activations are recomputed in the backward pass instead of kept.

    Training rows start from no history, so the recomputation is given a zero
    state of its own: the block's first run has already written its final
    state into the one it was handed.
    """

    def forward(self, x, layout, state):
        if layout.has_history:
            raise ValueError("activation checkpointing needs rows that start without a carried state")

        def run(x):
            return ResidualBlock.forward(self, x, layout, type(state)(*(torch.zeros_like(t) for t in
                                                                      dataclasses.astuple(state))))

        return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device computes bf16 natively ("auto"), or as asked; None is float32."""
    if setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
              else Options().resolved().native_bf16)
    return torch.bfloat16 if native else None


def _load(settings: FinetuneSettings, world: World) -> tuple[Griffin, Path]:
    """The base model on the device, adapters added; its path.

    Full fine-tuning: float32 master weights. LoRA: the frozen base's matrices in 16 bits, the rest and the
    adapters' factors float32 (rgemma/train/frozen.py).
    """
    path = resolve_model(settings.model)
    torch.manual_seed(settings.seed)  # the adapters' initialisation, the same on every rank
    lora = bool(settings.lora_rank)
    if lora:
        model = load_model(path)  # in the checkpoint's dtype, converted below
        matrices = base_matrices(model)
        matrix_dtype = base_dtype(settings.lora_base_dtype, model.dtype)
    else:
        model = load_model(path, dtype=torch.float32)
        matrices, matrix_dtype = set(), torch.float32
    # Weights loaded in the file's dtype and on its device are views of its memory map (copy on write).
    # The optimiser writes full fine-tuning's weights: each gets its own memory. LoRA's base is never
    # written: a view stays one, its pages shared by every process that maps the file (torchrun's ranks).
    for name, param in list(model.named_parameters()):
        module_path, _, leaf = name.rpartition(".")
        dtype = matrix_dtype if name in matrices else torch.float32
        tensor = param.detach().to(world.device, dtype=dtype, copy=not lora)
        setattr(model.get_submodule(module_path), leaf, nn.Parameter(tensor, requires_grad=not lora))
    if lora:
        add_lora(model, _lora_settings(settings))
        freeze_linears(model)
    if settings.activation_checkpointing:
        for layer in model.layers:
            layer.__class__ = CheckpointedBlock  # the same parameters and names: only forward differs
    return model.train(), path


def _lora_settings(settings: FinetuneSettings) -> LoraSettings:
    return LoraSettings(settings.lora_rank, settings.lora_alpha, settings.lora_dropout, settings.lora_targets)


def _optimizer(model: Griffin, settings: FinetuneSettings) -> torch.optim.Optimizer:
    if settings.lora_rank:  # the adapters' factors are matrices of linear maps: all decayed
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": settings.weight_decay}]
    else:
        groups = parameter_groups(model, settings.weight_decay)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps)


def _rank_rows(rows: torch.Tensor, world: World, micro: int) -> list[torch.Tensor]:
    """This rank's slice of a global batch's row numbers, in micro-batches."""
    mine = rows[world.rank :: world.size]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def _rng_state(world: World) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(world.device)
    return state


def _set_rng_state(state: dict, world: World):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], world.device)


@torch.no_grad()
def evaluate(net: nn.Module, rows: Rows, world: World, micro: int) -> float:
    """Mean next-token loss over every held-out row, the rows shared among ranks."""
    net.eval()
    total = 0.0
    count = int((rows.targets != IGNORE).sum())
    numbers = torch.arange(len(rows))
    # Every rank runs the same number of forwards: FSDP gathers parameters in each.
    per_rank = -(-len(rows) // world.size)
    for start in range(0, per_rank, micro):
        part = numbers[world.rank * per_rank + start : world.rank * per_rank + min(start + micro, per_rank)]
        if len(part) == 0:
            part = numbers[:1]  # a dummy forward, not counted
            net(*(t.to(world.device) for t in (rows.tokens[part], rows.positions[part], rows.targets[part])), 1)
            continue
        batch = rows.select(part)
        total += float(net(batch.tokens.to(world.device), batch.positions.to(world.device),
                           batch.targets.to(world.device), 1))
    net.train()
    (total,) = world.sum([total])
    return total / max(count, 1)


def _read_checkpoint(directory: Path, settings: FinetuneSettings, world: World) -> dict:
    try:
        meta = torch.load(directory / META_FILE, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{directory}: incomplete checkpoint (no {META_FILE}); remove it to start again") from None
    except Exception as error:  # torch.load raises several types on a damaged file
        raise ValueError(f"{directory / META_FILE}: cannot read the checkpoint ({error})") from None
    differences = settings.trajectory_differences(meta["settings"])
    if meta["world_size"] != world.size:
        differences.append(f"world size: {meta['world_size']} in the run, {world.size} now")
    if differences:
        raise ValueError(f"{directory.parent} holds a run with other settings ({'; '.join(differences)}); "
                         "repeat its command to resume it or choose another --out")
    return meta


def finetune(settings: FinetuneSettings, on_step: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune, or continue the run in settings.out; returns at the end, or after a Ctrl-C or SIGTERM with
    a checkpoint saved."""
    world = join_world(settings.device)
    try:
        result = _finetune(settings, world, on_step)
        # Every rank past its last collective before any tears its group down: once, a rank that left first
        # made another abort at exit ("terminate called without an active exception").
        world.barrier()
        return result
    finally:
        leave_world(world)


def _finetune(settings: FinetuneSettings, world: World, on_step) -> FinetuneResult:
    out = Path(settings.out)
    model, base_path = _load(settings, world)
    tokenizer = Tokenizer.find(base_path)
    rows = load_rows(settings.data, tokenizer, settings.seq_len)
    eval_rows = load_rows(settings.eval_data, tokenizer, settings.seq_len) if settings.eval_data else None
    if settings.batch_size % world.size:
        raise ValueError(f"--batch-size {settings.batch_size} does not split evenly over {world.size} processes")
    per_rank = settings.batch_size // world.size
    micro = min(settings.micro_batch_size or per_rank, per_rank)
    if len(rows) < settings.batch_size:
        raise ValueError(f"{settings.data}: {len(rows)} rows of {settings.seq_len} tokens, "
                         f"fewer than one batch of {settings.batch_size}")

    lora = bool(settings.lora_rank)
    net = wrap(LossModel(model, settings.loss_chunk, autocast_dtype(settings.dtype, world.device)), world,
               settings.fsdp)
    optimizer = _optimizer(model, settings)
    step, loss_value, eval_loss = 0, float("nan"), None
    checkpoint_dir = out / CHECKPOINT_DIR
    if world.main:
        _tidy_checkpoints(checkpoint_dir)
    world.barrier()
    if checkpoint_dir.exists():
        meta = _read_checkpoint(checkpoint_dir, settings, world)
        try:
            load_sharded(checkpoint_dir, net, optimizer, trainable_only=lora)
        except (Exception, CheckpointException) as error:  # DCP raises many types on missing or damaged shards
            # A CheckpointException holds each rank's traceback: its last line is the cause.
            cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise ValueError(f"{checkpoint_dir}: cannot read the checkpoint, a shard is missing or damaged "
                             f"({cause}); remove it to start again") from None
        _set_rng_state(meta["rng"][world.rank], world)
        step, loss_value, eval_loss = meta["step"], meta["loss"], meta["eval_loss"]
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / LOG_FILE, step)

    def checkpoint():
        rng = world.gather(_rng_state(world))
        staging = world.broadcast(_staging_name(checkpoint_dir) if world.main else None)
        save_sharded(staging, net, optimizer, trainable_only=lora)
        world.barrier()
        if world.main:
            torch.save({"settings": settings.to_dict(), "world_size": world.size, "step": step, "loss": loss_value,
                        "eval_loss": eval_loss, "rng": rng}, staging / META_FILE)
            _replace_directory(staging, checkpoint_dir)
        world.barrier()

    tokens_per_step = settings.batch_size * settings.seq_len
    log = open(out / LOG_FILE, "a") if world.main else None
    interrupted = False
    with contextlib.ExitStack() as stack, _stop_flag(world) as flag:
        if log is not None:
            stack.enter_context(log)
        bar = stack.enter_context(_progress(settings, step, world))

        def record(entry: dict):
            if log is not None:
                log.write(json.dumps(entry) + "\n")
                log.flush()

        started, started_step = time.perf_counter(), step
        while step < settings.steps:
            lr = learning_rate(step, settings.lr, settings.warmup, settings.steps, settings.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            global_rows = torch.from_numpy(batch_rows(len(rows), settings.batch_size, settings.seed, step))
            count = int((rows.targets[global_rows] != IGNORE).sum())  # the step's targets, over all ranks
            loss_sum = 0.0
            parts = _rank_rows(global_rows, world, micro)
            for i, part in enumerate(parts):
                batch = rows.select(part)
                with _no_gradient_sync(net, last=i == len(parts) - 1):
                    loss = net(batch.tokens.to(world.device), batch.positions.to(world.device),
                               batch.targets.to(world.device), count)
                    # DDP and FSDP average gradients over ranks; the step's gradient is their sum.
                    (loss * world.size).backward()
                loss_sum += float(loss.detach())
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip))
            (loss_value,) = world.sum([loss_sum])
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise ValueError(f"step {step + 1}: the loss is {loss_value} and the gradient norm {grad_norm}; "
                                 f"stopped without saving (the last checkpoint is in {checkpoint_dir}); "
                                 "try a lower --lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            tokens_per_s = (step - started_step) * tokens_per_step / elapsed
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:.0f}")
            if step % settings.log_every == 0 or step == settings.steps:
                record({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "target_tokens": count,
                        "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s, "time": time.time()})
            if eval_rows is not None and (step % settings.eval_every == 0 or step == settings.steps):
                eval_loss = evaluate(net, eval_rows, world, micro)
                record({"step": step, "eval_loss": eval_loss, "time": time.time()})
                if bar is not None:
                    bar.write(f"step {step}: held-out loss {eval_loss:.4f}")
            if on_step is not None:
                on_step(step, loss_value)
            (stop,) = world.sum([float(flag["stop"])])  # every rank stops at the same step
            if stop:
                interrupted = True
                break
            if step % settings.checkpoint_every == 0:
                checkpoint()
        checkpoint()
        if not interrupted:
            _export(net, model, settings, base_path, tokenizer, out / FINAL_DIR, world)
    return FinetuneResult(step, loss_value, eval_loss, interrupted, out, model)


def _stop_flag(world: World) -> contextlib.AbstractContextManager[dict]:
    """flag["stop"] is set by Ctrl-C or SIGTERM (kill, a scheduler): the loop saves a checkpoint after the step.

    In one process a second signal interrupts at once (loop.interrupt_flag). Under torchrun every signal
    only sets the flag: a terminal's Ctrl-C reaches each worker twice (from the terminal, then passed on
    by torchrun), and torchrun itself kills workers that outlast its --shutdown-timeout.
    """
    return interrupt_flag(second_interrupts=not world.distributed)


@contextlib.contextmanager
def _no_gradient_sync(net: nn.Module, last: bool):
    """Gradients are reduced over ranks once per step, after the last micro-batch."""
    if last:
        yield
    elif hasattr(net, "no_sync"):  # DDP
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):  # FSDP
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


def _export(net: nn.Module, model: Griffin, settings: FinetuneSettings, base_path: Path, tokenizer: Tokenizer,
            directory: Path, world: World):
    """The adapter (LoRA) or the whole model in the Hugging Face layout, with the tokenizer, into `directory`."""
    lora = bool(settings.lora_rank)
    state = full_state(net, trainable_only=lora)  # every rank takes part; rank 0 receives it
    if not world.main:
        return
    state = {name.removeprefix("model."): t for name, t in state.items()}
    if lora:
        save_adapter({peft_name(name): t for name, t in state.items()}, _lora_settings(settings), directory,
                     base_model=str(base_path))
        return
    plain = Griffin(model.config, device="meta")
    plain.load_state_dict(state, assign=True, strict=True)
    with atomic_directory(directory, replace=True) as staging:
        save_model(plain, staging)
        for name in TOKENIZER_FILES:
            if (base_path / name).is_file():
                shutil.copyfile(base_path / name, staging / name)


def _staging_name(target: Path) -> Path:
    staging = target.with_name(f".{target.name}.tmp-{time.time_ns()}")
    staging.mkdir(parents=True)
    return staging


def _replace_directory(staging: Path, target: Path):
    """Put the complete `staging` in place of `target`: a crash leaves one of the two whole."""
    with atomic_directory(target, replace=True) as fresh:
        fresh.rmdir()
        staging.rename(fresh)


def _tidy_checkpoints(checkpoint_dir: Path):
    """Before a run starts: put back a checkpoint that a crash left aside, and remove unfinished ones.

    Replacing checkpoint/ takes two renames (rgemma/_io.py: the old one aside, the new one in): a crash
    between them leaves no checkpoint/ but the previous one whole beside it. A run stopped while saving
    leaves its staging directory, as large as a checkpoint.
    """
    aside = sorted(checkpoint_dir.parent.glob(f".{checkpoint_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not checkpoint_dir.exists() and aside and (aside[-1] / META_FILE).is_file():
        aside.pop().rename(checkpoint_dir)
    for leftover in aside + list(checkpoint_dir.parent.glob(f".{checkpoint_dir.name}.tmp-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _truncate_log(path: Path, step: int):
    """Drop log lines of steps after the checkpoint a run resumes from (a crash may have left them)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with atomic_file(path) as temporary:
            temporary.write_text("".join(line + "\n" for line in kept))


@contextlib.contextmanager
def _progress(settings: FinetuneSettings, step: int, world: World):
    if not (settings.progress and world.main):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=settings.steps, initial=step, unit="step", desc="fine-tuning", file=sys.stderr,
               dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
