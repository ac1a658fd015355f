"""The CPU decode step: the native Decoder against the model's own forward.

The CPU backend runs a decode step in one native call (rgemma/csrc/cpu_kernels.cpp,
`Decoder`): the embedding, every residual block, the final norm and the
soft-capped tied output layer; the model's modules compute the same network
with torch operations. Float weights must agree to float32 rounding over many
steps (to bf16 rounding where the forward computes in bf16). Quantized weights
are compared part by part on the same inputs: there the activations are
quantized to int8 before each product, so a last-bit difference upstream (our
tanh against torch's) can move one activation by a whole quantization step,
up to about 5e-3 of a block's output at these widths, and a random int4
network amplifies such a step hundreds of times over three blocks (in the
model's own forward too). So most blocks must agree to float32 rounding,
every block within a few such steps, and the embedding and output layer to
float32 rounding; a misread format is off by the whole output.
"""

import pytest
import torch
from torch import nn

from rgemma.backends import Options, prepare
from rgemma.backends.cpu import build_decoder
from rgemma.backends.native import kernels
from rgemma.config import Config
from rgemma.model import Griffin, TokenLayout
from rgemma.quantize import quantize_model
from conftest import LowRankAdapter
from cpu_levels import LEVELS, step_tolerance

pytestmark = pytest.mark.skipif(kernels() is None, reason="the native CPU kernels cannot be built here")

STEPS = 24  # past the attention window (16): the ring buffer wraps
RESET_AT = 9  # row 1 starts a new document at this step


def config(width: int = 192) -> Config:
    # Widths that are not multiples of 128 (and 160 not of 64), so int4 groups of 128 are padded.
    return Config.preset("tiny", width=width, lru_width=width, mlp_width=320)


def model(dtype: torch.dtype = torch.float32, bits: int | None = None, width: int = 192) -> Griffin:
    torch.manual_seed(0)
    griffin = Griffin(config(width), dtype=dtype).eval()
    return quantize_model(griffin, bits, group_size=128) if bits else griffin


def prefilled(griffin: Griffin):
    """A state with two rows at different positions, and the tokens to decode."""
    tokens = torch.randint(0, griffin.config.vocab_size, (2, 5 + STEPS), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]])  # row 1 left-padded
    with torch.no_grad():
        _, state = griffin(tokens[:, :5], positions=positions)
    return tokens[:, 5:], state


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y - expected).abs().max() / expected.pow(2).mean().sqrt()).item()


def test_a_prefilled_state_is_compact():
    """Each tensor of a prompt's state owns exactly its storage: the native step takes the state at any batch
    size, and no view keeps the prompt's activations alive."""
    griffin = model()
    backend = prepare(griffin)
    tokens, state = prefilled(griffin)
    for tensor in state.tensors():
        assert tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes, tensor.shape
    assert backend.decode_path == "native"


