"""The Griffin network (RecurrentGemma): RG-LRU recurrences and local multi-query attention.

Griffin paper: arXiv 2402.19427; RecurrentGemma report: arXiv 2404.07839.

Shapes: B batch, T time, D width, L lru width, H heads, K head dim, W window,
V vocabulary, M MLP width per branch.

Positions give each token's position in its document: position 0 starts a
new document (the state is reset, and neither the convolution nor attention
looks across it); position -1 marks left padding, which leaves the state and
every real token's output unchanged.

The state passed to a forward call is updated in place and returned (the
rule in rgemma/state.py); use `state.clone()` to keep a snapshot.

This file is plain PyTorch and knows no speed path: `rgemma.backends`
rewrites a model from outside for its device (native kernels, compute dtype,
CUDA graphs), and finds the weights it needs through the table below.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rgemma.config import ATTENTION, RECURRENT, Config
from rgemma.scan import linear_scan
from rgemma.state import AttentionState, RecurrentState, State

# Queries are processed in blocks of this many, so attention memory is
# O(T x W), never O(T^2).
ATTENTION_QUERY_BLOCK = 512
# Long inputs to `prefill` are read in chunks of this many tokens, by device
# type: enough rows for an efficient GEMM, few enough that a chunk's
# activations stay small beside the weights (CPUs have less memory to spare;
# a GPU needs larger GEMMs to be busy). docs/PERFORMANCE.md has the figures.
PREFILL_CHUNKS = {"cpu": 512, "cuda": 2048}

# The weight table: each residual block's parts by role, as module paths inside
# the block, in the order the native decode step takes them. Checkpoint
# formats, quantization, the training decay groups and the backends all find
# weights through it, so a module renamed here is renamed everywhere.
EMBEDDING = "embed_tokens"  # also the tied output layer
FINAL_NORM = "final_norm"
NORMS = ("temporal_pre_norm", "channel_pre_norm")
TEMPORAL_LINEARS = {
    RECURRENT: ("temporal_block.linear_y", "temporal_block.linear_x", "temporal_block.linear_out"),
    ATTENTION: ("temporal_block.q_proj", "temporal_block.k_proj", "temporal_block.v_proj", "temporal_block.o_proj"),
}
MLP_LINEARS = ("mlp_block.gate_proj", "mlp_block.up_proj", "mlp_block.down_proj")
CONV = "temporal_block.conv_1d"
RG_LRU = "temporal_block.rg_lru"
RG_LRU_GATES = ("input_gate_weight", "recurrent_gate_weight")  # the RG-LRU's block-diagonal gate matrices


def block_linears(block_type: str) -> tuple[str, ...]:
    """The paths of a block's matrices (temporal, then MLP), in the table's order."""
    return TEMPORAL_LINEARS[block_type] + MLP_LINEARS


def linear_paths(config: Config) -> list[str]:
    """Model paths of every matrix: the embedding and each block's linears (what quantization stores)."""
    blocks = enumerate(config.block_types)
    return [EMBEDDING] + [f"layers.{i}.{path}" for i, kind in blocks for path in block_linears(kind)]


# Gradient of sqrt is clipped at this value (bf16 training stability).
MAX_SQRT_GRADIENT = 1000.0


def prefill_chunk(device: torch.device | str) -> int:
    """How many tokens `Griffin.prefill` reads at a time on this device."""
    return PREFILL_CHUNKS.get(torch.device(device).type, PREFILL_CHUNKS["cpu"])


