"""Running a set of requests to the end on an engine: the convenience every front end uses.

`Generation` adds its requests to a long-lived `Engine` (rgemma/engine.py)
and yields, at each step, the events of the requests still running, indexed
as the requests were given. `prefill` reads prompts into a Context without
generating (to save a state after a document, say).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from rgemma.context import Context
from rgemma.engine import Engine, Event, Request
from rgemma.model import Griffin


def prefill(
    model: Griffin,
    prompts: Sequence[Sequence[int]],
    context: Context | None = None,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Context:
    """Append each prompt to its row of `context` (or to a fresh one): left-padded, read in chunks.

    The context is updated in place and returned.
    """
    if not prompts:
        raise ValueError("no prompts: give at least one")
    if context is None:
        context = Context.empty(model, len(prompts))
    if len(prompts) != context.batch_size:
        raise ValueError(f"{len(prompts)} prompts for a context of {context.batch_size} rows")
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    if width == 0:
        if context.logits is None:
            raise ValueError("empty prompt: give at least one token to start from")
        return context
    device = model.device
    tokens = torch.zeros(len(prompts), width, dtype=torch.int64)
    positions = torch.full((len(prompts), width), -1, dtype=torch.int64)  # -1: left padding
    start = context.state.position.cpu()
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt) :] = torch.as_tensor(prompt)
            positions[row, width - len(prompt) :] = start[row] + torch.arange(len(prompt))
    vocab = model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:  # the embedding would fail with a bare IndexError
        raise ValueError(f"a prompt holds token ids outside the model's vocabulary [0, {vocab})")
    logits, context.state = model.prefill(tokens.to(device), positions.to(device), context.state, chunk_size, progress)
    empty = [row for row, n in enumerate(lengths) if n == 0]
    if empty:
        if context.logits is None:
            raise ValueError(f"empty prompt for row {empty[0]} of a context that has read nothing")
        logits[empty] = context.logits[empty]
    context.logits = logits
    for row, prompt in enumerate(prompts):
        context.tokens[row].extend(prompt)
    return context


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    first_token_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # from the first token to the last
    state_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0


class Generation:
    """Iterate to get, at each step that produced any, the events of the requests, `event.request` being the
    index of its request in `requests`.

    The requests continue the rows of `context` if given (not changed). Once
    the iteration ends, `contexts[i]` holds the final Context of each request
    that asked for it (keep_context), and `stats` the timings of them all.
    """

    def __init__(
        self,
        engine: Engine,
        requests: Sequence[Request],
        context: Context | None = None,
        prefill_progress: Callable[[int], None] | None = None,
    ):
        if not requests:
            raise ValueError("no requests")
        if context is not None and context.batch_size != len(requests):
            raise ValueError(f"{len(requests)} requests for a context of {context.batch_size} rows")
        self.engine = engine
        self.requests = list(requests)
        self.context = context
        self.prefill_progress = prefill_progress
        self.contexts: dict[int, Context] = {}
        self.stats = Stats()

    def __iter__(self) -> Iterator[list[Event]]:
        engine = self.engine
        started = time.perf_counter()
        index = {}
        for i, request in enumerate(self.requests):
            row = None if self.context is None else self.context.select([i])
            index[engine.add(request, row, progress=self.prefill_progress)] = i
        self.stats.prompt_tokens = sum(len(r.prompt) for r in self.requests)
        self.stats.state_bytes = engine.model.init_state(1).nbytes
        while any(engine.in_flight(id_) for id_ in index):
            events = [dataclasses.replace(e, request=index[e.request]) for e in engine.step() if e.request in index]
            if events:
                yield events
        timings = [engine.timings.pop(id_) for id_ in index]
        for id_, i in index.items():
            if id_ in engine.contexts:
                self.contexts[i] = engine.contexts.pop(id_)
        self.stats.prefill_seconds = max(t.prefilled for t in timings) - started
        self.stats.first_token_seconds = min(t.first_token for t in timings) - started
        self.stats.generated_tokens = sum(t.generated_tokens for t in timings)
        self.stats.decode_seconds = max(t.last_token for t in timings) - min(t.first_token for t in timings)
