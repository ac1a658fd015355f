"""Which kernel computes a linear layer at inference, and the native CPU kernels behind it.

Decoding multiplies every weight matrix by one vector per sequence, so it is
bound by memory bandwidth. torch's CPU matrix-vector products (bf16 above all
on CPUs without native bf16) run well below it, so decode-sized products on
x86 CPUs with AVX2 go to our own kernels (csrc/cpu_kernels.cpp), compiled with
torch's extension builder the first time they are needed and cached. Where
they cannot be built or run, every product takes the plain PyTorch path,
which computes the same function: the tests compare the two.

Prefill multiplies whole chunks of tokens (matrix-matrix), where torch's
GEMM is the right kernel. On CPUs without native bf16 arithmetic a bf16 GEMM
runs several times slower than float32, so there models keep bf16 weights but
compute in float32 (`activation_dtype`), widening weights slice by slice.
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
from torch.utils.weak import WeakIdKeyDictionary

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
# Up to this many rows (tokens across the batch) a product is decode-sized:
# the native kernels read each weight once for all rows.
MAX_KERNEL_ROWS = 16
# A weight widened to the activations' dtype is widened this many bytes at a time.
WIDEN_BYTES = 64 * 2**20


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


def is_decode_sized(x: torch.Tensor, row_width: int | None = None) -> bool:
    """At most MAX_KERNEL_ROWS rows of `row_width` (default: the last dim): a matrix-vector product."""
    return x.numel() <= MAX_KERNEL_ROWS * (row_width or x.shape[-1])


def uses_kernel(x: torch.Tensor, row_width: int | None = None) -> bool:
    """Whether a product with these activations goes to the native decode kernels."""
    return (
        x.device.type == "cpu"
        and is_decode_sized(x, row_width)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and native() is not None
    )


def _inference(weight: torch.Tensor) -> bool:
    """No gradient is wanted, and the weight is in a format the kernels read."""
    return (
        not (weight.requires_grad and torch.is_grad_enabled())
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.is_contiguous()
    )


_converted = WeakIdKeyDictionary()  # tensor -> (version, converted copy)


def parameter_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`. At inference a conversion is kept until t changes, so the small
    parameters read at every step (norm scales, biases, conv taps) are not
    converted at every step: on CPUs that compute bf16 models in float32 these
    conversions were a tenth of a decode step."""
    if t.dtype == dtype:
        return t
    if (t.requires_grad and torch.is_grad_enabled()) or t.is_inference():
        return t.to(dtype)
    cached = _converted.get(t)
    if cached is None or cached[0] != (t._version, dtype):
        cached = _converted[t] = ((t._version, dtype), t.detach().to(dtype))
    return cached[1]


def rows_float32(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> contiguous float32 (rows, K), the kernels' input."""
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def activation_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model with these weights computes in: float32 on CPUs without native bf16/fp16."""
    return cpu_matmul_dtype(weight_dtype) if device.type == "cpu" else weight_dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the fastest kernel for x's size and device.

    Weights stored in a narrower dtype than x (bf16 weights, float32
    activations) are widened a slice of rows at a time, so a product never
    holds a widened copy of more than WIDEN_BYTES of weights.
    """
    if _inference(weight) and uses_kernel(x):
        y = native().float_linear(rows_float32(x), weight)  # (rows, N) float32
        if bias is not None:
            y += parameter_as(bias, y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    bias = None if bias is None else parameter_as(bias, x.dtype)
    rows_per_slice = max(1, WIDEN_BYTES // (weight.shape[1] * x.element_size()))
    if weight.shape[0] <= rows_per_slice:
        return F.linear(x, weight.to(x.dtype), bias)
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, weight.shape[0], rows_per_slice):
        rows = slice(start, start + rows_per_slice)
        y[..., rows] = F.linear(x, weight[rows].to(x.dtype), None if bias is None else bias[rows])
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * (1 + weight), computed in float32 (the weight is stored zero-centred), in x's dtype."""
    if _inference(weight) and uses_kernel(x):
        return native().rms_norm(rows_float32(x), weight, eps).to(x.dtype).view(x.shape)
    scale = 1.0 + parameter_as(weight, torch.float32)
    return F.rms_norm(x.float(), x.shape[-1:], scale, eps).to(x.dtype)


def block_diagonal_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., H, I), weight (H, I, J) -> (..., H, J): each head's block of x times its own matrix."""
    heads, width = weight.shape[0], weight.shape[0] * weight.shape[1]
    if _inference(weight) and uses_kernel(x, width):
        rows = x.reshape(-1, heads, weight.shape[1]).float().contiguous()  # (rows, H, I)
        y = native().block_diagonal_linear(rows, weight)  # (rows, H, J) float32
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[2])
    return torch.einsum("...hi,hij->...hj", x, weight.to(x.dtype))


def join_parts(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(keys (B, S_i, K), values (B, S_i, K), visible (B, Q, S_i))] -> the same three, concatenated along S."""
    keys, values, visible = zip(*parts)
    return torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.cat(visible, dim=2)


def attend_few(
    q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], scale: float
) -> torch.Tensor:
    """Attention of a few queries (decoding) over parts of keys, in float32.

    q (B, Q, H, K); parts [(keys (B, S, K), values (B, S, K), visible (B, Q, S))]
    -> (B, Q, H, K). The parts (the state's ring buffer, the new keys) are
    attended to as if concatenated. On CPUs the native kernel reads each key
    once for all heads; torch's fused attention is several times slower for a
    single query, so elsewhere it is two small matmuls.
    """
    dtype = parts[0][0].dtype
    if uses_kernel(q, q.shape[-2] * q.shape[-1]) and dtype in (torch.float32, torch.bfloat16):
        out = native().attend_few(
            q.float().contiguous(),
            [keys.to(dtype).contiguous() for keys, _, _ in parts],
            [values.to(dtype).contiguous() for _, values, _ in parts],
            [visible.contiguous() for _, _, visible in parts],
            scale,
        )
        return out.to(q.dtype)
    keys, values, visible = join_parts(parts)
    scores = torch.einsum("bqhk,bsk->bhqs", q.float(), keys.float()) * scale
    scores.masked_fill_(~visible[:, None], float("-inf"))
    return torch.einsum("bhqs,bsk->bqhk", scores.softmax(dim=-1), values.float()).to(q.dtype)
