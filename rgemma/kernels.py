"""Which kernel computes a linear layer at inference, and the native CPU kernels behind it.

Decoding multiplies every weight matrix by one vector per sequence, so it is
bound by memory bandwidth. torch's CPU matrix-vector products (bf16 above all
on CPUs without native bf16) run well below it, so decode-sized products on
x86 CPUs with AVX2 go to our own kernels (csrc/cpu_kernels.cpp), compiled with
torch's extension builder the first time they are needed and cached. Where
they cannot be built or run, every product takes the plain PyTorch path,
which computes the same function: the tests compare the two.

Prefill multiplies whole chunks of tokens (matrix-matrix), where torch's
GEMM is the right kernel; on CPUs without native bf16 arithmetic it runs in
float32, which is several times faster than bf16 there.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
# Up to this many rows (tokens across the batch) a product is decode-sized:
# the native kernels read each weight once for all rows.
MAX_KERNEL_ROWS = 16


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    return base / "rgemma" / "kernels" / f"torch-{torch.__version__}-{digest}"


def cpu_supported() -> bool:
    """The CPU runs AVX2 code (torch reports AVX2 or AVX512 capability)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def native() -> ModuleType | None:
    """The compiled CPU kernels, built on first use; None where they cannot be."""
    if os.environ.get("RGEMMA_NATIVE_KERNELS", "1") == "0" or not cpu_supported():
        return None
    from torch.utils import cpp_extension

    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        print("rgemma: compiling the CPU kernels (once, about a minute)...", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            name="rgemma_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=COMPILE_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except Exception as error:  # a missing compiler or ninja: fall back, but say so once
        message = str(error).strip().splitlines()
        warnings.warn(
            f"rgemma: CPU kernels unavailable ({message[-1] if message else type(error).__name__}); "
            "decoding uses plain PyTorch, which is slower",
            stacklevel=2,
        )
        return None


@functools.cache
def cpu_matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU matrix-matrix product of `dtype` tensors should run in.

    bf16/fp16 GEMMs are fast only with native support (AVX512-BF16, AMX);
    elsewhere they run several times slower than float32.
    """
    if dtype in (torch.bfloat16, torch.float16) and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return dtype


def is_decode_sized(x: torch.Tensor) -> bool:
    """At most MAX_KERNEL_ROWS rows of activations (..., K): a matrix-vector product."""
    return x.numel() <= MAX_KERNEL_ROWS * x.shape[-1]


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether a product with these activations (..., K) goes to the native decode kernels."""
    return (
        x.device.type == "cpu"
        and is_decode_sized(x)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and native() is not None
    )


def rows_float32(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> contiguous float32 (rows, K), the kernels' input."""
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the fastest kernel for x's size and device."""
    if weight.requires_grad and torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    if weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous() and uses_kernel(x):
        y = native().float_linear(rows_float32(x), weight)  # (rows, N) float32
        if bias is not None:
            y += bias
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    if x.device.type == "cpu" and cpu_matmul_dtype(x.dtype) != x.dtype and not is_decode_sized(x):
        compute = cpu_matmul_dtype(x.dtype)
        bias = None if bias is None else bias.to(compute)
        return F.linear(x.to(compute), weight.to(compute), bias).to(x.dtype)
    return F.linear(x, weight, bias)
