"""The linear recurrence h_t = a_t * h_{t-1} + x_t, accumulated in float32.

`linear_scan_loop` is the plain reference. `linear_scan` is the fast path: on
CUDA with Triton installed, one fused kernel (`rgemma.triton_scan`);
elsewhere a blocked scan of about 3 sqrt(T) vectorised steps instead of T.
Its custom backward is itself a reverse linear scan, so training keeps only
a, h and h0 for the backward pass.

Shapes: B batch, T time, D channels.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch
import torch.nn.functional as F


def linear_scan_loop(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a Python loop over time. a, x (B, T, D); h0 (B, D) or None for zeros."""
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    return torch.stack(ys, dim=1), h


@functools.cache
def _fused_scan() -> ModuleType | None:
    """rgemma.triton_scan where Triton is installed, else None."""
    try:
        from rgemma import triton_scan
    except ImportError:
        return None
    return triton_scan


def _scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """All h_t for a, x (B, T, D), without autograd bookkeeping."""
    if x.is_cuda and _fused_scan() is not None:
        return _fused_scan().scan(a, x, h0)
    return blocked_scan(a, x, h0)


def blocked_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """All h_t for a, x (B, T, D) in PyTorch operations, on any device.

    Time is cut into N blocks of C ~ sqrt(T) steps. A first loop of C steps
    runs all blocks at once from a zero state to get each block's end state and
    the product of its a; a loop of N steps carries the true state from block to
    block; a second loop of C steps reruns the blocks from their true starting
    states, writing h. About 3 sqrt(T) vectorised steps instead of T, and only
    products and sums (no division), so a reset (a = 0) stays exact.
    """
    batch, length, width = x.shape
    block = max(16, math.isqrt(length - 1) + 1)
    num_blocks = -(-length // block)
    pad = num_blocks * block - length
    if pad:  # a = 1, x = 0 leaves the state unchanged
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, pad))
    a_blocks = a.reshape(batch, num_blocks, block, width)
    x_blocks = x.reshape(batch, num_blocks, block, width)

    h_end = x_blocks[:, :, 0]  # (B, N, D) each block's state from zero
    a_prod = a_blocks[:, :, 0]  # (B, N, D) product of the block's a
    for t in range(1, block):
        h_end = torch.addcmul(x_blocks[:, :, t], a_blocks[:, :, t], h_end)
        a_prod = a_prod * a_blocks[:, :, t]

    carry = torch.zeros_like(h_end[:, 0]) if h0 is None else h0  # (B, D)
    starts = []
    for n in range(num_blocks):
        starts.append(carry)
        carry = torch.addcmul(h_end[:, n], a_prod[:, n], carry)
    h = torch.stack(starts, dim=1)  # (B, N, D) true state entering each block

    out = torch.empty_like(x_blocks)
    for t in range(block):
        h = torch.addcmul(x_blocks[:, :, t], a_blocks[:, :, t], h, out=out[:, :, t])
    return out.view(batch, num_blocks * block, width)[:, :length]


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0):
        h = _scan(a, x, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        # dL/dh_t = g_t + a_{t+1} dL/dh_{t+1}: the same recurrence run backwards.
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        grad_x = _scan(a_next.flip(1), grad_h.flip(1), None).flip(1)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]) if h0 is None else h0[:, None], h[:, :-1]], dim=1)
        grad_a = grad_x * h_prev
        grad_h0 = None if h0 is None else grad_x[:, 0] * a[:, 0]
        return grad_a, grad_x, grad_h0


def linear_scan(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All states h (B, T, D) and the last one (B, D); a, x (B, T, D); h0 (B, D) or None."""
    if x.shape[1] == 1:
        h = x if h0 is None else a * h0[:, None] + x
    else:
        h = _LinearScan.apply(a, x, h0)
    return h, h[:, -1].clone()  # a view would keep all of h alive in the state