def test_a_state_the_decoder_cannot_update_takes_the_plain_path():
    """A state the Decoder cannot update in place (here a column-major h) is refused before anything changes,
    and the step takes the plain forward; Decoder.run names what does not fit."""
    griffin = model()
    backend = prepare(griffin)
    tokens, state = prefilled(griffin)
    before = state.clone()
    state.layers[0].h = state.layers[0].h.t().contiguous().t()  # the same values, column-major
    with torch.no_grad():
        logits, stepped = backend.step(tokens[:, :1], state)
        expected, _ = griffin(tokens[:, :1], state=before)
    assert stepped is state
    assert relative_error(logits, expected[:, -1]) < 1e-5
    for got, want in zip(state.tensors(), before.tensors()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    strided = prefilled(griffin)[1]
    strided.layers[0].h = strided.layers[0].h.t().contiguous().t()
    with pytest.raises(RuntimeError, match="block 0: h must be a contiguous float32"):
        build_decoder(griffin).run(griffin.embed(tokens[:, 0]), strided.position, strided.layer_tensors())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("native_bf16", [False, True], ids=["fp32-prefill", "bf16-prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_equals_the_forward(dtype, native_bf16, level):
    """On CPUs with and without native bf16 (forced either way), whatever dtype the prefill computes in, at
    every level of the kernels this CPU runs."""
    griffin = model(dtype)
    backend = prepare(griffin, options=Options(native_bf16=native_bf16, cpu_level=level))
    assert backend.decode_path == "native"
    computes_bf16 = griffin.activation_dtype == torch.bfloat16
    assert computes_bf16 == (dtype == torch.bfloat16 and native_bf16)
    # Each step starts the forward from the native step's own state, so a bf16 forward's rounding does not
    # pile up over the steps; the states must agree after each step too.
    tolerance = 5e-2 if computes_bf16 else step_tolerance(dtype, level)  # one step of bf16 rounding: about 2e-2 here
    tokens, state = prefilled(griffin)
    with torch.no_grad():
        for t in range(STEPS):
            if t == RESET_AT:
                state.position[1] = 0
            expected_state = state.clone()
            logits, stepped = backend.step(tokens[:, t:t + 1], state)
            assert stepped is state
            expected, expected_state = griffin(tokens[:, t:t + 1], state=expected_state)
            assert relative_error(logits, expected[:, -1]) < tolerance, f"step {t}"
            for got, want in zip(state.tensors(), expected_state.tensors()):
                torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("width", [192, 160])
@pytest.mark.parametrize("bits", [8, 4])
def test_native_blocks_equal_the_modules_on_quantized_weights(bits, width, level):
    griffin = model(bits=bits, width=width)
    assert prepare(griffin, options=Options(cpu_level=level)).decode_path == "native"
    decoders = [build_decoder(griffin, layers=[i], head=False, level=level) for i in range(len(griffin.layers))]
    tokens, state = prefilled(griffin)
    native_state = state.clone()
    errors = []
    with torch.no_grad():
        for t in range(STEPS):
            if t == RESET_AT:
                state.position[1] = native_state.position[1] = 0
            positions = state.position.clone()
            x = griffin.embed(tokens[:, t])  # (B, D)
            for i, (layer, decoder) in enumerate(zip(griffin.layers, decoders)):
                expected = layer(x[:, None], TokenLayout.of_step(positions[:, None]), state.layers[i])[:, 0]
                y = decoder.run(x.contiguous(), positions, [native_state.layer_tensors()[i]])
                errors.append(relative_error(y, expected))
                x = expected
            state.position.add_(1)
            native_state.position.add_(1)
    errors = torch.tensor(errors)
    # Most blocks take no quantized product on these tiny models; those that do differ by the activations'
    # quantization: up to 2.4e-2 measured (x in blocks of 256 inputs against int8 weights, which the int4
    # models keep for some layers too).
    assert errors.median() < 5e-5 and errors.max() < 4e-2, errors
    for got, want in zip(native_state.tensors(), state.tensors()):
        assert relative_error(got.double(), want.double()) < 2e-2


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_native_embedding_and_logits_equal_the_model(bits, dtype, level):
    """A Decoder with no blocks: the embedding's rows, the final norm, the tied output layer and the soft cap,
    in every weight format (int4 rows padded to whole groups)."""
    griffin = model(dtype, bits)
    # The forward in float32, as the Decoder computes
    prepare(griffin, options=Options(native_bf16=False, cpu_level=level))
    cfg = griffin.config
    decoder = build_decoder(griffin, layers=[], level=level)
    tokens = torch.tensor([0, 7, cfg.vocab_size - 1])
    with torch.no_grad():
        logits = decoder.step(tokens, torch.zeros(3, dtype=torch.long), [])
        expected = griffin.logits(griffin.final_norm(griffin.embed(tokens)))
    assert relative_error(logits, expected) < 5e-6
    with pytest.raises(RuntimeError, match=f"token {cfg.vocab_size} is outside the vocabulary of {cfg.vocab_size}"):
        decoder.step(torch.tensor([cfg.vocab_size]), torch.zeros(1, dtype=torch.long), [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("changed", ["blocks", "final norm"])
def test_native_step_follows_weights_changed_in_place(changed, dtype):
    """The Decoder keeps float32 copies of bfloat16 norms and biases (float32 ones it shares), so it must see
    in-place changes and build itself again."""
    griffin = model(dtype)
    backend = prepare(griffin, options=Options(native_bf16=False))  # the forward in float32, as the Decoder computes
    tokens, state = prefilled(griffin)
    expected_state = state.clone()
    with torch.no_grad():
        backend.step(tokens[:, :1], state)
        griffin(tokens[:, :1], state=expected_state)
        if changed == "blocks":
            for layer in griffin.layers:
                layer.channel_pre_norm.weight.add_(0.5)
                layer.mlp_block.down_proj.bias.add_(0.1)
        else:
            griffin.final_norm.weight.add_(0.5)
        logits, _ = backend.step(tokens[:, 1:2], state)
        expected, _ = griffin(tokens[:, 1:2], state=expected_state)
    assert relative_error(logits, expected[:, -1]) < step_tolerance(dtype)


def has_module(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


@pytest.mark.parametrize("path", ["temporal_block.q_proj", "mlp_block.up_proj", "temporal_block.linear_x"])
def test_a_module_the_decoder_does_not_know_sends_the_step_down_the_plain_path(path):
    """An adapter put on a prepared model, even one that keeps the linear inside it, is never ignored."""
    griffin = model()
    backend = prepare(griffin)
    tokens, state = prefilled(griffin)
    with torch.no_grad():
        backend.step(tokens[:, :1], state.clone())  # the Decoder is built for the model without the adapter
        layer = next(layer for layer in griffin.layers if has_module(layer, path))
        parent, _, name = path.rpartition(".")
        setattr(layer.get_submodule(parent), name, LowRankAdapter(layer.get_submodule(path)))
        assert backend.decode_path == "plain"
        expected_state = state.clone()
        logits, _ = backend.step(tokens[:, :1], state)
        expected, _ = griffin(tokens[:, :1], state=expected_state)
    assert relative_error(logits, expected[:, -1]) < 1e-6


def test_without_native_kernels_the_step_is_the_plain_forward():
    griffin = model()
    tokens, state = prefilled(griffin)
    expected_state = state.clone()
    with torch.no_grad():
        native_logits, _ = prepare(griffin).step(tokens[:, :1], expected_state)
        plain = prepare(griffin, options=Options(native_kernels=False))
        assert plain.decode_path == "plain" and plain.describe()["decode"] == "plain"
        logits, _ = plain.step(tokens[:, :1], state)
    assert relative_error(logits, native_logits) < 1e-5


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bits", [None, 8, 4], ids=["bf16", "int8", "int4"])
def test_every_level_steps_as_the_plain_path_at_every_batch_size(bits, level):
    """One fused step of bf16, int8 and int4 weights at 1, 3 and 16 rows against the plain PyTorch path (the
    modules' own forward, no native kernel anywhere). Quantized weights: the plain path multiplies float
    activations, the kernels int8 ones (blocks of 256 inputs against int8 weights, 64 against int4), about
    1e-2 apart per product here, 0.08 apart on the logits after every layer with int8 weights and 0.15 with
    int4 (measured); a misread weight is off by the whole output."""
    griffin = model(torch.bfloat16, bits)
    tolerance = {None: step_tolerance(torch.bfloat16, level), 8: 0.12, 4: 0.25}[bits]
    for rows in (1, 3, 16):
        tokens = torch.randint(0, griffin.config.vocab_size, (rows, 6), generator=torch.Generator().manual_seed(rows))
        plain = prepare(griffin, options=Options(native_kernels=False, native_bf16=False))
        with torch.no_grad():
            _, state = griffin(tokens[:, :5])
            expected_state = state.clone()
            expected, _ = plain.step(tokens[:, 5:], expected_state)
            backend = prepare(griffin, options=Options(native_bf16=False, cpu_level=level))
            assert backend.decode_path == "native"
            logits, _ = backend.step(tokens[:, 5:], state)
        assert relative_error(logits, expected) < tolerance, rows
        for got, want in zip(state.tensors(), expected_state.tensors()):
            assert relative_error(got.double(), want.double()) < tolerance, rows
