"""How `wrap` lays a model out for FSDP: each residual block a unit of its own, and the root (the tied
embedding, the final norm) the last. Checked in a gloo group of one process, made and destroyed here."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from rgemma.config import Config
from rgemma.model import Griffin
from rgemma.train.distributed import World, wrap
from rgemma.train.finetune import LossModel


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        yield World(0, 1, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def unit_parameters(unit: FSDPModule) -> set[int]:
    """The parameters this unit itself shards and gathers (not those of units inside it), by identity."""
    return {id(p.sharded_param) for p in unit._get_fsdp_state()._fsdp_param_group.fsdp_params}


def test_fsdp_shards_each_residual_block_as_a_unit_and_the_embedding_in_the_root(world_of_one):
    model = Griffin(Config.preset("tiny"))
    net = wrap(LossModel(model, 64, None), world_of_one, fsdp=True)
    units = {name: module for name, module in net.named_modules() if isinstance(module, FSDPModule)}
    blocks = [f"model.layers.{i}" for i in range(len(model.layers))]
    assert list(units) == ["", *blocks]  # the root, then one unit per block, and nothing else
    for name in blocks:
        assert unit_parameters(units[name]) == {id(p) for p in net.get_submodule(name).parameters()}
    # The root holds what no block does: the tied embedding and the final norm.
    assert unit_parameters(units[""]) == {id(model.embed_tokens.weight), id(model.final_norm.weight)}
