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
