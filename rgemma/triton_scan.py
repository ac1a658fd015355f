"""The linear recurrence h_t = a_t * h_{t-1} + x_t as one Triton kernel (CUDA prefill and training).

One program owns one batch row and BLOCK_D channels and walks time in tiles
of BLOCK_T steps: an associative scan inside each tile, in registers, then
the tile's last state carried into the next one. a, x and h cross device
memory once each, against about 3 sqrt(T) launches of the PyTorch blocked
scan. Products and sums only, so a reset (a = 0) stays exact.

Imported only where Triton is installed; `rgemma.scan` chooses it for CUDA
tensors. With TRITON_INTERPRET=1 it also runs on CPU tensors, which is how
the CPU test suite checks it against the reference loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A tile of 64 steps x 32 float32 channels (8 KiB per operand); 32 channels
# give 80 programs per row at the 2b width (2560), so a batch of one still
# spreads over the chip, though too thinly to fill it (docs/PERFORMANCE.md).
BLOCK_T = 64
BLOCK_D = 32


@triton.jit
def _compose(a_first, x_first, a_then, x_then):
    # Applying h -> a_first h + x_first, then h -> a_then h + x_then.
    return a_first * a_then, a_then * x_first + x_then


# One compiled kernel for every length: Triton would otherwise compile anew for
# lengths of other divisibility, in the middle of a timed prefill.
@triton.jit(do_not_specialize=["length"])
def _scan_kernel(a_ptr, x_ptr, h0_ptr, out_ptr, length, width, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_width = channels < width
    h = tl.load(h0_ptr + row * width + channels, mask=in_width, other=0.0)
    steps = tl.arange(0, BLOCK_T)
    row_start = row.to(tl.int64) * length * width
    for start in range(0, length, BLOCK_T):
        time = start + steps
        mask = (time < length)[:, None] & in_width[None, :]
        offsets = row_start + time[:, None].to(tl.int64) * width + channels[None, :]  # (BLOCK_T, BLOCK_D)
        # Past the end, a = 1 and x = 0 hold the state, so the tile's last row is its end state.
        a = tl.load(a_ptr + offsets, mask=mask, other=1.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        a_prefix, x_prefix = tl.associative_scan((a, x), axis=0, combine_fn=_compose)
        hs = a_prefix * h[None, :] + x_prefix
        tl.store(out_ptr + offsets, hs, mask=mask)
        h = tl.sum(tl.where(steps[:, None] == BLOCK_T - 1, hs, 0.0), axis=0)


def scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """All h_t (B, T, D) float32 for a, x (B, T, D) float32 and h0 (B, D) or None."""
    a, x = a.contiguous(), x.contiguous()
    batch, length, width = x.shape
    out = torch.empty_like(x)
    h0 = x.new_zeros(batch, width) if h0 is None else h0.contiguous()
    grid = (batch, triton.cdiv(width, BLOCK_D))
    _scan_kernel[grid](a, x, h0, out, length, width, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return out
