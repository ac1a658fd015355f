"""The fast linear scan equals the plain loop, in values and gradients."""

import pytest
import torch

from rgemma.scan import linear_scan, linear_scan_loop


def _inputs(length, with_h0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(2, length, 5, generator=generator, dtype=torch.float64)
    a[:, length // 3] = 0.0  # a document start inside the sequence
    x = torch.randn(2, length, 5, generator=generator, dtype=torch.float64)
    h0 = torch.randn(2, 5, generator=generator, dtype=torch.float64) if with_h0 else None
    return a, x, h0


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 100, 257, 1500])
@pytest.mark.parametrize("with_h0", [False, True])
def test_values_and_gradients_equal_the_loop(length, with_h0):
    a, x, h0 = _inputs(length, with_h0)
    inputs = [t.requires_grad_() for t in (a, x, h0) if t is not None]
    weights = torch.randn(2, length, 5, dtype=torch.float64)
    last_weights = torch.randn(2, 5, dtype=torch.float64)

    results = []
    for scan in (linear_scan, linear_scan_loop):
        h, last = scan(a, x, h0)
        loss = (h * weights).sum() + (last * last_weights).sum()
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        results.append((h, last, grads))

    (h_fast, last_fast, grads_fast), (h_loop, last_loop, grads_loop) = results
    torch.testing.assert_close(h_fast, h_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last_fast, last_loop, rtol=1e-12, atol=1e-12)
    for fast, loop in zip(grads_fast, grads_loop):
        torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)


def test_float32_long_sequence_stays_close():
    a, x, h0 = _inputs(5000, True, seed=1)
    a = a * 0.2 + 0.8  # long memories: errors would compound if the scan were unstable
    h_fast, _ = linear_scan(a.float(), x.float(), h0.float())
    h_ref, _ = linear_scan_loop(a, x, h0)
    torch.testing.assert_close(h_fast.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_a_reset_forgets_everything_before():
    a, x, h0 = _inputs(300, True)
    h, _ = linear_scan(a, x, h0)
    start = 300 // 3
    h_after, _ = linear_scan(a[:, start:], x[:, start:], None)
    torch.testing.assert_close(h[:, start:], h_after, rtol=0, atol=1e-12)


# The fused CUDA kernel, run by Triton's interpreter on the CPU (a fresh
# process: the interpreter is chosen when the kernel module is imported).
_FUSED_SCAN_CHECK = """
import torch
from rgemma.scan import linear_scan_loop
from rgemma.triton_scan import BLOCK_D, BLOCK_T, scan

generator = torch.Generator().manual_seed(0)
# Lengths across tile boundaries, a width that leaves a partial channel block.
for length in (1, BLOCK_T + 3):
    for with_h0 in (False, True):
        a = torch.rand(2, length, BLOCK_D + 5, generator=generator)
        a[:, length // 2] = 0.0  # a document start
        x = torch.randn(2, length, BLOCK_D + 5, generator=generator)
        h0 = torch.randn(2, BLOCK_D + 5, generator=generator) if with_h0 else None
        h = scan(a, x, h0)
        h_ref, _ = linear_scan_loop(a.double(), x.double(), None if h0 is None else h0.double())
        torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
        start = length // 2  # after the reset, nothing from before the document start remains
        torch.testing.assert_close(h[:, start:], scan(a[:, start:], x[:, start:], None), rtol=0, atol=1e-6)
print("fused scan ok")
"""


def test_fused_scan_kernel_equals_the_loop():
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _FUSED_SCAN_CHECK], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused scan ok" in result.stdout
