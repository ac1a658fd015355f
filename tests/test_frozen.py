"""A LoRA run's frozen base: FrozenLinear computes what Linear does, values and input gradients, and autograd
keeps no copy of a 16-bit base's weights (the float32 casts Linear's backward would hold)."""

import contextlib

import pytest
import torch

from rgemma import Config, Griffin
from rgemma.lora import LoraSettings, add_lora
from rgemma.model import Linear
from rgemma.train.frozen import FrozenLinear, base_dtype, base_matrices, freeze_linears
from rgemma.train.loss import next_token_loss
from conftest import perturb_

MODES = {"float32": contextlib.nullcontext, "bf16-autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frozen_linear_equals_linear_values_and_input_gradients(mode, weight_dtype):
    torch.manual_seed(0)
    linear = perturb_(Linear(48, 40)).to(weight_dtype).requires_grad_(False)
    frozen = Linear(48, 40).to(weight_dtype).requires_grad_(False)
    frozen.load_state_dict(linear.state_dict())
    frozen.__class__ = FrozenLinear
    outputs, grads = [], []
    for module in (linear, frozen):
        x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with MODES[mode]():
            y = module(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype))
        outputs.append(y)
        grads.append(x.grad)
    assert outputs[0].dtype == outputs[1].dtype == (torch.bfloat16 if mode != "float32" else torch.float32)
    # The same products of the same values: equal to the bit.
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_base_dtype_keeps_16_bit_checkpoints_and_rounds_float32_ones_to_bf16():
    assert base_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert base_dtype("auto", torch.float16) == torch.float16
    assert base_dtype("auto", torch.float32) == torch.bfloat16
    assert base_dtype("bfloat16", torch.float16) == torch.bfloat16
    assert base_dtype("float32", torch.bfloat16) == torch.float32


def lora_model(freeze: bool) -> Griffin:
    """A random tiny Griffin as a LoRA run holds it: matrices bf16, the rest float32, adapters added."""
    torch.manual_seed(0)
    model = perturb_(Griffin(Config.preset("tiny-wide-lru")))
    matrices = base_matrices(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in matrices:
                param.data = param.data.to(torch.bfloat16)
    add_lora(model, LoraSettings(rank=2, targets=("linear_x", "q_proj", "up_proj", "input_gate_weight")))
    if freeze:
        assert freeze_linears(model) == 6 * 3 + 4 * 3 + 2 * 4  # every block linear, adapted (its base) or not
    return model.train()


def saved_copies_of_matrices(model: Griffin, mode: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """What autograd keeps for backward, in one forward and the loss, that has a base matrix's shape and is not
    the stored matrix itself."""
    stored = [p for p in model.parameters() if p.dtype == torch.bfloat16]
    assert stored and not any(p.requires_grad for p in stored)
    shapes = {p.shape for p in stored} | {p.shape[::-1] for p in stored}  # matmuls save transposed views too
    storages = {p.untyped_storage().data_ptr() for p in stored}
    copies = []

    def pack(tensor):
        if tensor.shape in shapes and tensor.untyped_storage().data_ptr() not in storages:
            copies.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), MODES[mode]():
        hidden, _ = model(tokens, hidden_only=True)
        loss = next_token_loss(model, hidden, tokens)
    loss.backward()
    return copies


@pytest.mark.parametrize("mode", MODES)
def test_a_frozen_16_bit_base_keeps_no_copies_for_backward(mode):
    assert not saved_copies_of_matrices(lora_model(freeze=True), mode)
    # What the test would see without FrozenLinear: in float32, a float32 copy for 36 of the 38 linears (the two
    # reading the frozen embedding need no input gradient); under autocast, a bf16 cast of the float32 copy
    # for the 24 reading float32 (the norms' outputs); the others read bf16 and multiply the stored weight.
    copies = saved_copies_of_matrices(lora_model(freeze=False), mode)
    assert len(copies) == (36 if mode == "float32" else 24)
    assert {dtype for _, dtype in copies} == {torch.float32 if mode == "float32" else torch.bfloat16}


def test_lora_factors_still_get_their_gradients():
    model = lora_model(freeze=True)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    hidden, _ = model(tokens, hidden_only=True)
    next_token_loss(model, hidden, tokens).backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
    # B starts at zero, so A's gradient is zero at first; B's is not.
    assert all(p.grad is not None for _, p in trainable)
    assert all(p.grad.abs().sum() > 0 for name, p in trainable if "lora_B" in name)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
