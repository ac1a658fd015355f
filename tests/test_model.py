"""Properties of the network that need no reference: decode equals the full pass,
chunks, document starts, padding, state operations, precision."""

import pytest
import torch

from rgemma import Config, Griffin, State


def tokens(batch, length, vocab=512, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_token_by_token_decode_equals_one_pass(tiny):
    seq = tokens(2, 30)  # longer than the window (8) several times over
    full, _ = tiny(seq)
    state = None
    steps = []
    for t in range(seq.shape[1]):
        logits, state = tiny(seq[:, t : t + 1], state=state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("cuts", [[1], [7], [3, 12], [9, 10, 20]])
@torch.no_grad()
def test_chunked_appends_equal_one_pass(tiny, cuts):
    seq = tokens(2, 29)
    full, full_state = tiny(seq)
    bounds = [0, *cuts, seq.shape[1]]
    state, pieces = None, []
    for start, end in zip(bounds, bounds[1:]):
        logits, state = tiny(seq[:, start:end], state=state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=2e-5)
    for a, b in zip(state.tensors(), full_state.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


@torch.no_grad()
def test_document_start_resets_everything(tiny):
    first, second = tokens(1, 13, seed=2), tokens(1, 11, seed=3)
    positions = torch.cat([torch.arange(13), torch.arange(11)])[None]
    packed, packed_state = tiny(torch.cat([first, second], dim=1), positions)
    alone, alone_state = tiny(second)
    torch.testing.assert_close(packed[:, 13:], alone, rtol=0, atol=2e-5)
    # Continuing both gives the same tokens: the old document is gone from the state too.
    more = tokens(1, 12, seed=4)
    torch.testing.assert_close(tiny(more, state=packed_state)[0], tiny(more, state=alone_state)[0], rtol=0, atol=2e-5)


@torch.no_grad()
def test_document_start_when_appending_to_a_state(tiny):
    _, state = tiny(tokens(1, 20, seed=5))
    fresh = tokens(1, 10, seed=6)
    appended, _ = tiny(fresh, torch.arange(10)[None], state=state)
    torch.testing.assert_close(appended, tiny(fresh)[0], rtol=0, atol=2e-5)


def left_pad(rows, pad_token=0):
    width = max(r.shape[1] for r in rows)
    batch = torch.full((len(rows), width), pad_token)
    positions = torch.full((len(rows), width), -1)
    for i, r in enumerate(rows):
        batch[i, width - r.shape[1] :] = r[0]
        positions[i, width - r.shape[1] :] = torch.arange(r.shape[1])
    return batch, positions


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(tiny):
    rows = [tokens(1, n, seed=n) for n in (17, 5, 11)]
    batch, positions = left_pad(rows)
    logits, state = tiny(batch, positions)
    follow = tokens(3, 4, seed=9)
    next_logits, _ = tiny(follow, state=state)
    for i, r in enumerate(rows):
        alone, alone_state = tiny(r)
        torch.testing.assert_close(logits[i, -r.shape[1] :], alone[0], rtol=0, atol=2e-5)
        torch.testing.assert_close(next_logits[i], tiny(follow[i : i + 1], state=alone_state)[0][0], rtol=0, atol=2e-5)


@torch.no_grad()
def test_padding_appended_to_a_state_changes_nothing(tiny):
    # Rows continue from a shared state with different numbers of new tokens.
    _, state = tiny(tokens(2, 15, seed=10))
    reference = state.clone()
    rows = [tokens(1, 6, seed=11), tokens(1, 2, seed=12)]
    batch, _ = left_pad(rows)
    positions = torch.full(batch.shape, -1)
    positions[0] = 15 + torch.arange(6)
    positions[1, 4:] = 15 + torch.arange(2)
    logits, state = tiny(batch, positions, state)
    for i, r in enumerate(rows):
        alone, _ = tiny(r, state=reference.select([i]).clone())
        torch.testing.assert_close(logits[i, -r.shape[1] :], alone[0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("length", [1, 3])  # 1: the one-token write of the attention ring buffer
@torch.no_grad()
def test_an_all_padding_row_leaves_its_state_unchanged(tiny, length):
    _, state = tiny(tokens(2, 12, seed=13))
    before = state.clone()
    positions = torch.stack([12 + torch.arange(length), torch.full((length,), -1)])
    _, state = tiny(tokens(2, length, seed=14), positions, state)
    for a, b in zip(state.select([1]).tensors(), before.select([1]).tensors()):
        assert torch.equal(a, b)


@torch.no_grad()
def test_step_equals_forward(tiny):
    # Rows at different positions: row 0 starts a new document on a full state,
    # the others run on past the window (8) and wrap their ring buffers.
    _, state = tiny(tokens(3, 13, seed=20))
    state.position = torch.tensor([0, 13, 5])
    by_step, by_forward = state.clone(), state.clone()
    follow = tokens(3, 12, seed=21)
    for t in range(follow.shape[1]):
        step_logits = tiny.step(follow[:, t : t + 1], by_step)
        forward_logits, by_forward = tiny(follow[:, t : t + 1], state=by_forward)
        torch.testing.assert_close(step_logits, forward_logits[:, -1], rtol=0, atol=2e-5)
    for a, b in zip(by_step.tensors(), by_forward.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match=r"tokens of shape \(3, 1\)"):
        tiny.step(follow[:, :2], by_step)


@torch.no_grad()
def test_state_size_never_grows(tiny):
    _, short = tiny(tokens(1, 3))
    _, long = tiny(tokens(1, 300))
    assert short.nbytes == long.nbytes
    config = tiny.config
    attention = [l for l in long.layers if hasattr(l, "k")]
    assert attention and all(l.k.shape == (1, config.attention_window, config.head_dim) for l in attention)


@torch.no_grad()
def test_2b_state_size_matches_design():
    config = Config.preset("2b")
    state = State.zeros(config, 1, dtype=torch.bfloat16)
    expected = (18 * (2560 * 4 + 3 * 2560 * 4)  # fp32 RNN state + 3 fp32 conv taps
                + 8 * (2 * 2048 * 256 * 2 + 2048 * 8)  # K and V ring buffers + slot positions
                + 8)  # next position
    assert state.nbytes == expected


@torch.no_grad()
def test_clone_select_merge(tiny):
    seq = tokens(3, 14)
    _, state = tiny(seq)
    follow = tokens(3, 5, seed=7)
    expected, _ = tiny(follow, state=state.clone())
    # Rows selected and merged back in another order continue as before.
    parts = [state.select([2]), state.select([0, 1])]
    merged = State.merge(parts)
    reordered, _ = tiny(follow[[2, 0, 1]], state=merged)
    torch.testing.assert_close(reordered, expected[[2, 0, 1]], rtol=0, atol=1e-6)
    # The original was not touched by the continuation of its clone.
    again, _ = tiny(follow, state=state)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different models"):
        State.merge([state, Griffin(Config.preset("tiny")).init_state(1)])


@torch.no_grad()
def test_prefill_returns_last_logits_in_chunks(tiny):
    seq = tokens(2, 37)
    full, full_state = tiny(seq)
    last, state = tiny.prefill(seq, chunk_size=10)
    torch.testing.assert_close(last, full[:, -1], rtol=0, atol=2e-5)
    torch.testing.assert_close(state.layers[0].h, full_state.layers[0].h, rtol=0, atol=2e-5)


@torch.no_grad()
def test_bfloat16_close_to_float32(tiny):
    seq = tokens(2, 40)
    full32, _ = tiny(seq)
    bf16 = Griffin(tiny.config, dtype=torch.bfloat16)
    bf16.load_state_dict(tiny.state_dict())
    full16, state16 = bf16(seq)
    assert full16.dtype == torch.float32  # logits are returned in float32
    assert state16.layers[0].h.dtype == torch.float32  # the RNN state stays float32
    # bf16 keeps 8 bits of mantissa: about half of this error comes from rounding
    # the weights alone. Stated tolerance: mean error under 2% of the logits'
    # spread, worst error under 5% of the largest logit.
    error = (full16 - full32).abs()
    assert error.mean() < 0.02 * full32.std()
    assert error.max() < 0.05 * full32.abs().max()
    assert (full16.argmax(-1) == full32.argmax(-1)).float().mean() > 0.9


def test_gradients_reach_every_parameter(tiny):
    seq = tokens(2, 20)
    positions = torch.cat([torch.arange(12), torch.arange(8)]).repeat(2, 1)
    logits, _ = tiny(seq, positions)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), seq[:, 1:].flatten())
    loss.backward()
    for name, param in tiny.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_sqrt_gradient_is_clipped():
    from rgemma.model import MAX_SQRT_GRADIENT, _SqrtClippedGradient

    x = torch.tensor([0.0, 1e-12, 0.25], requires_grad=True)
    _SqrtClippedGradient.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([MAX_SQRT_GRADIENT, MAX_SQRT_GRADIENT, 1.0]))


def test_bad_inputs_name_the_problem(tiny):
    with pytest.raises(ValueError, match="positions shape"):
        tiny(tokens(2, 5), positions=torch.zeros(2, 4, dtype=torch.long))
    _, state = tiny(tokens(2, 5))
    with pytest.raises(ValueError, match="state has 2 rows"):
        tiny(tokens(3, 1), state=state)


@torch.no_grad()
def test_attention_cost_is_linear_in_length(tiny, monkeypatch):
    """No query block ever scores more than one window of keys beyond itself, so memory is O(T x W)."""
    import rgemma.model

    shapes = []  # (queries, keys) of every attention call
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        shapes.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(rgemma.model.F, "scaled_dot_product_attention", recording_sdpa)
    block, window = rgemma.model.ATTENTION_QUERY_BLOCK, tiny.config.attention_window
    _, state = tiny(tokens(1, 3 * block + 5))
    tiny(tokens(1, 2 * block), state=state)  # with history: the ring buffer adds one window
    assert len(shapes) == 2 * (4 + 2)  # two attention layers, one call per query block
    assert max(queries for queries, _ in shapes) <= block
    assert max(keys for _, keys in shapes) <= block + 2 * window


@torch.no_grad()
def test_conv_equals_torch_depthwise_conv_restarted_at_each_document():
    from rgemma.model import Conv1D, TokenLayout

    width, conv_width = 8, 4
    conv = Conv1D(width, conv_width, dtype=torch.float64)
    conv.reset_parameters()
    conv.bias.normal_()
    x = torch.randn(1, 20, width, dtype=torch.float64)
    positions = torch.cat([torch.arange(12), torch.arange(8)])[None]  # a second document starts at index 12
    taps = torch.randn(1, conv_width - 1, width, dtype=torch.float64)  # the state's: the first document drops them
    out, last = conv(x, TokenLayout.of(positions, has_history=True), taps)

    def causal_conv(part):  # (1, T, L) -> torch's depthwise convolution over zeros before the document
        padded = torch.nn.functional.pad(part.transpose(1, 2), (conv_width - 1, 0))
        return torch.nn.functional.conv1d(padded, conv.weight, conv.bias, groups=width).transpose(1, 2)

    torch.testing.assert_close(out, torch.cat([causal_conv(x[:, :12]), causal_conv(x[:, 12:])], dim=1))
    torch.testing.assert_close(last, x[:, -(conv_width - 1):])
