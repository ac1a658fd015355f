"""The CPU backend: native decode kernels, the prefill GEMM's dtype, and a decode step in one native call.

Decoding multiplies every weight matrix by one vector per sequence, so it is
bound by memory bandwidth; torch's CPU matrix-vector products (bf16 above all,
on CPUs without native bf16) run well below it. So products of at most
MAX_KERNEL_ROWS rows go to our kernels (csrc/cpu_kernels.cpp), which read
each weight once for all rows.

Prefill multiplies whole chunks of tokens, where torch's GEMM is the right
kernel. Where the CPU has no native bf16 arithmetic a bf16 GEMM runs several
times slower than float32, so there bf16 models keep their weights but
compute in float32, widening weights a slice of rows at a time.

A decode step of a model whose parts are all of kinds the native Decoder
knows is one native call, from the embedding to the soft-capped logits: the
Python and dispatch costs of several hundred torch operations were a
quarter of a step. The Decoder takes the model's tensors by position, in the
order of the model's weight table (rgemma/model.py); a module of another kind
(an adapter around a linear, say) sends the step down the plain path, which
runs the modules' own forward. The Decoder serves a model whatever dtype its
prefill computes in: it computes in float32 and reads float32 or bf16
attention rings.

The kernels come in instruction-set levels (native.py): a model's native
modules are of kinds made for one level (`level`, a class attribute, so that
copies and state dicts see nothing new), the level the backend was prepared
with.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from rgemma.backends.base import Backend, Options
from rgemma.backends.native import kernels
from rgemma.model import (
    CONV, EMBEDDING, FINAL_NORM, NORMS, RG_LRU, RECURRENT, Conv1D, Embedding, Griffin, Linear, RGLRU, RMSNorm,
    block_linears, rope_frequencies,
)
from rgemma.quantize import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear
from rgemma.state import State

# Up to this many rows (tokens across the batch) a product is decode-sized.
MAX_KERNEL_ROWS = 16
# A weight widened to the activations' dtype is widened this many bytes at a time.
WIDEN_BYTES = 64 * 2**20
# The int8 kernel reads rows in blocks of this many inputs.
INT8_KERNEL_BLOCK = 32
KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16)


def _decode_sized(x: torch.Tensor) -> bool:
    """At most MAX_KERNEL_ROWS rows, and no gradient wanted: the native kernels' case."""
    return x.numel() <= MAX_KERNEL_ROWS * x.shape[-1] and not (torch.is_grad_enabled() and x.requires_grad)


