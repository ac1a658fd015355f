"""Weight-only quantization that is safe for the recurrence: int8 per output row, int4 in groups.

Only the large matrices are quantized: the embedding (also the tied output
layer) and every linear of the blocks (MLP gate/up/down, recurrent
linear_x/linear_y/linear_out, attention q/k/v/o), which hold nearly all the
weights. The RG-LRU (its gates and recurrent_param), the convolution, the
norms and every bias stay in the model's float dtype: the RG-LRU multiplies
the state by a_t at every step, so an error in a = exp(-8 r softplus(param))
is compounded over thousands of tokens instead of being made once, and these
parameters are a tiny fraction of the model anyway. Activations are never
stored quantized; the state stays float32 as in the float model.

Formats (the layouts csrc/cpu_kernels.cpp reads):
- int8: qweight int8 (N, K) in -127..127 and scale float32 (N,), symmetric
  per output row: w = qweight * scale.
- int4: qweight uint8 (N, Kp / 2), scale and minimum float16 (N, Kp / G), for
  groups of G inputs (G a multiple of 64): w = q * scale + minimum, q in
  0..15. In each block of 64 inputs (32 bytes), byte i holds input i in its
  low nibble and input i + 32 in its high one. Rows whose K is not a multiple
  of G are zero-padded to Kp; the activations are padded to match.

A checkpoint records its format in config.json and in every safetensors
header (see `Quantization`); nothing is guessed from names. One format per
checkpoint: a module that cannot be stored in it is an error, never quietly
kept in another precision.

The modules here compute plainly: they dequantize the weight, a block of
output rows at a time, and use F.linear. On CPUs the backend
(rgemma/backends/cpu.py) sends products with a few rows (decoding) to native
kernels that quantize the activations to int8 too and multiply in integers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rgemma.model import Embedding, Griffin, Linear, linear_paths

BITS = (8, 4)
DEFAULT_GROUP_SIZE = 64
INT4_BLOCK = 64  # inputs per packed block: 32 bytes of two nibbles
# Quantizing and the plain path work on blocks of rows of about this many
# weights, so no float copy of a whole large matrix (the embedding) is ever made.
CHUNK_WEIGHTS = 1 << 20
HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14  # linux/mman.h


def check_format(bits: int, group_size: int | None = DEFAULT_GROUP_SIZE) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"quantization bits must be 8 or 4, got {bits!r}")
    if bits == 4 and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % INT4_BLOCK
    ):
        raise ValueError(f"int4 group size must be a positive multiple of {INT4_BLOCK}, got {group_size!r}")


def padded(in_features: int, group_size: int) -> int:
    """Row length of an int4 matrix: K rounded up to whole groups."""
    return -(-in_features // group_size) * group_size


def check_padding(in_features: int, group_size: int) -> None:
    """Refuse groups that would more than double a row: the padding would cost more than int4 saves
    (groups of 6400 on a row of 160 inputs once made an "int4" file 8x larger than its bf16 original)."""
    if padded(in_features, group_size) > 2 * in_features:
        raise ValueError(
            f"has {in_features} inputs, which int4 groups of {group_size} pad to {padded(in_features, group_size)}, "
            f"more than double: take smaller groups ({INT4_BLOCK} pads it to {padded(in_features, INT4_BLOCK)})"
        )


# Quantizers ------------------------------------------------------------------


def _row_chunks(rows: int, in_features: int) -> Iterable[slice]:
    step = max(1, CHUNK_WEIGHTS // max(in_features, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n, K) -> int8 (n, K), scale float32 (n,): round(w / scale), scale = max|w| / 127."""
    amax = w.abs().amax(dim=1)
    if not torch.isfinite(amax).all():
        raise ValueError("has non-finite weights")
    scale = amax / 127.0
    safe = torch.where(scale > 0, scale, 1.0)  # an all-zero row: q = 0, scale 0
    return torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _half_at_most(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 <= x (x float32)."""
    h = x.half()
    bits = h.view(torch.int16)
    # One step toward -inf: a positive half's bit pattern decreases, a negative
    # one's (sign bit set, negative as int16) increases; +0 steps to -2^-24.
    down = torch.where(bits > 0, bits - 1, torch.where(bits == 0, -32767, bits + 1)).view(torch.float16)
    return torch.where(h.float() > x, down, h)


def _half_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (x float32, >= 0)."""
    h = x.half()
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(h.float() < x, up, h)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 (..., Kp) in 0..15 -> (..., Kp / 2): in each block of 64 inputs, byte i = input i | input i+32 << 4."""
    blocks = q.unflatten(-1, (-1, 2, INT4_BLOCK // 2))  # (..., Kp/64, 2, 32)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).flatten(-2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., Kp / 2) -> uint8 (..., Kp) in 0..15; the inverse of pack_int4."""
    blocks = packed.unflatten(-1, (-1, INT4_BLOCK // 2))  # (..., Kp/64, 32)
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=-2).flatten(-3)


def _quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (n, K) -> packed uint8 (n, Kp/2), scale and minimum float16 (n, Kp/G)."""
    rows, in_features = w.shape
    pad = padded(in_features, group_size) - in_features
    # The padding takes no part in the ranges (+-inf never wins the min/max).
    low = F.pad(w, (0, pad), value=math.inf).unflatten(1, (-1, group_size)).amin(-1)
    high = F.pad(w, (0, pad), value=-math.inf).unflatten(1, (-1, group_size)).amax(-1)
    # q is computed from the float16 scale and minimum the kernels will use,
    # rounded outward so that [minimum, minimum + 15 scale] covers the group:
    # then every weight is within scale / 2 of its dequantized value.
    minimum = _half_at_most(low)
    scale = _half_at_least((high - minimum.float()) / 15.0)
    if not (torch.isfinite(minimum).all() and torch.isfinite(scale).all()):
        raise ValueError("has weights that are non-finite or beyond float16's range, which int4 scales cannot hold")
    safe = torch.where(scale > 0, scale.float(), 1.0)  # a constant group: q = 0 is exact
    groups = F.pad(w, (0, pad)).unflatten(1, (-1, group_size))  # (n, Kp/G, G)
    q = torch.round((groups - minimum.float()[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.flatten(1)), scale, minimum


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def _empty_on_huge_pages(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, asking Linux to back the memory with 2 MB pages when it is first written.

    Decoding streams every quantized weight once per step, and on 4 KB pages
    the kernels' TLB misses cost a large part of a step (docs/PERFORMANCE.md
    has the figures). Transparent huge pages are often enabled only for
    memory that asks (`madvise` mode), as torch's allocator does not; the
    float weights are mapped from their files, where the page cache decides.
    """
    tensor = torch.empty(*shape, dtype=dtype)
    if sys.platform.startswith("linux") and tensor.nbytes >= 2 * HUGE_PAGE:
        start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the whole huge pages inside the tensor
        end = (tensor.data_ptr() + tensor.nbytes) // HUGE_PAGE * HUGE_PAGE
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)  # advice: may be refused
    return tensor


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """A float (N, K) weight in the stored format: {"qweight", "scale"} and for int4 "minimum".

    Works through blocks of rows, so a memory-mapped weight is read once and
    only one block at a time is ever widened to float32.
    """
    check_format(bits, group_size)
    rows, in_features = weight.shape
    if bits == 8:
        out = {"qweight": _empty_on_huge_pages(rows, in_features, dtype=torch.int8),
               "scale": _empty_on_huge_pages(rows, dtype=torch.float32)}
    else:
        check_padding(in_features, group_size)
        groups = padded(in_features, group_size) // group_size
        out = {"qweight": _empty_on_huge_pages(rows, groups * group_size // 2, dtype=torch.uint8),
               "scale": _empty_on_huge_pages(rows, groups, dtype=torch.float16),
               "minimum": _empty_on_huge_pages(rows, groups, dtype=torch.float16)}
    for block in _row_chunks(rows, in_features):
        w = weight[block].detach().to("cpu", torch.float32)
        parts = _quantize_int8(w) if bits == 8 else _quantize_int4(w, group_size)
        for tensor, part in zip(out.values(), parts):
            tensor[block] = part
    return out


# Modules -----------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored quantized; the bias stays in the float dtype."""

    bits: int
    FORMAT: tuple[str, ...]  # the buffers that hold W, in their fixed dtypes

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None, device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # The dtype of the float parts: the bias, and the rows an embedding returns.
        self.dtype = dtype or torch.get_default_dtype()
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=self.dtype, device=device), requires_grad=False)
            if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + b on the dequantized weight, a block of output rows at a time, in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        blocks = list(_row_chunks(self.out_features, self.in_features))
        if len(blocks) == 1:
            return F.linear(x, self.dequantize(slice(None), x.dtype), bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for block in blocks:
            out[..., block] = F.linear(x, self.dequantize(block, x.dtype), None if bias is None else bias[block])
        return out

    def dequantize(self, rows, dtype: torch.dtype) -> torch.Tensor:
        """The weight's rows `rows` (a slice or a tensor of indices) in `dtype`: (..., K)."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # .to(dtype), .half() and the like change the float parts only: the
        # stored formats keep their dtypes (the kernels need them) and follow
        # the device.
        formats = {name: self._buffers.pop(name) for name in self.FORMAT}
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty(0, dtype=self.dtype, device=formats["qweight"].device))
        finally:
            for name, tensor in formats.items():
                self._buffers[name] = tensor
        self.dtype = probe.dtype
        for name, tensor in formats.items():
            if tensor.device != probe.device:
                self._buffers[name] = (
                    torch.empty_like(tensor, device=probe.device) if tensor.is_meta else tensor.to(probe.device)
                )
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """int8 weights, one float32 scale per output row."""

    bits = 8
    FORMAT = ("qweight", "scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))

    def dequantize(self, rows, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight[rows].float() * self.scale[rows, None]).to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bits=8"


class Int4Linear(QuantizedLinear):
    """4-bit weights, float16 scale and minimum per group of inputs of each output row."""

    bits = 4
    FORMAT = ("qweight", "scale", "minimum")

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group_size: int = DEFAULT_GROUP_SIZE,
        dtype=None, device=None,
    ):
        check_format(4, group_size)
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        self.padded_features = padded(in_features, group_size)
        groups = self.padded_features // group_size
        self.register_buffer(
            "qweight", torch.empty(out_features, self.padded_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("minimum", torch.empty(out_features, groups, dtype=torch.float16, device=device))

    def dequantize(self, rows, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_int4(self.qweight[rows]).unflatten(-1, (-1, self.group_size)).float()  # (..., Kp/G, G)
        w = q * self.scale[rows].float()[..., None] + self.minimum[rows].float()[..., None]
        return w.flatten(-2)[..., : self.in_features].to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits=4, group_size={self.group_size}"


class QuantizedEmbedding:
    """The token embedding, quantized, still the tied output layer: rows of W, and hidden @ W^T.

    The vocabulary is the output dimension (N) and the width the input (K).
    """

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dequantize(tokens, self.dtype)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.product(hidden)


class Int8Embedding(QuantizedEmbedding, Int8Linear):
    pass


class Int4Embedding(QuantizedEmbedding, Int4Linear):
    pass


# Whole models ------------------------------------------------------------------


def quantizable(model: Griffin) -> list[str]:
    """Names of the float modules `quantize_model` replaces: the matrices of the model's weight table."""
    return [name for name in linear_paths(model.config) if isinstance(model.get_submodule(name), (Linear, Embedding))]


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def _shell(module: nn.Module, bits: int, group_size: int | None) -> QuantizedLinear:
    """An empty quantized module on the meta device, of the shape and kind of `module`."""
    options = {"dtype": module.weight.dtype, "device": "meta"}
    if isinstance(module, Embedding):
        shape = (module.embedding_dim, module.num_embeddings, False)
        return Int8Embedding(*shape, **options) if bits == 8 else Int4Embedding(*shape, group_size, **options)
    shape = (module.in_features, module.out_features, module.bias is not None)
    return Int8Linear(*shape, **options) if bits == 8 else Int4Linear(*shape, group_size, **options)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_model(model: Griffin, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> Griffin:
    """Replace, in place, the embedding and every linear of the blocks by quantized ones; returns `model`.

    All or nothing: if one weight cannot be stored, the model is left as it
    was, so the quantized weights exist beside the float ones until the end.
    `load_model(path, quantize=...)` needs only the quantized size and one
    float tensor. On the meta device the replacements are left empty, ready
    for load_state_dict(assign=True). `group_size` applies to int4 only.
    """
    check_format(bits, group_size)
    if quantized_modules(model):
        raise ValueError("the model is already quantized; quantize its float original instead")
    replacements = {}
    for name in quantizable(model):
        module = model.get_submodule(name)
        shell = replacements[name] = _shell(module, bits, group_size)
        if module.weight.is_meta:
            continue
        try:
            stored = quantize_weight(module.weight, bits, group_size)
        except ValueError as error:
            raise ValueError(f"{name} cannot be stored in {bits} bits: its weight {error}") from error
        for part, tensor in stored.items():
            setattr(shell, part, tensor.to(module.weight.device))
        if shell.bias is not None:
            shell.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    for name, shell in replacements.items():
        _replace(model, name, shell)
    return model


def format_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """State-dict names of the quantized formats' tensors, with the dtypes they must have."""
    return {
        f"{name}.{part}": getattr(module, part).dtype
        for name, module in quantized_modules(model).items() for part in module.FORMAT
    }


def parameter_count(model: nn.Module) -> int:
    """Parameters of the float model: a quantized weight counts its N x K entries."""
    quantized = sum(m.in_features * m.out_features for m in quantized_modules(model).values())
    return quantized + sum(p.numel() for p in model.parameters())


# Metadata ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Quantization:
    """A checkpoint's "quantization" record: its format and the modules stored in it.

    As JSON (in config.json and in every safetensors header):
    {"bits": 4, "group_size": 64, "modules": ["model.embed_tokens", ...]},
    group_size null for int8. Every module listed is stored in `bits` bits;
    every other tensor is float.
    """

    bits: int
    group_size: int | None
    modules: tuple[str, ...]  # our module names

    @classmethod
    def of(cls, model: nn.Module) -> Quantization | None:
        """The record of a quantized model; None for a float one."""
        modules = quantized_modules(model)
        if not modules:
            return None
        formats = {(m.bits, getattr(m, "group_size", None)) for m in modules.values()}
        if len(formats) != 1:
            raise ValueError(f"the model mixes quantization formats {sorted(formats)}; a checkpoint holds one")
        (bits, group_size), = formats
        return cls(bits, group_size, tuple(modules))

    def to_json(self, prefix: str = "") -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "modules": [prefix + m for m in self.modules]}

    @classmethod
    def from_json(cls, value, prefix: str = "") -> Quantization:
        """Parse and check a record; errors name the field at fault."""
        if not isinstance(value, dict):
            raise ValueError(f"quantization must be an object, got {type(value).__name__}")
        unknown = sorted(set(value) - {"bits", "group_size", "modules"})
        if unknown:
            raise ValueError(f"quantization has unknown fields {unknown}; expected bits, group_size, modules")
        bits = value.get("bits")
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"quantization.bits must be 8 or 4, got {bits!r}")
        group_size = value.get("group_size")
        if bits == 4:
            try:
                check_format(4, group_size)
            except ValueError:
                raise ValueError(
                    f"quantization.group_size must be a positive multiple of {INT4_BLOCK} for int4, got {group_size!r}"
                ) from None
        elif group_size is not None:
            raise ValueError(f"quantization.group_size must be null for int8 (one scale per row), got {group_size!r}")
        modules = value.get("modules")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise ValueError("quantization.modules must be a non-empty list of module names")
        if len(set(modules)) != len(modules):
            raise ValueError("quantization.modules lists a module twice")
        foreign = [m for m in modules if not m.startswith(prefix)]
        if foreign:
            raise ValueError(f"quantization.modules names {foreign[0]}, which lacks the tensors' prefix {prefix!r}")
        return cls(bits, group_size, tuple(m.removeprefix(prefix) for m in modules))

    def apply(self, model: Griffin) -> None:
        """Swap the recorded modules of a (meta) float model for empty quantized ones."""
        allowed = set(quantizable(model))
        for name in self.modules:
            if name not in allowed:
                raise ValueError(
                    f"quantization.modules names {name}, which is not a quantizable module of this model "
                    "(the embedding or a linear of a block)"
                )
            _replace(model, name, _shell(model.get_submodule(name), self.bits, self.group_size))
