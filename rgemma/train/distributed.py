"""torch.distributed for training: the process group torchrun describes, DDP or FSDP, and sharded checkpoints.

A run started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment)
joins its process group: gloo on CPU, nccl on CUDA; a plain run is a world
of one and never touches torch.distributed. The model is wrapped with DDP,
or with FSDP (torch.distributed.fsdp.fully_shard: parameters, gradients and
optimiser state sharded; each residual block a unit, the root holding the
tied embedding and the final norm). Checkpoints go through
torch.distributed.checkpoint, each rank writing its own shard, so an FSDP
run never gathers its weights to save them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)

from rgemma.model import ResidualBlock

# A plain run is a world of one: DCP then writes and reads in this process, which it says in a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> list:
        """Every rank's picklable value, in rank order."""
        if not self.distributed:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value):
        """Rank 0's picklable value, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def join_world(device: str) -> World:
    """The world torchrun started this process in (joined here), or a world of one."""
    if "WORLD_SIZE" not in os.environ:
        return World(0, 1, torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), where)


def leave_world(world: World):
    if world.distributed:
        dist.destroy_process_group()


def wrap(module: nn.Module, world: World, fsdp: bool) -> nn.Module:
    """DDP or FSDP around `module` (whose forward returns the loss); the module itself in a world of one."""
    if not world.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in module.modules():
            if isinstance(block, ResidualBlock):
                fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Frozen parameters (a LoRA run's base) are read from the same file by every rank and never change. DDP
    # would broadcast them from rank 0, writing into each rank's copy-on-write view of the file: a private
    # copy of the whole base in every process (measured), for nothing.
    frozen = [name for name, param in module.named_parameters() if not param.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(module, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def _options(trainable_only: bool, full: bool = False) -> StateDictOptions:
    # Loading only the trainable parameters leaves the frozen ones out on purpose (not strict); dcp.load
    # still fails on any that the checkpoint lacks.
    return StateDictOptions(ignore_frozen_params=trainable_only, full_state_dict=full, cpu_offload=full,
                            strict=not trainable_only)


def save_sharded(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool):
    """Each rank writes its part of the model and optimiser state into `directory` (the same on every rank)."""
    model_state, optimizer_state = get_state_dict(module, optimizer, options=_options(trainable_only))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_sharded(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool):
    """Read what save_sharded wrote into the (wrapped) module and optimiser, in place."""
    model_state, optimizer_state = get_state_dict(module, optimizer, options=_options(trainable_only))
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options(trainable_only))


def full_state(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on the CPU of rank 0; every rank must call it (FSDP gathers)."""
    return get_model_state_dict(module, options=_options(trainable_only, full=True))
