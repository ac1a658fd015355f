"""The CPU decoding step: the native Decoder against the model's own forward.

`DecodeStep` runs a CPU step in one native call (rgemma/csrc/cpu_kernels.cpp,
`Decoder`): the embedding, every residual block, the final norm and the
soft-capped tied output layer; the model's modules compute the same network
with torch operations. Float weights must agree to float32 rounding over many
steps. Quantized weights are compared part by part on the same inputs: there
the activations are quantized to int8 before each product, so a last-bit
difference upstream (our tanh against torch's) can move one activation by a
whole quantization step, up to about 5e-3 of a block's output at these
widths, and a random int4 network amplifies such a step hundreds of times
over three blocks (in the model's own forward too). So most blocks must agree
to float32 rounding, every block within a few such steps, and the embedding
and output layer to float32 rounding; a misread format is off by the whole
output.
"""

import pytest
import torch

from rgemma import kernels
from rgemma.config import Config
from rgemma.decode import DecodeStep, _NativeStep
from rgemma.model import Griffin, TokenLayout, rope_frequencies
from rgemma.quantize import quantize_model

pytestmark = pytest.mark.skipif(kernels.native() is None, reason="the native CPU kernels cannot be built here")

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
    size (a view of the last position was strided at batch 2+), and no view keeps the prompt's activations
    alive."""
    griffin = model()
    tokens, state = prefilled(griffin)
    for tensor in state.tensors():
        assert tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes, tensor.shape
    with torch.no_grad():
        assert _NativeStep(griffin)(tokens[:, :1], state) is not None


def test_native_step_leaves_a_state_it_cannot_update_to_the_plain_path():
    """A state the Decoder cannot update in place (here a column-major h) is refused before anything changes, and
    the step takes the plain forward; Decoder.run names what does not fit."""
    griffin = model()
    tokens, state = prefilled(griffin)
    before = state.clone()
    state.layers[0].h = state.layers[0].h.t().contiguous().t()  # the same values, column-major
    with torch.no_grad():
        assert _NativeStep(griffin)(tokens[:, :1], state) is None
        for got, want in zip(state.tensors(), before.tensors()):
            assert torch.equal(got, want)
        logits, _ = DecodeStep(griffin)(tokens[:, :1], state)
        expected, _ = griffin(tokens[:, :1], state=before)
        assert relative_error(logits, expected[:, -1]) < 1e-5
        strided = before.clone()
        strided.layers[0].h = strided.layers[0].h.t().contiguous().t()
        cfg = griffin.config
        decoder = kernels.native().Decoder([dict(layer.state_dict(keep_vars=True)) for layer in griffin.layers],
                                           cfg.norm_eps, rope_frequencies(cfg.head_dim, cfg.rope_base, "cpu"))
        with pytest.raises(RuntimeError, match="block 0: h must be a contiguous float32"):
            decoder.run(griffin.embed(tokens[:, 0]), strided.position, strided.layer_tensors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_equals_the_forward(dtype):
    griffin = model(dtype)
    step = DecodeStep(griffin)
    assert step._native is not None, "a float32-computing CPU model decodes through the native Decoder"
    tokens, state = prefilled(griffin)
    expected_state = state.clone()
    with torch.no_grad():
        for t in range(STEPS):
            if t == RESET_AT:
                state.position[1] = expected_state.position[1] = 0
            logits, state = step(tokens[:, t:t + 1], state)
            expected, expected_state = griffin(tokens[:, t:t + 1], state=expected_state)
            assert relative_error(logits, expected[:, -1]) < 1e-5, f"step {t}"
    for got, want in zip(state.tensors(), expected_state.tensors()):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=1e-5)


@pytest.mark.parametrize("width", [192, 160])
@pytest.mark.parametrize("bits", [8, 4])
def test_native_blocks_equal_the_modules_on_quantized_weights(bits, width):
    griffin = model(bits=bits, width=width)
    assert DecodeStep(griffin)._native is not None
    cfg = griffin.config
    decoders = [
        kernels.native().Decoder(
            [dict(layer.state_dict(keep_vars=True))], cfg.norm_eps, rope_frequencies(cfg.head_dim, cfg.rope_base, "cpu")
        )
        for layer in griffin.layers
    ]
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
            state.position = native_state.position = positions + 1
    errors = torch.tensor(errors)
    assert errors.median() < 1e-5 and errors.max() < 2e-2, errors
    for got, want in zip(native_state.tensors(), state.tensors()):
        assert relative_error(got.double(), want.double()) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_native_embedding_and_logits_equal_the_model(bits, dtype):
    """A Decoder with no blocks: the embedding's rows, the final norm, the tied output layer and the soft cap,
    in every weight format (int4 rows padded to whole groups)."""
    griffin = model(dtype, bits)
    cfg = griffin.config
    head = {name: t for name, t in griffin.state_dict(keep_vars=True).items() if not name.startswith("layers.")}
    decoder = kernels.native().Decoder([], cfg.norm_eps, rope_frequencies(cfg.head_dim, cfg.rope_base, "cpu"), head,
                                       cfg.embedding_scale, cfg.logits_soft_cap)
    tokens = torch.tensor([0, 7, cfg.vocab_size - 1])
    with torch.no_grad():
        logits = decoder.step(tokens, torch.zeros(3, dtype=torch.long), [])
        expected = griffin.logits(griffin.final_norm(griffin.embed(tokens)))
    assert relative_error(logits, expected) < 2e-6
    with pytest.raises(RuntimeError, match=f"token {cfg.vocab_size} is outside the vocabulary of {cfg.vocab_size}"):
        decoder.step(torch.tensor([cfg.vocab_size]), torch.zeros(1, dtype=torch.long), [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("changed", ["blocks", "final norm"])
def test_native_step_follows_weights_changed_in_place(changed, dtype):
    """The Decoder keeps float32 copies of bfloat16 norms and biases (float32 ones it shares), so it must see
    in-place changes and build itself again."""
    griffin = model(dtype)
    step = DecodeStep(griffin)
    tokens, state = prefilled(griffin)
    expected_state = state.clone()
    with torch.no_grad():
        step(tokens[:, :1], state)
        griffin(tokens[:, :1], state=expected_state)
        if changed == "blocks":
            for layer in griffin.layers:
                layer.channel_pre_norm.weight.add_(0.5)
                layer.mlp_block.down_proj.bias.add_(0.1)
        else:
            griffin.final_norm.weight.add_(0.5)
        logits, _ = step(tokens[:, 1:2], state)
        expected, _ = griffin(tokens[:, 1:2], state=expected_state)
    assert relative_error(logits, expected[:, -1]) < 1e-5


def test_decode_step_takes_the_plain_path_without_native_kernels(monkeypatch):
    griffin = model()
    tokens, state = prefilled(griffin)
    expected_state = state.clone()
    with torch.no_grad():
        native_logits, _ = DecodeStep(griffin)(tokens[:, :1], expected_state)
        monkeypatch.setattr(kernels, "native", lambda: None)
        step = DecodeStep(griffin)
        assert step._native is None
        logits, _ = step(tokens[:, :1], state)
    assert relative_error(logits, native_logits) < 1e-5