@dataclasses.dataclass
class TokenLayout:
    """Where documents start and where padding is, computed once per forward call."""

    positions: torch.Tensor  # (B, T) int64, -1 for left padding
    is_pad: torch.Tensor  # (B, T) bool
    segment: torch.Tensor  # (B, T) document starts so far; 0 = the state's own document
    num_pad: torch.Tensor  # (B,)
    max_pad: int
    first_position: int  # the smallest position of a real token: 0 if a document starts here
    has_history: bool  # the state holds earlier tokens (else attention can skip it)

    @classmethod
    def of(cls, positions: torch.Tensor, has_history: bool) -> TokenLayout:
        is_pad = positions < 0
        num_pad = is_pad.sum(dim=1)
        first = positions.masked_fill(is_pad, torch.iinfo(positions.dtype).max).min()
        max_pad, first_position = torch.stack([num_pad.max(), first]).tolist()  # one device sync
        return cls(
            positions=positions,
            is_pad=is_pad,
            segment=torch.cumsum(positions == 0, dim=1),
            num_pad=num_pad,
            max_pad=max_pad,
            first_position=first_position,
            has_history=has_history,
        )

    @classmethod
    def of_step(cls, positions: torch.Tensor) -> TokenLayout:
        """One real token per row after the state's history (decoding), read without a device sync.

        A row may start a document here (position 0), so the reset masks are
        kept; none is padding.
        """
        return cls(
            positions=positions,
            is_pad=torch.zeros_like(positions, dtype=torch.bool),
            segment=(positions == 0).long(),
            num_pad=torch.zeros_like(positions[:, 0]),
            max_pad=0,
            first_position=0,
            has_history=True,
        )


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + scale), computed in float32; the scale is stored zero-centred."""

    def __init__(self, width: int, eps: float, **factory):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(width, **factory))

    def reset_parameters(self):
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm's steps written out: square in place of its pow, and the scale applied in place (a third
        # fewer passes over a float32 copy of x, the same values).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return normed.mul_(1.0 + self.weight.float()).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear computing in the activations' dtype, which may be wider than the weights'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Embedding(nn.Embedding):
    """Token embedding that also serves as the tied output layer."""

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight.to(hidden.dtype))


def _normal_(weight: torch.Tensor, variance_scale: float, fan_in: int):
    nn.init.normal_(weight, mean=0.0, std=math.sqrt(variance_scale / fan_in))


def _init_linear(linear: Linear, variance_scale: float = 1.0):
    _normal_(linear.weight, variance_scale, linear.in_features)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class MLP(nn.Module):
    """Gated GeLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: Config, **factory):
        super().__init__()
        self.gate_proj = Linear(config.width, config.mlp_width, **factory)
        self.up_proj = Linear(config.width, config.mlp_width, **factory)
        self.down_proj = Linear(config.mlp_width, config.width, **factory)

    def reset_parameters(self, final_variance_scale: float):
        _init_linear(self.gate_proj)
        _init_linear(self.up_proj)
        _init_linear(self.down_proj, final_variance_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Conv1D(nn.Module):
    """Depthwise causal convolution over time whose taps never cross a document start.

    Weight layout (L, 1, conv_width) as torch's Conv1d: weight[:, 0, -1]
    multiplies the current input, weight[:, 0, -1 - j] the input j steps back.
    """

    def __init__(self, width: int, conv_width: int, **factory):
        super().__init__()
        self.conv_width = conv_width
        self.weight = nn.Parameter(torch.empty(width, 1, conv_width, **factory))
        self.bias = nn.Parameter(torch.empty(width, **factory))

    def reset_parameters(self):
        _normal_(self.weight, 0.01, self.conv_width)
        nn.init.zeros_(self.bias)

    def forward(
        self, x: torch.Tensor, layout: TokenLayout, taps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, L), taps (B, C, L) -> output (B, T, L), the last C inputs (B, C, L)."""
        num_taps = self.conv_width - 1
        length = x.shape[1]
        history = torch.cat([taps.to(x.dtype), x], dim=1)  # (B, C + T, L)
        if layout.max_pad:
            # Drop each row's left padding so that its first real token reads the taps.
            index = torch.arange(num_taps + length, device=x.device)[None]
            shift = layout.num_pad[:, None]
            index = torch.where(index < shift + num_taps, index - shift, index).clamp(min=0)
            history = history.gather(1, index[..., None].expand(-1, -1, x.shape[2]))
        weight = self.weight.to(x.dtype)[:, 0].T.contiguous()  # (C + 1, L): one contiguous row per tap
        masked = layout.max_pad or layout.first_position < num_taps
        # One multiply-add per tap, each over (B, T, L): no (B, T, L, C + 1) windows of all taps at once, and
        # few passes (the first adds to the bias, so the output is written once and then updated in place).
        out = self.bias.to(x.dtype)
        for back in range(num_taps + 1):
            inputs = history[:, num_taps - back : num_taps - back + length]  # (B, T, L), `back` steps behind
            if masked:  # a tap `back` steps behind a token at document position p exists only if p >= back
                inputs = inputs.masked_fill((layout.positions < back)[..., None], 0.0)
            tap = weight[num_taps - back]  # (L,)
            out = torch.addcmul(out, inputs, tap) if back == 0 else out.addcmul_(inputs, tap)
        return out, history[:, -num_taps:]  # a view: the caller copies it into the state


class _SqrtClippedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # d sqrt(x)/dx = 1 / (2 sqrt(x)), clipped at MAX_SQRT_GRADIENT.
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / MAX_SQRT_GRADIENT**2))


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit (Griffin paper, eq. 1-4), c = 8.

    The gates are block-diagonal linears (one block per head) of the input
    only. Everything from the gates to the recurrence runs in float32.
    """

    def __init__(self, width: int, num_heads: int, **factory):
        super().__init__()
        self.num_heads = num_heads
        block = width // num_heads
        self.recurrent_param = nn.Parameter(torch.empty(width, **factory))
        self.input_gate_weight = nn.Parameter(torch.empty(num_heads, block, block, **factory))
        self.input_gate_bias = nn.Parameter(torch.empty(num_heads, block, **factory))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(num_heads, block, block, **factory))
        self.recurrent_gate_bias = nn.Parameter(torch.empty(num_heads, block, **factory))

    def reset_parameters(self):
        block = self.input_gate_weight.shape[-1]
        for weight, bias in (
            (self.input_gate_weight, self.input_gate_bias),
            (self.recurrent_gate_weight, self.recurrent_gate_bias),
        ):
            _normal_(weight, 1.0, block)
            nn.init.zeros_(bias)
        # softplus(param) = -log(radius), so a_t = radius^(8 r_t), with radius^2
        # uniform in [0.9^2, 0.999^2]: long memories from the start.
        with torch.no_grad():
            radius_sq = torch.empty_like(self.recurrent_param, dtype=torch.float32).uniform_(0.9**2 + 1e-8, 0.999**2 + 1e-8)
            log_radius = 0.5 * torch.log(radius_sq)
            # softplus(param) = -log(radius)  <=>  param = log(1/radius - 1)
            self.recurrent_param.copy_(torch.log(torch.expm1(-log_radius)))

    def gate_product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (B, T, L) times a block-diagonal gate weight (H, L/H, L/H) -> (B, T, L), before the bias."""
        batch, length, width = x.shape
        heads = x.view(batch, length, self.num_heads, -1)  # (B, T, H, L/H)
        return torch.einsum("bthi,hij->bthj", heads, weight.to(x.dtype)).reshape(batch, length, width)

    def _gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.gate_product(x, weight) + bias.to(x.dtype).flatten()).float())  # bias (H, L/H)

    def forward(
        self, x: torch.Tensor, layout: TokenLayout, h0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, L), h0 (B, L) float32 -> y (B, T, L), last state (B, L) float32."""
        input_gate = self._gate(x, self.input_gate_weight, self.input_gate_bias)
        recurrence_gate = self._gate(x, self.recurrent_gate_weight, self.recurrent_gate_bias)
        log_a = -8.0 * recurrence_gate * F.softplus(self.recurrent_param.float())
        a = torch.exp(log_a)
        # sqrt(1 - a^2) normalises the input; -expm1 keeps precision when a -> 1.
        one_minus_a_sq = -torch.expm1(2.0 * log_a)
        multiplier = _SqrtClippedGradient.apply(one_minus_a_sq) if log_a.requires_grad else one_minus_a_sq.sqrt()
        if layout.first_position == 0:  # at a document start the state is dropped and the input passes whole
            reset = (layout.positions == 0)[..., None]
            a = a.masked_fill(reset, 0.0)
            multiplier = multiplier.masked_fill(reset, 1.0)
        u = x.float() * input_gate * multiplier
        if layout.max_pad:  # padding carries the state through unchanged
            pad = layout.is_pad[..., None]
            a = a.masked_fill(pad, 1.0)
            u = u.masked_fill(pad, 0.0)
        h, h_last = linear_scan(a, u, h0)
        return h.to(x.dtype), h_last


