"""Backends: what makes a model fast on its device, applied to the model from outside.

`prepare(model)` decides, once, how a model computes on its device, and
rewrites it in place for that: the activations' dtype, which kernel computes
each product, and how a decode step runs (one native call on CPUs, a CUDA
graph on GPUs). The model itself (rgemma/model.py) stays plain PyTorch and
never learns that a backend exists; a module a backend does not know (an
adapter, say) is computed by its own forward, never by a kernel that would
ignore it.

The environment is read once per `prepare` (`Options.resolved`, base.py) and
nowhere else:
- RGEMMA_NATIVE_KERNELS=0: no native CPU kernels (plain PyTorch throughout);
- RGEMMA_CPU_BF16=0/1: treat the CPU as without / with fast bf16 arithmetic,
  whatever it reports (which prefill GEMM bf16 models use);
- RGEMMA_CUDA_GRAPHS=0: no CUDA graphs for decode steps;
- RGEMMA_CPU_LEVEL=avx2 (avx2-vnni, avx512, avx512-vnni, avx512-vnni-bf16): the native kernels built
  for that instruction-set level instead of the best this CPU runs
  (native.py; `rgemma info --hardware` shows the choice).
"""

from __future__ import annotations

import torch

from rgemma.backends.base import Backend, Options
from rgemma.backends.cpu import CpuBackend
from rgemma.backends.cuda import CudaBackend
from rgemma.model import Griffin

__all__ = ["Backend", "Options", "prepare"]


def prepare(model: Griffin, device: torch.device | str | None = None, options: Options | None = None) -> Backend:
    """Rewrite `model` in place for `device` (moving it there; default: where it is) and return the backend that
    serves it.

    Preparing a model again (for other options, say) is harmless: the last call decides.
    """
    if device is not None:
        model.to(device)
    options = (options or Options()).resolved()
    kinds = {"cpu": CpuBackend, "cuda": CudaBackend}
    return kinds.get(model.device.type, Backend)(model, options)
