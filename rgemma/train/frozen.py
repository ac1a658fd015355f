"""The frozen base of a LoRA run: its matrices stored in 16 bits, and multiplied without keeping copies.

A LoRA run trains only its adapters' factors (float32 master weights); the
base is never updated, so its matrices, the embedding and every block linear
(99% of the parameters), need not be float32. They are stored in 16 bits:
a bf16 or float16 checkpoint in its own dtype (nothing is lost), a float32
checkpoint in bf16 (each weight rounded once to 8 significant bits; under
bf16 autocast every product rounds a float32 weight so anyway). The rest
(norms, biases, the conv, the RG-LRU's parameters and gates: about 1%) stays
float32, so the activations are float32 as in a float32 run.

Storing 16 bits is not enough: the network's `Linear` multiplies by
`weight.to(x.dtype)`, and autograd keeps that float32 copy (under autocast,
the bf16 cast of it) for the backward pass, so every layer's copy would be
held until the backward. A frozen linear needs no weight gradient, hence
neither its input: `FrozenLinear` keeps only the stored weight and casts it
again in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rgemma.model import Griffin, Linear, linear_paths

# FinetuneSettings.lora_base_dtype -> how the base's matrices are stored (None: by the checkpoint's dtype).
BASE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def base_dtype(setting: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """"auto": a 16-bit checkpoint's own dtype, else bf16."""
    chosen = BASE_DTYPES[setting]
    if chosen is not None:
        return chosen
    return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def base_matrices(model: Griffin) -> set[str]:
    """Parameter names of the matrices stored in 16 bits: the embedding and every block linear's weight."""
    return {f"{path}.weight" for path in linear_paths(model.config)}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a product with x runs in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _FrozenProduct(torch.autograd.Function):
    """x @ weight^T + bias for a weight and bias that get no gradient: only the weight as stored is kept."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class FrozenLinear(Linear):
    """A Linear whose weight and bias are frozen: the same product (under autocast too), without the float32
    copy of its weight, or the input, that autograd would keep for the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))  # what autocast would give F.linear
        with torch.autocast(x.device.type, enabled=False):
            return _FrozenProduct.apply(x, self.weight, self.bias)


def freeze_linears(model: Griffin) -> int:
    """Make every Linear whose parameters are all frozen a FrozenLinear, in place (the same parameters and
    names: only forward differs); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is Linear and not any(p.requires_grad for p in module.parameters()):
            module.__class__ = FrozenLinear
            count += 1
    return count
