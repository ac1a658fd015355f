"""How `wrap` lays a model out for FSDP: each residual block a unit of its own, and the root (the tied
embedding, the final norm) the last. Checked in a gloo group of one process, made and destroyed here."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from rgemma.config import Config
from rgemma.model import Griffin, ResidualBlock
from rgemma.train.distributed import World, wrap
from rgemma.train.finetune import LossModel


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        yield World(0, 1, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_fsdp_shards_each_residual_block_as_a_unit_and_the_embedding_in_the_root(world_of_one):
    model = Griffin(Config.preset("tiny"))
    net = wrap(LossModel(model, 64, None), world_of_one, fsdp=True)
    units = [name for name, module in net.named_modules() if isinstance(module, FSDPModule)]
    blocks = [f"model.layers.{i}" for i in range(len(model.layers))]
    assert units == ["", *blocks]  # the root, then one unit per block, and nothing else
    assert all(isinstance(module, ResidualBlock) for module in model.layers)
    # Each unit's parameters are sharded tensors; the embedding and final norm belong to the root alone.
    root_only = {name for name, _ in net.named_parameters() if not name.startswith("model.layers.")}
    assert {"model.embed_tokens.weight", "model.final_norm.weight"} <= root_only
    assert all(type(param).__name__ == "DTensor" for param in net.parameters())
