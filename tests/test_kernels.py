"""The native CPU kernels, at every instruction-set level this CPU runs, against exact PyTorch mirrors of their
arithmetic.

The quantized kernels quantize each row of x to int8 in blocks (scale
max|x| / 127, round half to even), sum integer products per block, and apply
the scales per block; the mirrors below do the same in float64, so the only
difference left is the kernels' float32 accumulation order (about 1e-7 of the
output here). Leaving out the activation quantization would be off by about
1e-2, far outside the tolerance.
"""

import pytest
import torch
import torch.nn.functional as F

import rgemma
from rgemma.backends import cpu
from rgemma.backends import native as native_levels
from rgemma.backends.native import kernels
from rgemma.model import RMSNorm
from rgemma.quantize import pack_int4
from cpu_levels import LEVELS

pytestmark = pytest.mark.skipif(kernels() is None, reason="the native CPU kernels cannot be built here")


@pytest.fixture(params=LEVELS)
def level(request) -> str:
    """Each instruction-set level this CPU runs, in turn."""
    return request.param


@pytest.fixture
def native(level):
    """The kernels of `level`."""
    return kernels(level)


def as_bf16_dot_reads(x: torch.Tensor, w: torch.Tensor, level: str | None) -> torch.Tensor:
    """x as a float product with weights `w` reads it at `level` (default: the process's): rounded to bf16
    where bf16 weights take bf16 dot products (native.LEVELS[level].bf16_dot), else as it is."""
    level = level or native_levels.chosen_level()
    rounds = w.dtype == torch.bfloat16 and native_levels.LEVELS[level].bf16_dot
    return x.bfloat16().float() if rounds else x

ROWS = range(1, 18)  # one more than the decode limit: the kernels take any M
OUTPUTS = 13  # not a multiple of the 4-row strips


def close(y: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5):
    """|y - expected| <= rtol x the root-mean-square of the expected output, elementwise."""
    scale = expected.double().pow(2).mean().sqrt().item()
    torch.testing.assert_close(y.double(), expected.double(), rtol=0, atol=rtol * scale)