def _rows_float32(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> contiguous float32 (rows, K), the kernels' input."""
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's float32 (rows, N) -> x's leading shape and dtype, with the bias."""
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


def _float_format(weight: torch.Tensor) -> bool:
    """A float weight laid out as the kernels read it."""
    return weight.dtype in KERNEL_FLOAT_DTYPES and weight.is_contiguous()


def _float_weight_readable(weight: torch.Tensor) -> bool:
    """The kernels can compute a product with this weight now: no gradient is wanted for it."""
    return _float_format(weight) and not (weight.requires_grad and torch.is_grad_enabled())


def widening_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a weight stored narrower than x, widened WIDEN_BYTES at a time.

    A product never holds a widened copy of more than WIDEN_BYTES of weights
    (the 2b embedding widened whole to float32 would be 2.6 GB).
    """
    bias = None if bias is None else bias.to(x.dtype)
    rows_per_slice = max(1, WIDEN_BYTES // (weight.shape[1] * x.element_size()))
    if weight.dtype == x.dtype or weight.shape[0] <= rows_per_slice:
        return F.linear(x, weight.to(x.dtype), bias)
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, weight.shape[0], rows_per_slice):
        rows = slice(start, start + rows_per_slice)
        y[..., rows] = F.linear(x, weight[rows].to(x.dtype), None if bias is None else bias[rows])
    return y


class NativeLinear(Linear):
    """A Linear whose decode-sized products run in the native kernel, and whose others widen weights by slices."""

    level: str | None = None  # the kernels' level; None: the process's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _decode_sized(x) and _float_weight_readable(self.weight):
            return _finish(kernels(self.level).float_linear(_rows_float32(x), self.weight), x, self.bias)
        return widening_linear(x, self.weight, self.bias)


class NativeEmbedding(Embedding):
    """The embedding, whose output layer's products go as NativeLinear's do."""

    level: str | None = None

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        if _decode_sized(hidden) and _float_weight_readable(self.weight):
            return _finish(kernels(self.level).float_linear(_rows_float32(hidden), self.weight), hidden, None)
        return widening_linear(hidden, self.weight, None)


class _NativeQuantized:
    """Mixin for quantized modules: decode-sized products in the integer kernels, others dequantized."""

    level: str | None = None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if _decode_sized(x) and _quantized_readable(self):
            return _finish(_quantized_product(self, _rows_float32(x)), x, self.bias)
        return super().product(x)


def _quantized_readable(module: QuantizedLinear) -> bool:
    return module.bits == 4 or module.in_features % INT8_KERNEL_BLOCK == 0


def _quantized_product(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    if module.bits == 8:
        return kernels(module.level).int8_linear(x, module.qweight, module.scale)
    if module.padded_features != module.in_features:
        x = F.pad(x, (0, module.padded_features - module.in_features))  # zeros meet the weights' padding
    return kernels(module.level).int4_linear(x, module.qweight, module.scale, module.minimum, module.group_size)


class NativeRGLRU(RGLRU):
    """The RG-LRU whose prompts (several steps, no autograd) take one native pass for the element-wise steps and
    the recurrence; the gates' products stay with torch's batched GEMM."""

    level: str | None = None

    def forward(self, x: torch.Tensor, layout, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        trains = torch.is_grad_enabled() and (x.requires_grad or self.recurrent_param.requires_grad)
        if x.shape[1] == 1 or trains or kernels(self.level) is None:
            return super().forward(x, layout, h0)
        input_gate, recurrence_gate = (
            self.gate_product(x, weight).float() for weight in (self.input_gate_weight, self.recurrent_gate_weight)
        )
        h_last = x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32) if h0 is None else h0.float().clone()
        h = kernels(self.level).rglru_sequence(
            x.float().contiguous(), input_gate.contiguous(), recurrence_gate.contiguous(), self.input_gate_bias,
            self.recurrent_gate_bias, self.recurrent_param, layout.positions.contiguous(), h_last,
        )
        return h.to(x.dtype), h_last


# Each module kind and its native counterpart, which only changes how it computes.
NATIVE_KINDS: dict[type, type] = {Linear: NativeLinear, Embedding: NativeEmbedding, RGLRU: NativeRGLRU} | {
    kind: type(f"Native{kind.__name__}", (_NativeQuantized, kind), {})
    for kind in (Int8Linear, Int4Linear, Int8Embedding, Int4Embedding)
}
PLAIN_KINDS = {native: plain for plain, native in NATIVE_KINDS.items()}


@functools.cache
def native_kinds(level: str) -> dict[type, type]:
    """NATIVE_KINDS for one level of the kernels: subclasses that name it."""
    table = {plain: type(native.__name__, (native,), {"level": level}) for plain, native in NATIVE_KINDS.items()}
    PLAIN_KINDS.update({native: plain for plain, native in table.items()})
    return table


def _set_kinds(model: nn.Module, table: dict[type, type]) -> None:
    """Give each module of a kind in NATIVE_KINDS (or a native kind of one) the kind `table` maps it to, or its
    plain kind where `table` has none, in place.

    A native kind is a subclass that only overrides how products are
    computed: parameters, buffers and names stay, so checkpoints, state
    dicts and optimisers see the same model (torch.nn.utils.parametrize
    swaps classes the same way).
    """
    for module in model.modules():
        plain = PLAIN_KINDS.get(type(module), type(module))
        if plain in NATIVE_KINDS:
            module.__class__ = table.get(plain, plain)


# The Decoder's view of the model -------------------------------------------------


def _linear_parts(module: nn.Module) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
    """A linear module's tensors as the Decoder takes them: ([weight] | [qweight, scale] | [qweight, scale,
    minimum], bias), or None for a module it cannot read."""
    kind = PLAIN_KINDS.get(type(module), type(module))
    if kind in (Linear, Embedding):
        return ([module.weight], getattr(module, "bias", None)) if _float_format(module.weight) else None
    if kind in (Int8Linear, Int8Embedding) and _quantized_readable(module):
        return [module.qweight, module.scale], module.bias
    if kind in (Int4Linear, Int4Embedding):
        return [module.qweight, module.scale, module.minimum], module.bias
    return None


def _block_parts(layer: nn.Module, block_type: str) -> tuple | None:
    """One residual block for the Decoder: (recurrent, small tensors, linears), in the weight table's order.

    Small tensors: the two norms, then for a recurrent block the conv
    weight and bias and the RG-LRU's input gate weight and bias, recurrence
    gate weight and bias, and recurrent_param. None if a part is of a kind
    the Decoder does not compute.
    """
    norms = [layer.get_submodule(path) for path in NORMS]
    if any(type(norm) is not RMSNorm for norm in norms):
        return None
    small = [norm.weight for norm in norms]
    recurrent = block_type == RECURRENT
    if recurrent:
        conv, lru = layer.get_submodule(CONV), layer.get_submodule(RG_LRU)
        if type(conv) is not Conv1D or PLAIN_KINDS.get(type(lru), type(lru)) is not RGLRU:
            return None
        small += [conv.weight, conv.bias, lru.input_gate_weight, lru.input_gate_bias, lru.recurrent_gate_weight,
                  lru.recurrent_gate_bias, lru.recurrent_param]
    linears = [_linear_parts(layer.get_submodule(path)) for path in block_linears(block_type)]
    if any(parts is None for parts in linears):
        return None
    return recurrent, small, linears


def build_decoder(model: Griffin, layers: list[int] | None = None, head: bool = True, level: str | None = None):
    """The native Decoder of `level` (default: the process's) over the model's tensors (the given layers, default
    all; with the embedding and final norm if `head`), or None if the kernels are missing or a part is of a kind
    it does not compute."""
    if kernels(level) is None:
        return None
    config = model.config
    layers = range(len(model.layers)) if layers is None else layers
    blocks = [_block_parts(model.layers[i], config.block_types[i]) for i in layers]
    embedding = _linear_parts(model.get_submodule(EMBEDDING)) if head else None
    final_norm = model.get_submodule(FINAL_NORM)
    if any(b is None for b in blocks) or (head and (embedding is None or type(final_norm) is not RMSNorm)):
        return None
    return kernels(level).Decoder(
        blocks, config.norm_eps, rope_frequencies(config.head_dim, config.rope_base, model.device),
        embedding, final_norm.weight if head else None, config.embedding_scale, config.logits_soft_cap,
    )


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, model: Griffin, options: Options):
        super().__init__(model, options)
        narrow = model.dtype in (torch.bfloat16, torch.float16)
        model.activation_dtype = torch.float32 if narrow and not options.native_bf16 else None
        self.level = options.cpu_level
        self.native = bool(options.native_kernels and self.level and kernels(self.level) is not None)
        _set_kinds(model, native_kinds(self.level) if self.native else {})
        self._decoder = None
        self._modules: list[nn.Module] = []  # what the Decoder was built from, to notice a module replaced

    def _current_decoder(self):
        """The Decoder for the model as it is now: built again when a module was replaced, or a tensor changed in
        place or moved (it keeps float32 copies of the small ones); None for the plain path."""
        if not self.native:
            return None
        modules = list(self.model.modules())
        if len(modules) != len(self._modules) or any(a is not b for a, b in zip(modules, self._modules)):
            self._modules, self._decoder = modules, build_decoder(self.model, level=self.level)
        elif self._decoder is not None and not self._decoder.is_current():
            self._decoder = build_decoder(self.model, level=self.level)
        return self._decoder

    @property
    def decode_path(self) -> str:
        return "native" if self._current_decoder() is not None else "plain"

    def describe(self) -> dict[str, str]:
        return super().describe() | {"cpu_level": self.level if self.native else "none (plain PyTorch)"}

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        decoder = self._current_decoder()
        if decoder is not None:
            positions = state.position.contiguous()  # (B,)
            # None, with the state unchanged, if its tensors are not laid out as the Decoder updates them.
            logits = decoder.step(tokens[:, 0].contiguous(), positions, state.layer_tensors())
            if logits is not None:
                state.position.add_(1)
                return logits, state
        if not self.native:
            return super().step(tokens, state)
        # The plain path a group of at most MAX_KERNEL_ROWS rows at a time, over views of the state's rows:
        # every product is then decode-sized, so each row is computed by the same kernel whatever the batch.
        logits = []
        for start in range(0, tokens.shape[0], MAX_KERNEL_ROWS):
            rows = slice(start, start + MAX_KERNEL_ROWS)
            logits.append(super().step(tokens[rows], state.map(lambda t: t[rows]))[0])
        return torch.cat(logits), state
