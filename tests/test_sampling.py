"""Sampling: each filter keeps the tokens it should, draws follow the distribution they claim, seeds hold in any batch."""

import dataclasses
import math

import pytest
import torch

from rgemma.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    apply_temperature,
    min_p_filter,
    top_k_filter,
    top_k_top_p_filter,
    top_p_filter,
)

INF = float("inf")


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def frequencies(logits, params, draws, rows=1000):
    """Empirical token frequencies over `draws` samples, `rows` differently seeded rows at a time."""
    sampler = Sampler([dataclasses.replace(params, seed=seed) for seed in range(rows)], logits.shape[-1])
    batch = logits.expand(rows, -1)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(draws // rows):
        counts += torch.bincount(sampler(batch).tokens, minlength=logits.shape[-1])
    return counts / counts.sum()


def test_greedy_is_the_argmax_and_draws_nothing():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.2, seed=1)
    sampler = Sampler([greedy, greedy, greedy, SamplingParams(seed=1)], 50)
    before = [g.get_state() for g in sampler.generators]
    result = sampler(logits)
    assert torch.equal(result.tokens[:3], logits[:3].argmax(dim=-1))
    assert all(torch.equal(g.get_state(), state) for g, state in zip(sampler.generators[:3], before))
    assert not torch.equal(sampler.generators[3].get_state(), before[3])


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.25]])
    seen = torch.tensor([[True, False, True, False]])
    zeros = torch.zeros(1)
    penalised = apply_penalties(logits, torch.zeros(1, 4, dtype=torch.int32), seen, torch.tensor([2.0]), zeros, zeros)
    # 2.0 / 2 and -1.0 * 2: both seen tokens become less likely.
    assert penalised.tolist() == [[1.0, 1.5, -2.0, -1.25]]

    sampler = Sampler([SamplingParams(temperature=0, repetition_penalty=2.0)], 4)
    sampler.add_context(0, [0])  # the prompt counts for repetition
    assert sampler(logits).tokens.tolist() == [1]


def test_presence_and_frequency_penalties_by_hand():
    counts = torch.tensor([[3, 1, 0]], dtype=torch.int32)
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    no_context = torch.zeros(1, 3, dtype=torch.bool)
    penalised = apply_penalties(logits, counts, no_context, torch.ones(1), torch.tensor([0.5]), torch.tensor([0.25]))
    assert penalised.tolist() == [[2.0 - 0.5 - 0.75, 1.5 - 0.5 - 0.25, 0.0]]

    def greedy_run(steps, **penalty):
        sampler = Sampler([SamplingParams(temperature=0, **penalty)], 3)
        sampler.add_context(0, [0, 0, 0])  # the prompt does not count for these two
        return [sampler(logits).tokens.item() for _ in range(steps)]

    # presence: 2.0 -> 1.0 after token 0 is generated once, and stays there.
    assert greedy_run(4, presence_penalty=1.0) == [0, 1, 0, 0]
    # frequency 0.3: token 0 goes 2.0, 1.7, 1.4; token 1 (1.5) wins at the third step.
    assert greedy_run(4, frequency_penalty=0.3) == [0, 0, 1, 0]


def test_temperature_matches_softmax_of_scaled_logits():
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(3)) * 2
    for temperature in (0.7, 2.0):
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        observed = frequencies(logits, SamplingParams(temperature=temperature), draws=20_000)
        assert (observed - expected).abs().max() < 0.015, (temperature, observed, expected)


def test_top_k_keeps_exactly_k():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(1)) * 0.1  # nearly flat
    top = set(logits[0].topk(5).indices.tolist())
    filtered = top_k_filter(logits, torch.tensor([5]))
    assert set(filtered[0].isfinite().nonzero()[:, 0].tolist()) == top
    observed = frequencies(logits, SamplingParams(top_k=5), draws=5000)
    assert set(observed.nonzero()[:, 0].tolist()) == top


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.07, 0.35, 0.1, 0.25, 0.08, 0.15])
    logits = probs.log()[None]
    # Sorted: 0.35, 0.25, 0.15 reach 0.75 >= 0.7; 0.35 + 0.25 = 0.6 does not.
    kept = [1, 3, 5]
    filtered = top_p_filter(logits, torch.tensor([0.7]))
    assert filtered[0].isfinite().nonzero()[:, 0].tolist() == kept
    observed = frequencies(logits, SamplingParams(top_p=0.7), draws=20_000)
    expected = torch.zeros(6)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert (observed - expected).abs().max() < 0.015, (observed, expected)


