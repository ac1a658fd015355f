"""Choosing the next token: small pure filters on logits, and a batched sampler with per-row settings.

Every row of a batch may belong to a different request, so each filter takes
logits (B, V) and one parameter per row (B,), and returns logits with the
filtered entries set to -inf. The sampler applies them in this order:

    penalties -> temperature -> top-k -> top-p -> min-p -> sample

Rows with temperature 0 take the argmax of the penalised logits; the filters
do not change it, and they draw no random numbers. Each row draws its noise
from its own torch.Generator, so a seeded request yields the same tokens
whatever else shares its batch.

What counts for the penalties:
- repetition (CTRL, arXiv 1909.05858): every token seen, prompt and
  generated alike (`Sampler.add_context` registers the prompt). It guards
  against loops, and copying the prompt back is such a loop.
- presence and frequency (OpenAI semantics): generated tokens only; they
  steer what the model writes, not what it was given.

Reported log-probabilities are those of the penalised logits at temperature 1,
before any filtering: the model's own distribution, as the request saw it.
Temperature and the filters only decide how to draw from it; folding them in
would give greedy rows a probability of 1 and every filtered alternative -inf,
and make the numbers of two requests with different settings incomparable.

Shapes: B batch (rows), V vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # in (0, 1]; 1 disables
    min_p: float = 0.0  # in [0, 1); drop tokens with p < min_p * p_max
    repetition_penalty: float = 1.0  # > 0; seen tokens: logit / r if logit > 0 else logit * r
    presence_penalty: float = 0.0  # subtracted once from every generated token
    frequency_penalty: float = 0.0  # subtracted once per occurrence of a generated token
    seed: int | None = None  # None: fresh entropy
    logprobs: int = 0  # how many top alternatives to report per token

    def __post_init__(self):
        checks = [
            ("temperature", 0 <= self.temperature < math.inf, "a finite number >= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", 0 < self.repetition_penalty < math.inf, "a finite number > 0"),
            ("presence_penalty", math.isfinite(self.presence_penalty), "finite"),
            ("frequency_penalty", math.isfinite(self.frequency_penalty), "finite"),
            ("logprobs", self.logprobs >= 0, ">= 0"),
        ]
        for name, ok, requirement in checks:
            if not ok:  # comparisons with NaN are False, so NaN lands here too
                raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)!r}")


@dataclasses.dataclass
class SampleResult:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) float32 log p of each chosen token (see the module docstring)
    top_logprobs: list[list[tuple[int, float]]]  # per row its params.logprobs most likely (token, log p), best first


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    in_context: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """counts (B, V): generated occurrences; in_context (B, V) bool: tokens of the prompt."""
    seen = in_context | (counts > 0)
    r = repetition[:, None]
    # Dividing a positive logit and multiplying a negative one both make the token less likely (for r > 1).
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / T per row; rows with T = 0 (greedy) are only shifted."""
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]
    # Shift each row's maximum to 0 first: a tiny T then sends the others
    # towards -inf, never the maximum to +inf (which would make softmax NaN).
    return (logits - logits.amax(dim=-1, keepdim=True)) / t


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k most likely tokens (0: all), then the smallest of
    those whose renormalised mass reaches top_p (1: all). One sort serves both."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = top_k[:, None]
    drop = (k > 0) & (rank >= k)
    probs = sorted_logits.masked_fill(drop, NEG_INF).softmax(dim=-1)
    # The most likely token has mass 0 before it, so it always stays (p > 0).
    mass_before = probs.cumsum(dim=-1) - probs
    # p = 1 must keep everything, even where rounding lets the cumulative sum pass 1.
    p = top_p[:, None]
    drop |= (p < 1) & (mass_before >= p)
    return logits.masked_fill(torch.empty_like(drop).scatter_(-1, order, drop), NEG_INF)


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    return top_k_top_p_filter(logits, top_k, torch.ones_like(top_k, dtype=logits.dtype))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return top_k_top_p_filter(logits, torch.zeros_like(top_p, dtype=torch.int64), top_p)


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max; compared as logits, so no softmax is needed."""
    # log(0) = -inf: min_p = 0 drops nothing.
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return logits.masked_fill(logits < threshold, NEG_INF)


class Sampler:
    """Samples one token per row from logits (B, V) with per-row parameters.

    Holds each row's generator and the token counts its penalties need; rows
    leave with `select` and join with `merge`, taking both along.
    """

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str | None = None):
        self.vocab_size = vocab_size
        self.device = torch.device(device or "cpu")
        params = list(params)
        shape = (len(params), vocab_size)
        self._assign(
            params,
            [self._generator(p.seed) for p in params],
            counts=torch.zeros(shape, dtype=torch.int32, device=self.device),
            in_context=torch.zeros(shape, dtype=torch.bool, device=self.device),
        )

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def _assign(self, params: list[SamplingParams], generators: list[torch.Generator], counts, in_context):
        """Set the rows, and the per-row tensors and host-side flags derived from their params."""
        self.params = params
        self.generators = generators
        self.counts = counts  # (B, V) int32 generated occurrences (presence, frequency, repetition)
        self.in_context = in_context  # (B, V) bool prompt tokens (repetition only)

        def column(name, dtype=torch.float32):
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=self.device)

        self._temperature = column("temperature")
        self._top_k = column("top_k", torch.int64)
        self._top_p = column("top_p")
        self._min_p = column("min_p")
        self._repetition = column("repetition_penalty")
        self._presence = column("presence_penalty")
        self._frequency = column("frequency_penalty")
        self._greedy = self._temperature == 0
        # Decided on the host, so a step never waits on the device to skip work.
        sampled = [p for p in params if p.temperature > 0]
        self._sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
        self._any_top_k_top_p = any(p.top_k > 0 or p.top_p < 1 for p in sampled)
        self._any_min_p = any(p.min_p > 0 for p in sampled)
        self._any_penalty = any(
            p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params
        )
        self._max_logprobs = max((p.logprobs for p in params), default=0)

    @property
    def batch_size(self) -> int:
        return len(self.params)

    def add_context(self, row: int, tokens: Sequence[int]) -> None:
        """Mark tokens the row has read (its prompt); only the repetition penalty counts them."""
        index = torch.as_tensor(tokens, dtype=torch.int64, device=self.device)
        self.in_context[row, index] = True

    def __call__(self, logits: torch.Tensor) -> SampleResult:
        if logits.shape != (self.batch_size, self.vocab_size):
            raise ValueError(f"expected logits of shape {(self.batch_size, self.vocab_size)}, got {tuple(logits.shape)}")
        logits = logits.float()
        if self._any_penalty:
            logits = apply_penalties(
                logits, self.counts, self.in_context, self._repetition, self._presence, self._frequency
            )
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        if self._sampled_rows:
            tokens = torch.where(self._greedy, tokens, self._sample(logits))
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        # A NaN or +inf logit makes its row's log-probabilities NaN: checked on the (B,) chosen ones, so that
        # a broken model or config stops with an error instead of emitting arbitrary tokens.
        if not bool(torch.isfinite(chosen).all()):
            row = int((~torch.isfinite(chosen)).nonzero()[0])
            raise ValueError(f"the model gave NaN or infinite logits (batch row {row}): its weights or config "
                             "are broken")
        if self._any_penalty:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32))
        return SampleResult(
            tokens=tokens,
            logprobs=chosen,
            top_logprobs=self._top_logprobs(logprobs),
        )

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One draw per row from softmax of the filtered logits; greedy rows' results are meaningless."""
        logits = apply_temperature(logits, self._temperature)
        if self._any_top_k_top_p:
            logits = top_k_top_p_filter(logits, self._top_k, self._top_p)
        if self._any_min_p:
            logits = min_p_filter(logits, self._min_p)
        uniform = torch.zeros_like(logits)
        for row in self._sampled_rows:
            uniform[row].uniform_(generator=self.generators[row])
        # Exponential race: with E_i = -log U_i ~ Exp(1), argmax p_i / E_i is
        # distributed as p; in logs, argmax logit_i - log E_i (the Gumbel-max
        # trick). U = 0 gives -inf there: that token is skipped, never NaN.
        return (logits - torch.log(-torch.log(uniform))).argmax(dim=-1)

    def _top_logprobs(self, logprobs: torch.Tensor) -> list[list[tuple[int, float]]]:
        if not self._max_logprobs:
            return [[] for _ in self.params]
        values, indices = logprobs.topk(min(self._max_logprobs, self.vocab_size), dim=-1)
        values, indices = values.tolist(), indices.tolist()  # one transfer for the whole batch
        return [list(zip(indices[i], values[i]))[: p.logprobs] for i, p in enumerate(self.params)]

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order."""
        rows = list(rows)
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        self._assign(
            [self.params[r] for r in rows],
            [self.generators[r] for r in rows],
            counts=self.counts.index_select(0, index),
            in_context=self.in_context.index_select(0, index),
        )

    @staticmethod
    def merge(samplers: Sequence[Sampler]) -> Sampler:
        """Concatenate the rows of several samplers; the result takes over their generators."""
        if not samplers:
            raise ValueError("merge needs at least one sampler")
        first = samplers[0]
        for other in samplers[1:]:
            if other.vocab_size != first.vocab_size or other.device != first.device:
                raise ValueError(
                    f"cannot merge samplers over vocabularies {first.vocab_size} on {first.device} "
                    f"and {other.vocab_size} on {other.device}"
                )
        merged = copy.copy(first)
        merged._assign(
            [p for s in samplers for p in s.params],
            [g for s in samplers for g in s.generators],
            counts=torch.cat([s.counts for s in samplers]),
            in_context=torch.cat([s.in_context for s in samplers]),
        )
        return merged