class RecurrentBlock(nn.Module):
    """out = linear_out(RG-LRU(conv(linear_x(x))) * gelu_tanh(linear_y(x)))."""

    def __init__(self, config: Config, **factory):
        super().__init__()
        self.linear_y = Linear(config.width, config.lru_width, **factory)
        self.linear_x = Linear(config.width, config.lru_width, **factory)
        self.linear_out = Linear(config.lru_width, config.width, **factory)
        self.conv_1d = Conv1D(config.lru_width, config.conv_width, **factory)
        self.rg_lru = RGLRU(config.lru_width, config.num_heads, **factory)

    def reset_parameters(self, final_variance_scale: float):
        _init_linear(self.linear_y)
        _init_linear(self.linear_x)
        _init_linear(self.linear_out, final_variance_scale)
        self.conv_1d.reset_parameters()
        self.rg_lru.reset_parameters()

    def forward(self, x: torch.Tensor, layout: TokenLayout, state: RecurrentState) -> torch.Tensor:
        y = F.gelu(self.linear_y(x), approximate="tanh")
        u, taps = self.conv_1d(self.linear_x(x), layout, state.conv)
        h0 = state.h.clone() if layout.has_history else None  # a copy: state.h is overwritten below
        u, h_last = self.rg_lru(u, layout, h0)
        state.conv.copy_(taps)
        state.h.copy_(h_last)
        return self.linear_out(u * y)