def test_top_p_applies_to_the_renormalised_top_k():
    logits = logits_of([[0.4, 0.3, 0.2, 0.1]])
    # Alone, top-p 0.5 keeps two tokens (mass before the second is 0.4);
    # after top-k 2 the first token holds 0.4 / 0.7 > 0.5, so it stays alone.
    assert top_p_filter(logits, torch.tensor([0.5]))[0].isfinite().sum() == 2
    assert top_k_top_p_filter(logits, torch.tensor([2]), torch.tensor([0.5]))[0].isfinite().sum() == 1


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([0.3, 0.06, 0.5, 0.04, 0.1])
    logits = probs.log()[None]
    kept = [0, 2, 4]  # threshold 0.15 * 0.5 = 0.075
    assert min_p_filter(logits, torch.tensor([0.15]))[0].isfinite().nonzero()[:, 0].tolist() == kept
    observed = frequencies(logits, SamplingParams(min_p=0.15), draws=20_000)
    expected = torch.zeros(5)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert (observed - expected).abs().max() < 0.015, (observed, expected)


def test_filters_that_would_remove_everything_keep_the_best_token():
    logits = logits_of([[0.2, 0.7, 0.1]])
    sampler = Sampler(
        [
            SamplingParams(top_p=1e-6, seed=0),
            SamplingParams(min_p=0.99, seed=0),
            SamplingParams(top_k=1000, top_p=1e-6, min_p=0.5, seed=0),  # top_k beyond V
        ],
        3,
    )
    for _ in range(50):
        assert sampler(logits.expand(3, -1)).tokens.tolist() == [1, 1, 1]


def test_extreme_inputs_give_valid_tokens():
    logits = torch.tensor([[-INF, 2.9, -INF, 3.0, -INF]])
    # 3.0 / 1e-40 overflows float32: the maximum must be shifted to 0 first.
    tiny = 1e-40
    for params in (SamplingParams(seed=0), SamplingParams(temperature=tiny, seed=0), SamplingParams(top_k=4, seed=0)):
        tokens = {Sampler([params], 5)(logits).tokens.item() for _ in range(200)}
        assert tokens <= {1, 3}, params
    assert {Sampler([SamplingParams(temperature=tiny, top_p=0.9, seed=s)], 5)(logits).tokens.item() for s in range(50)} == {3}
    assert torch.softmax(apply_temperature(logits, torch.tensor([tiny])), dim=-1).tolist() == [[0, 0, 0, 1, 0]]


def test_top_p_1_keeps_a_whole_large_vocabulary():
    # The float32 cumulative sum over 256k probabilities passes 1 well before the end.
    logits = torch.randn(2, 256_000, generator=torch.Generator().manual_seed(0)) * 3
    assert top_p_filter(logits, torch.tensor([1.0, 1.0])).isfinite().all()


def test_a_seed_gives_the_same_tokens_in_any_batch():
    vocab = 30
    generator = torch.Generator().manual_seed(5)
    steps = [torch.randn(5, vocab, generator=generator) for _ in range(12)]
    seeded = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, frequency_penalty=0.5, repetition_penalty=1.3, seed=7)

    alone = Sampler([seeded], vocab)
    alone.add_context(0, [1, 2, 3])
    reference = [alone(step[1:2]).tokens.item() for step in steps]

    batch = Sampler([SamplingParams(temperature=1.5), seeded, SamplingParams(temperature=0)], vocab)
    batch.add_context(1, [1, 2, 3])
    tokens = [batch(step[:3]).tokens[1].item() for step in steps[:4]]
    batch.select([1, 2])  # the first row finishes
    tokens += [batch(step[1:3]).tokens[0].item() for step in steps[4:8]]
    joining = Sampler([SamplingParams(seed=99), SamplingParams(min_p=0.1)], vocab)
    batch = Sampler.merge([joining, batch])  # new rows join in front
    tokens += [batch(step[[3, 4, 1, 2]]).tokens[2].item() for step in steps[8:]]
    assert tokens == reference

    other_seed = Sampler([SamplingParams(temperature=0.9, seed=8)], vocab)
    assert [other_seed(step[1:2]).tokens.item() for step in steps] != reference


def test_logprobs_are_those_of_the_penalised_logits_at_temperature_1():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    sampler = Sampler(
        [
            SamplingParams(temperature=0.5, top_k=5, logprobs=4, seed=0),
            SamplingParams(temperature=0, presence_penalty=1.0, logprobs=2),
            SamplingParams(seed=1),
        ],
        40,
    )
    sampler(logits)  # the greedy row's argmax is now penalised
    result = sampler(logits)
    penalised = logits.clone()
    penalised[1, logits[1].argmax()] -= 1.0
    expected = torch.log_softmax(penalised, dim=-1)
    torch.testing.assert_close(result.logprobs, expected.gather(1, result.tokens[:, None])[:, 0])
    assert result.logprobs.dtype == torch.float32
    for row, n in enumerate((4, 2, 0)):
        top = result.top_logprobs[row]
        assert len(top) == n
        values = [value for _, value in top]
        assert values == sorted(values, reverse=True)
        assert [token for token, _ in top] == expected[row].topk(n).indices.tolist()
        torch.testing.assert_close(torch.tensor(values), expected[row].topk(n).values)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", math.inf),
        ("logprobs", -1),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got {value}$"):
        SamplingParams(**{field: value})


def test_logits_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="shape"):
        Sampler([SamplingParams()], 10)(torch.zeros(2, 10))