def activations(rows: int, inputs: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0.0  # an all-zero block: scale 0
    if inputs >= 64:
        # A block whose largest value is 127, so x * 127 / max lands on halves: round half to even.
        x[-1, 32:64] = torch.arange(32) - 15.5
        x[-1, 32] = 127.0
    return x


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> int8 values as float64 (M, K), scales float64 (M, ceil(K/block)): per block of `block`
    inputs, the last one shorter where K is not a multiple of it."""
    blocks = x.split(block, dim=1)
    amax = torch.stack([b.abs().amax(-1) for b in blocks], dim=1)  # (M, blocks)
    inverse = torch.where(amax > 0, 127.0 / amax, 0.0)  # float32, as the kernel computes it
    # torch.round rounds half to even, as nearbyint
    q = torch.cat([torch.round(b * inverse[:, i, None]) for i, b in enumerate(blocks)], dim=1)
    return q.double(), (amax / 127.0).double()


def int8_mirror(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xq, xs = quantize_activations(x, 256)
    dots = torch.stack([xb @ qb.T for xb, qb in zip(xq.split(256, 1), q.double().split(256, 1))], -1)  # exact
    return (dots * xs[:, None, :]).sum(-1) * scale.double()


def int4_mirror(x, packed, scale, minimum, group) -> torch.Tensor:
    from rgemma.quantize import unpack_int4

    xq, xs = quantize_activations(x, 64)
    xq = xq.unflatten(1, (-1, 64))  # (M, K/64, 64)
    q = unpack_int4(packed).double().unflatten(1, (-1, 64))  # (N, K/64, 64)
    dots = torch.einsum("mbi,nbi->mnb", xq, q)
    per_block = scale.double().repeat_interleave(group // 64, dim=1)  # (N, K/64)
    # The product dx * scale is rounded to float32 in the kernel, as here.
    block_scales = (xs.float()[:, None, :] * per_block.float()[None]).double()
    group_sums = x.view(x.shape[0], -1, group).sum(2).double()  # (M, G), float32 sums as the kernel takes them
    return (dots * block_scales).sum(-1) + group_sums @ minimum.double().T


@pytest.mark.parametrize("inputs", [32, 96, 320, 768])  # 320: a short last block of x; 768: three whole ones
def test_int8_kernel_equals_its_mirror(native, inputs):
    generator = torch.Generator().manual_seed(inputs)
    q = torch.randint(-127, 128, (OUTPUTS, inputs), generator=generator, dtype=torch.int8)
    q[0, :4] = torch.tensor([127, -127, 127, -127], dtype=torch.int8)
    scale = torch.rand(OUTPUTS, generator=generator) * 0.02
    for rows in ROWS:
        x = activations(rows, inputs, seed=rows)
        y = native.int8_linear(x, q, scale)
        expected = int8_mirror(x, q, scale)
        close(y, expected)
        if rows == 3:  # the tolerance resolves the activation quantization
            unquantized = x.double() @ (q.double() * scale.double()[:, None]).T
            assert (y.double() - unquantized).abs().max() > 100 * 1e-5 * expected.pow(2).mean().sqrt()


@pytest.mark.parametrize("inputs, group", [(64, 64), (192, 64), (256, 128), (384, 192)])
def test_int4_kernel_equals_its_mirror(native, inputs, group):
    generator = torch.Generator().manual_seed(inputs + group)
    q = torch.randint(0, 16, (OUTPUTS, inputs), generator=generator, dtype=torch.uint8)
    packed = pack_int4(q)
    groups = inputs // group
    scale = (torch.rand(OUTPUTS, groups, generator=generator) * 0.01).half()
    minimum = (-torch.rand(OUTPUTS, groups, generator=generator) * 0.08).half()
    for rows in ROWS:
        x = activations(rows, inputs, seed=100 + rows)
        y = native.int4_linear(x, packed, scale, minimum, group)
        close(y, int4_mirror(x, packed, scale, minimum, group))


def test_int4_kernel_reads_the_documented_nibble_layout(native):
    # One weight row with a single 1 at input k (scale 1, minimum 0) picks x[:, k].
    x = torch.arange(128, dtype=torch.float32)[None] + 1.0
    for k in (0, 5, 31, 32, 40, 63, 64, 100):
        q = torch.zeros(1, 128, dtype=torch.uint8)
        q[0, k] = 1
        packed = pack_int4(q)
        byte = (k // 64) * 32 + k % 32
        assert packed[0, byte] == (1 if k % 64 < 32 else 16)  # low nibble: inputs 0-31 of a block; high: 32-63
        y = native.int4_linear(x, packed, torch.ones(1, 2).half(), torch.zeros(1, 2).half(), 64)
        amax = x[0, (k // 64) * 64 : (k // 64) * 64 + 64].abs().max()
        xq = torch.round(x[0, k] * (127.0 / amax)) * (amax / 127.0)  # x[k] after activation quantization
        torch.testing.assert_close(y[0, 0], xq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inputs", [32, 70, 256])  # 70: a tail after the last 32-input block
def test_float_kernel_equals_f_linear(native, level, dtype, inputs):
    generator = torch.Generator().manual_seed(inputs)
    w = torch.randn(OUTPUTS, inputs, generator=generator).to(dtype)
    for rows in ROWS:
        x = torch.randn(rows, inputs, generator=generator)
        close(native.float_linear(x, w), F.linear(as_bf16_dot_reads(x, w, level).double(), w.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 14 inputs: two rows after the last four taken together; 20 outputs: a tail of 4
@pytest.mark.parametrize("heads, inputs, outputs", [(2, 16, 16), (3, 14, 20), (10, 256, 256)])
def test_block_diagonal_kernel_equals_einsum(native, dtype, heads, inputs, outputs):
    generator = torch.Generator().manual_seed(heads * inputs)
    w = torch.randn(heads, inputs, outputs, generator=generator).to(dtype)
    for rows in (1, 2, 5, 16):
        x = torch.randn(rows, heads, inputs, generator=generator)
        expected = torch.einsum("mhi,hij->mhj", x.double(), w.double())
        close(native.block_diagonal_linear(x, w), expected)


def attention_reference(q, parts, scale):
    """Softmax attention over the concatenated parts, in float64."""
    keys, values, visible = (torch.cat(t, dim=-2 if i < 2 else -1) for i, t in enumerate(zip(*parts)))
    scores = torch.einsum("bqhk,bsk->bhqs", q.double(), keys.double()) * scale
    scores.masked_fill_(~visible[:, None], float("-inf"))
    return torch.einsum("bhqs,bsk->bqhk", scores.softmax(dim=-1), values.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, queries, heads, head_dim, cached", [
    (1, 1, 10, 256, 2048),  # the 2b decode shape: ring buffer of one window, plus the new key
    (3, 2, 3, 20, 700),  # a head dim with a tail of 4; chunks of keys ending mid-way
    (2, 5, 1, 8, 0),  # no history: the new keys only
])
def test_attend_few_kernel_equals_softmax_attention(native, dtype, batch, queries, heads, head_dim, cached):
    generator = torch.Generator().manual_seed(cached + heads)
    q = torch.randn(batch, queries, heads, head_dim, generator=generator)
    parts = []
    for length in ([cached] if cached else []) + [queries]:
        keys = torch.randn(batch, length, head_dim, generator=generator).to(dtype)
        values = torch.randn(batch, length, head_dim, generator=generator).to(dtype)
        visible = torch.rand(batch, queries, length, generator=generator) < 0.7
        visible[..., -1] = True  # every query sees at least one key
        parts.append((keys, values, visible))
    expected = attention_reference(q, parts, head_dim**-0.5)
    close(native.attend_few(q, *(list(t) for t in zip(*parts)), head_dim**-0.5), expected)


@torch.no_grad()
def test_native_linear_widens_narrow_weights_a_slice_at_a_time(monkeypatch):
    """bf16 weights with float32 activations: the GEMM path equals F.linear on the widened weight, and so does
    the native kernel for decode-sized inputs."""
    monkeypatch.setattr(cpu, "WIDEN_BYTES", 7 * 40 * 4)  # 7 rows per slice: 3 slices, the last short
    generator = torch.Generator().manual_seed(0)
    linear = rgemma.model.Linear(40, 17, dtype=torch.bfloat16)
    linear.weight.copy_(torch.randn(17, 40, generator=generator))
    linear.bias.copy_(torch.randn(17, generator=generator))
    linear.__class__ = cpu.NativeLinear
    x = torch.randn(2, 30, 40, generator=generator)  # 60 rows: past the decode kernels
    expected = F.linear(x, linear.weight.float(), linear.bias.float())
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    decode = x[:, :1]  # 2 rows: the native kernel
    expected = F.linear(as_bf16_dot_reads(decode, linear.weight, None), linear.weight.float(), linear.bias.float())
    torch.testing.assert_close(linear(decode), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [37, 2560])  # a tail of 5; the 2b width
def test_rms_norm_kernel_equals_the_formula(native, dtype, width):
    generator = torch.Generator().manual_seed(width)
    weight = (0.1 * torch.randn(width, generator=generator)).to(dtype)  # stored zero-centred
    for rows in (1, 3, 16):
        x = 3.0 * torch.randn(2, rows, 1, width, generator=generator)[0]
        expected = F.rms_norm(x.double(), (width,), 1.0 + weight.double(), 1e-6)
        close(native.rms_norm(x.reshape(-1, width), weight, 1e-6).view(x.shape), expected)
        norm = RMSNorm(width, 1e-6, dtype=dtype)
        norm.weight.data = weight
        with torch.no_grad():
            close(norm(x), expected)  # the model's own, which the Decoder's must equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rglru_step_kernel_equals_the_plain_recurrence(native, dtype):
    """One decoding step of the RG-LRU (as the Decoder runs it) against the module's torch operations; row 1
    starts a document."""
    from rgemma.model import RGLRU, TokenLayout

    torch.manual_seed(0)
    rglru = RGLRU(width=44, num_heads=4).to(dtype)  # 44: 4 channels past the last 8
    rglru.reset_parameters()
    with torch.no_grad():  # non-zero biases, and a gate parameter past softplus' threshold
        rglru.input_gate_bias.normal_()
        rglru.recurrent_gate_bias.normal_()
        rglru.recurrent_param[0] = 25.0
    x = torch.randn(3, 1, 44)
    h0 = torch.randn(3, 44)
    layout = TokenLayout.of_step(torch.tensor([[7], [0], [2]]))
    with torch.no_grad():
        h = native.rglru_step(
            x[:, 0], rglru.input_gate_weight, rglru.input_gate_bias.float(), rglru.recurrent_gate_weight,
            rglru.recurrent_gate_bias.float(), rglru.recurrent_param.float(), h0, layout.positions[:, 0],
        )
        _, expected_h = rglru(x, layout, h0)
    close(h, expected_h)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("with_state", [False, True], ids=["from-zero", "from-state"])
def test_rglru_prompt_kernel_equals_the_module(level, with_state):
    """The RG-LRU over a prompt in one native pass (NativeRGLRU, as a prefill runs it) against the module's torch
    operations and blocked scan: row 0 starts a second document mid-prompt, row 1 is left-padded, and the state
    left after the last step is the same."""
    from rgemma.backends.cpu import native_kinds
    from rgemma.model import RGLRU, TokenLayout

    torch.manual_seed(1)
    rglru = RGLRU(width=44, num_heads=4)  # 44: 4 channels past the last 8
    rglru.reset_parameters()
    with torch.no_grad():
        rglru.input_gate_bias.normal_()
        rglru.recurrent_gate_bias.normal_()
        rglru.recurrent_param[0] = 25.0  # past softplus' threshold
    positions = torch.arange(40).repeat(2, 1) + (5 if with_state else 0)
    positions[0, 17:] -= positions[0, 17].item()  # a document starts at step 17
    positions[1, :6] = -1  # left padding
    positions[1, 6:] = torch.arange(34) + (5 if with_state else 0)
    layout = TokenLayout.of(positions, has_history=with_state)
    x = torch.randn(2, 40, 44)
    h0 = torch.randn(2, 44) if with_state else None
    with torch.no_grad():
        expected, expected_last = rglru(x, layout, h0)
        rglru.__class__ = native_kinds(level)[RGLRU]
        h, last = rglru(x, layout, h0)
    close(h, expected)
    close(last, expected_last)
    torch.testing.assert_close(h[1, :6], (h0 if with_state else torch.zeros(2, 44))[1].expand(6, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_step_kernel_equals_the_plain_convolution(native, dtype):
    """One decoding step of the convolution (as the Decoder runs it) against the module's torch operations.

    Rows at positions 0, 1, 2 see none, one and two of the 3 taps; the row at 9 sees all."""
    from rgemma.model import Conv1D, TokenLayout

    torch.manual_seed(0)
    conv = Conv1D(width=20, conv_width=4).to(dtype)
    conv.reset_parameters()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(4, 1, 20)
    taps = torch.randn(4, 3, 20)
    layout = TokenLayout.of_step(torch.tensor([[0], [1], [2], [9]]))
    with torch.no_grad():
        new_taps = taps.clone()  # shifted in place
        out = native.conv_step(
            x[:, 0], new_taps, conv.weight.float()[:, 0], conv.bias.float(), layout.positions[:, 0]
        )
        expected_out, expected_taps = conv(x, layout, taps.clone())
    close(out, expected_out[:, 0])
    assert torch.equal(new_taps, expected_taps.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_step_kernel_equals_the_plain_attention(native, dtype):
    """One decoding step of local attention (as the Decoder runs it) against the module's torch operations.

    Row 0 is past the window (the slot it overwrites is still visible), row 1
    starts a document (it sees only itself, and forgets the ring), row 2 has
    a ring only partly filled, row 3 is far along (RoPE at large angles)."""
    from rgemma.model import LocalAttention, TokenLayout, rope_frequencies
    from rgemma.state import AttentionState

    torch.manual_seed(0)
    config = rgemma.Config(vocab_size=64, width=48, mlp_width=32, num_heads=3, lru_width=48,
                           block_types=("attention",), attention_window=8)
    attention = LocalAttention(config).to(dtype)
    attention.reset_parameters(1.0)
    positions = torch.tensor([[11], [0], [3], [30001]])
    window, head_dim = config.attention_window, config.head_dim
    ring = torch.full((4, window), -1)  # each row's last W positions before its token, in their slots
    for row, position in enumerate(positions[:, 0].tolist()):
        for earlier in range(max(0, position - window), position):
            ring[row, earlier % window] = earlier
    state = AttentionState(k=torch.randn(4, window, head_dim), v=torch.randn(4, window, head_dim), pos=ring)
    x = torch.randn(4, 1, config.width)
    layout = TokenLayout.of_step(positions)
    with torch.no_grad():
        fused = AttentionState(*(t.clone() for t in (state.k, state.v, state.pos)))
        project = lambda linear: linear(x)[:, 0].float().contiguous()  # noqa: E731  (B, out)
        out = native.attention_step(
            project(attention.q_proj).view(4, config.num_heads, head_dim), project(attention.k_proj),
            project(attention.v_proj), fused.k, fused.v, fused.pos, layout.positions[:, 0],
            rope_frequencies(head_dim, config.rope_base, x.device), head_dim**-0.5,
        )  # (B, H, K), before o_proj
        out = attention.o_proj(out.to(x.dtype).view(4, 1, config.width))
        plain = AttentionState(*(t.clone() for t in (state.k, state.v, state.pos)))
        expected = attention(x, layout, plain)
    close(out, expected)
    close(fused.k, plain.k)
    close(fused.v, plain.v)
    assert torch.equal(fused.pos, plain.pos)
    assert (fused.pos[1] == torch.tensor([0] + [-1] * (window - 1))).all()