@functools.cache
def rope_frequencies(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """(K/4,) float32: how fast RoPE turns each pair (i, i + K/4) of the first half of a head."""
    rope_dim = head_dim // 2
    exponents = torch.arange(rope_dim // 2, device=device, dtype=torch.float32) * 2.0 / rope_dim
    return 1.0 / base**exponents


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding on the first half of the head dim only. x (B, T, N, K), positions (B, T)."""
    rope_dim = x.shape[-1] // 2
    half = rope_dim // 2
    inv_freq = rope_frequencies(x.shape[-1], base, x.device)  # (K/4,)
    angles = positions.clamp(min=0).float()[..., None, None] * inv_freq  # (B, T, 1, K/4)
    sin, cos = torch.sin(angles), torch.cos(angles)
    x32 = x.float()
    first, second, rest = x32[..., :half], x32[..., half:rope_dim], x32[..., rope_dim:]
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)
    return rotated.to(x.dtype)


class LocalAttention(nn.Module):
    """Multi-query attention over a sliding window: a query at position q sees keys q-W..q."""

    def __init__(self, config: Config, **factory):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.window = config.attention_window
        self.rope_base = config.rope_base
        self.q_proj = Linear(config.width, config.width, bias=False, **factory)
        self.k_proj = Linear(config.width, config.head_dim, bias=False, **factory)
        self.v_proj = Linear(config.width, config.head_dim, bias=False, **factory)
        self.o_proj = Linear(config.width, config.width, bias=True, **factory)

    def reset_parameters(self, final_variance_scale: float):
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _init_linear(proj)
        _init_linear(self.o_proj, final_variance_scale)

    def forward(self, x: torch.Tensor, layout: TokenLayout, state: AttentionState) -> torch.Tensor:
        batch, length, width = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, 1, self.head_dim)
        v = self.v_proj(x)  # (B, T, K)
        qk = apply_rope(torch.cat([q, k], dim=2), layout.positions, self.rope_base)  # (B, T, H + 1, K): one pass
        q, k = qk[:, :, :-1], qk[:, :, -1]  # (B, T, H, K), (B, T, K)
        # The keys a query may see: the state's (in ring order) when it holds a document, then this call's.
        # Their segments say whose document each is: 0 the state's, -1 an empty slot or padding, seen by no query.
        keys, values = k, v  # (B, S, K), S = T, or W + T with the state's
        key_pos, key_seg = layout.positions, layout.segment.masked_fill(layout.is_pad, -1)  # (B, S)
        if layout.has_history:
            keys = torch.cat([state.k.to(k.dtype), k], dim=1)
            values = torch.cat([state.v.to(v.dtype), v], dim=1)
            key_pos = torch.cat([state.pos, key_pos], dim=1)
            key_seg = torch.cat([torch.where(state.pos >= 0, 0, -1), key_seg], dim=1)
        out = torch.cat(
            [self._attend_block(q, keys, values, key_pos, key_seg, start, layout)
             for start in range(0, length, ATTENTION_QUERY_BLOCK)],
            dim=1,
        )  # (B, T, H, K)
        self._remember(k, v, layout, state)
        return self.o_proj(out.reshape(batch, length, width))

    def _attend_block(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_pos: torch.Tensor,
        key_seg: torch.Tensor, start: int, layout: TokenLayout,
    ) -> torch.Tensor:
        """Queries start:start+block against the keys they may see. Returns (B, block, H, K)."""
        end = min(start + ATTENTION_QUERY_BLOCK, q.shape[1])
        cached = keys.shape[1] - q.shape[1]  # the state's keys, before this call's
        # Within one document, index distance equals position distance, so no key of this call more than W
        # indices (plus left padding) back is visible, and the state's keys only while queries may be that close.
        first = max(0, start - self.window - layout.max_pad)
        keys_seen = slice(0 if first == 0 else cached + first, cached + end)
        q_pos = layout.positions[:, start:end, None]  # (B, Q, 1)
        distance = q_pos - key_pos[:, None, keys_seen]  # (B, Q, S)
        visible = (layout.segment[:, start:end, None] == key_seg[:, None, keys_seen]) & (distance >= 0)
        visible &= distance <= self.window
        visible |= layout.is_pad[:, start:end, None]  # padding queries see everything: finite (unused) outputs
        out = F.scaled_dot_product_attention(
            q[:, start:end].transpose(1, 2),  # (B, H, Q, K)
            keys[:, None, keys_seen],  # (B, 1, S, K)
            values[:, None, keys_seen],
            attn_mask=visible[:, None],  # (B, 1, Q, S)
            scale=self.head_dim**-0.5,
            enable_gqa=True,
        )
        return out.transpose(1, 2)

    def _remember(self, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, state: AttentionState):
        """Write the last W keys of each row's current document into its ring buffer."""
        positions = layout.positions
        started = (positions == 0).any(dim=1)  # a new document: forget the old one
        state.pos.masked_fill_(started[:, None], -1)
        if positions.shape[1] == 1:  # one token per row: a scatter, with no device sync
            slot = (positions % self.window)[..., None]  # (B, 1, 1)
            real = positions[..., None] >= 0  # (B, 1, 1); padding leaves its slot as it was
            for buffer, new in ((state.k, k), (state.v, v)):
                index = slot.expand(-1, -1, buffer.shape[2])
                buffer.scatter_(1, index, torch.where(real, new.to(buffer.dtype), buffer.gather(1, index)))
            state.pos.scatter_(1, slot[..., 0], torch.where(real[..., 0], positions, state.pos.gather(1, slot[..., 0])))
            return
        last = positions[:, -1:]
        keep = (layout.segment == layout.segment[:, -1:]) & (positions >= 0) & (positions > last - self.window)
        rows, cols = keep.nonzero(as_tuple=True)
        slots = positions[rows, cols] % self.window
        state.k[rows, slots] = k[rows, cols].to(state.k.dtype)
        state.v[rows, slots] = v[rows, cols].to(state.v.dtype)
        state.pos[rows, slots] = positions[rows, cols]


class ResidualBlock(nn.Module):
    """x += temporal(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: Config, block_type: str, **factory):
        super().__init__()
        self.temporal_pre_norm = RMSNorm(config.width, config.norm_eps, **factory)
        temporal = RecurrentBlock if block_type == RECURRENT else LocalAttention
        self.temporal_block = temporal(config, **factory)
        self.channel_pre_norm = RMSNorm(config.width, config.norm_eps, **factory)
        self.mlp_block = MLP(config, **factory)

    def reset_parameters(self, final_variance_scale: float):
        self.temporal_pre_norm.reset_parameters()
        self.temporal_block.reset_parameters(final_variance_scale)
        self.channel_pre_norm.reset_parameters()
        self.mlp_block.reset_parameters(final_variance_scale)

    def forward(self, x: torch.Tensor, layout: TokenLayout, state) -> torch.Tensor:
        x = x + self.temporal_block(self.temporal_pre_norm(x), layout, state)
        return x + self.mlp_block(self.channel_pre_norm(x))


class Griffin(nn.Module):
    def __init__(self, config: Config, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        factory = {"dtype": dtype, "device": device}
        self.embed_tokens = Embedding(config.vocab_size, config.width, **factory)
        self.layers = nn.ModuleList(ResidualBlock(config, block_type, **factory) for block_type in config.block_types)
        self.final_norm = RMSNorm(config.width, config.norm_eps, **factory)
        self._activation_dtype: torch.dtype | None = None
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        """The official initialisation: fan-in scaled normals, zero biases and norms."""
        _normal_(self.embed_tokens.weight, 1.0, self.config.width)
        for layer in self.layers:
            layer.reset_parameters(self.config.final_init_variance_scale)
        self.final_norm.reset_parameters()

    # The float parameters' dtype and device, read from a norm, which no
    # quantization replaces.
    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype activations are computed in: the weights' unless set wider (bf16 weights computing in
        float32 where the device has no fast bf16 arithmetic; `rgemma.backends` decides)."""
        return self._activation_dtype or self.dtype

    @activation_dtype.setter
    def activation_dtype(self, dtype: torch.dtype | None) -> None:
        self._activation_dtype = dtype

    def init_state(self, batch_size: int) -> State:
        return State.zeros(self.config, batch_size, dtype=self.activation_dtype, device=self.device)

    def _positions(self, tokens: torch.Tensor, positions: torch.Tensor | None, state: State | None) -> torch.Tensor:
        batch, length = tokens.shape
        if positions is None:
            start = torch.zeros(batch, dtype=torch.int64, device=tokens.device) if state is None else state.position
            return start[:, None] + torch.arange(length, device=tokens.device)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} differs from tokens shape {tuple(tokens.shape)}")
        return positions.to(device=tokens.device, dtype=torch.int64)

    def hidden_states(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """tokens (B, T) -> final-normed hidden states (B, T, D), updated state."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must hold at least one row and one token, got shape {tuple(tokens.shape)}")
        if state is not None and state.batch_size != tokens.shape[0]:
            raise ValueError(f"state has {state.batch_size} rows but tokens have {tokens.shape[0]}")
        positions = self._positions(tokens, positions, state)
        layout = TokenLayout.of(positions, has_history=state is not None)
        if state is None:
            state = self.init_state(tokens.shape[0])
        hidden = self._run_layers(tokens, layout, state)
        last = positions[:, -1]
        state.position.copy_(torch.where(last >= 0, last + 1, state.position))
        return hidden, state

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) -> scaled embeddings (..., D) in the activation dtype."""
        try:
            rows = self.embed_tokens(tokens)
        except IndexError:  # the lookup's own error names no vocabulary
            raise ValueError(f"tokens hold ids outside the model's vocabulary [0, {self.config.vocab_size})") from None
        return rows.to(self.activation_dtype) * self.config.embedding_scale

    def _run_layers(self, tokens: torch.Tensor, layout: TokenLayout, state: State) -> torch.Tensor:
        x = self.embed(tokens)
        for layer, layer_state in zip(self.layers, state.layers):
            x = layer(x, layout, layer_state)
        return self.final_norm(x)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: State) -> torch.Tensor:
        """Read one token per row at the row's next position: tokens (B, 1) -> next logits (B, V) float32.

        The same result as `forward(tokens, state=state)`, but nothing is read
        back from the device, so the step can be captured in a CUDA graph
        (`rgemma/backends/cuda.py`). The state is updated in place.
        """
        if tokens.shape != (state.batch_size, 1):
            raise ValueError(f"a step reads tokens of shape ({state.batch_size}, 1), got {tuple(tokens.shape)}")
        positions = state.position[:, None]  # (B, 1)
        hidden = self._run_layers(tokens, TokenLayout.of_step(positions), state)
        state.position.add_(1)
        return self.logits(hidden[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output embedding with soft-capping; float32 logits (..., V)."""
        logits = self.embed_tokens.unembed(hidden).float()
        cap = self.config.logits_soft_cap
        if not cap:
            return logits
        if logits.requires_grad:
            return torch.tanh(logits / cap) * cap
        return logits.div_(cap).tanh_().mul_(cap)  # in place: (T, V) logits are the largest tensor

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, state: State | None = None,
        *, hidden_only: bool = False,
    ) -> tuple[torch.Tensor, State]:
        """tokens (B, T) -> logits (B, T, V) float32, updated state.

        With `hidden_only`, the final-normed hidden states (B, T, D) that the
        tied output layer reads instead of the logits: training computes its
        loss from them a chunk at a time, never holding (B, T, V) logits, and
        still calls the model (so DDP/FSDP hooks run).
        """
        hidden, state = self.hidden_states(tokens, positions, state)
        return (hidden if hidden_only else self.logits(hidden)), state

    @torch.no_grad()
    def prefill(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        state: State | None = None,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Read a prompt of any length in chunks; return the last position's logits (B, V) and the state.

        Memory stays at the state plus one chunk's activations (chunks of
        `prefill_chunk(device)` tokens by default), and only the last position
        pays for the vocabulary projection. `progress` is told how many tokens
        each chunk read.
        """
        chunk_size = chunk_size or prefill_chunk(self.device)
        positions = self._positions(tokens, positions, state)
        hidden = None
        for start in range(0, tokens.shape[1], chunk_size):
            chunk = slice(start, start + chunk_size)
            hidden, state = self.hidden_states(tokens[:, chunk], positions[:, chunk], state)
            if progress is not None:
                progress(hidden.shape[1])
        return self.logits(hidden[:, -1]), state
