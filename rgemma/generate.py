"""The generation engine: chunked prefill of any prompt, then one token per step.

One piece of code for every front end: the CLI, the chat, the server and the
benchmark all iterate over a `Generation`, which yields, at each step, one
`Event` per row still running. Each row stops on its own (stop tokens, stop
strings, its token budget) and leaves the batch, so the others run on.

A `Context` is where sequences stand: the fixed-size model state, the logits
for their next token and the tokens read so far. It can be cloned, split,
merged, saved to a file and continued from, giving exactly the tokens an
uninterrupted run gives.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from rgemma.decode import DecodeStep
from rgemma.model import Griffin
from rgemma.sampling import Sampler, SamplingParams
from rgemma.state import State, StateFileError, load_state, save_state


@dataclasses.dataclass
class Context:
    state: State
    logits: torch.Tensor | None  # (B, V) float32 logits of each row's next token; None before any token
    tokens: list[list[int]]  # per row, every token read so far

    @classmethod
    def empty(cls, model: Griffin, batch_size: int) -> Context:
        return cls(model.init_state(batch_size), None, [[] for _ in range(batch_size)])

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def clone(self) -> Context:
        logits = None if self.logits is None else self.logits.clone()
        return Context(self.state.clone(), logits, [list(t) for t in self.tokens])

    def select(self, rows: Sequence[int]) -> Context:
        logits = None if self.logits is None else self.logits[list(rows)]
        return Context(self.state.select(rows), logits, [list(self.tokens[r]) for r in rows])

    @classmethod
    def merge(cls, contexts: Sequence[Context]) -> Context:
        if len({c.logits is None for c in contexts}) > 1:
            raise ValueError("cannot merge contexts that have read tokens with ones that have not")
        logits = None if contexts[0].logits is None else torch.cat([c.logits for c in contexts])
        return cls(State.merge([c.state for c in contexts]), logits, [t for c in contexts for t in c.tokens])

    def save(self, path: str | os.PathLike, model: Griffin) -> None:
        """A safetensors file naming the model and each row's position; written atomically."""
        if self.logits is None:
            raise ValueError("an empty context has nothing to save")
        lengths = torch.tensor([len(t) for t in self.tokens])
        tokens = torch.tensor([token for row in self.tokens for token in row], dtype=torch.int64)
        save_state(path, self.state, model, extras={"logits": self.logits, "lengths": lengths, "tokens": tokens},
                   metadata={"tokens_read": str(lengths.tolist())})

    @classmethod
    def load(cls, path: str | os.PathLike, model: Griffin) -> Context:
        state, extras, _ = load_state(path, model)
        if not {"logits", "lengths", "tokens"} <= extras.keys():
            raise StateFileError(f"{path}: a state file without the generation context (logits, tokens)")
        rows = torch.split(extras["tokens"], extras["lengths"].tolist())
        return cls(state, extras["logits"].to(model.device), [r.tolist() for r in rows])


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


class StopStrings:
    """Holds back text that might be the start of a stop string, and cuts the text at the first one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New text -> (text safe to emit, whether a stop string was reached)."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 256
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    keep_context: bool = False  # read the last token too and keep the row's Context

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


@dataclasses.dataclass
class Event:
    request: int  # index of the request in the Generation
    token: int
    text: str  # new text; stop strings and stop tokens are never emitted
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"


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
    """Iterate to get, at each step, the list of events of the rows still running.

    Once the iteration ends, `contexts[i]` holds the final Context of each
    request that asked for it (keep_context), and `stats` the timings.
    """

    def __init__(
        self,
        model: Griffin,
        requests: Sequence[Request],
        tokenizer=None,
        context: Context | None = None,
        prefill_progress: Callable[[int], None] | None = None,
    ):
        if not requests:
            raise ValueError("no requests")
        if tokenizer is None and any(r.stop for r in requests):
            raise ValueError("stop strings need a tokenizer")
        self.model = model
        self.requests = list(requests)
        self.tokenizer = tokenizer
        self.context = context
        self.prefill_progress = prefill_progress
        self.contexts: dict[int, Context] = {}
        self.stats = Stats()
        self.decode_step = DecodeStep(model)
        eos = tokenizer.eos_id if tokenizer is not None else 1
        turn_end = getattr(tokenizer, "end_of_turn_id", None)
        # -it models end their turn with <end_of_turn>; base models never produce it.
        self.stop_tokens = {eos} | ({turn_end} if turn_end is not None else set())

    @torch.no_grad()
    def __iter__(self) -> Iterator[list[Event]]:
        started = time.perf_counter()
        context = prefill(self.model, [r.prompt for r in self.requests], self.context,
                          progress=self.prefill_progress)
        self.stats.prompt_tokens = sum(len(r.prompt) for r in self.requests)
        self.stats.prefill_seconds = time.perf_counter() - started
        self.stats.state_bytes = context.state.nbytes // context.batch_size

        sampler = Sampler([r.sampling for r in self.requests], self.model.config.vocab_size, device=self.model.device)
        for row, tokens in enumerate(context.tokens):
            sampler.add_context(row, tokens)
        detokenizers = [self.tokenizer.detokenizer() if self.tokenizer else None for _ in self.requests]
        stops = [StopStrings(r.stop) for r in self.requests]
        produced = [0] * len(self.requests)
        active = list(range(len(self.requests)))  # request index of each batch row
        state, logits = context.state, context.logits
        history = context.tokens

        while active:
            sample = sampler(logits)
            chosen = sample.tokens.tolist()
            if self.stats.generated_tokens == 0:
                self.stats.first_token_seconds = time.perf_counter() - started
            events = []
            for row, index in enumerate(active):
                request, token = self.requests[index], chosen[row]
                produced[index] += 1
                self.stats.generated_tokens += 1
                finish = None
                if token in self.stop_tokens and not request.ignore_eos:
                    text, finish = stops[index].flush(), "stop"
                else:
                    new_text = detokenizers[index].add(token) if detokenizers[index] else ""
                    text, stopped = stops[index].feed(new_text)
                    if stopped:
                        finish = "stop"
                    elif produced[index] == request.max_tokens:
                        finish = "length"
                        if detokenizers[index]:
                            text += stops[index].feed(detokenizers[index].flush())[0] + stops[index].flush()
                if request.keep_context:
                    history[row].append(token)
                events.append(Event(index, token, text, float(sample.logprobs[row]), sample.top_logprobs[row], finish))
            yield events

            # Read the sampled tokens of the rows that go on, and of finished rows that keep their context.
            feed = [row for row, e in enumerate(events) if e.finish_reason is None or self.requests[e.request].keep_context]
            if not feed:
                break
            if len(feed) < len(events):
                state, history, events = state.select(feed), [history[r] for r in feed], [events[r] for r in feed]
                sampler.select(feed)
            step = torch.tensor([e.token for e in events], dtype=torch.int64, device=self.model.device)[:, None]
            logits, state = self.decode_step(step, state)
            for row, event in enumerate(events):
                if event.finish_reason:
                    self.contexts[event.request] = Context(state.select([row]), logits[row : row + 1], [history[row]])
            going_on = [row for row, e in enumerate(events) if e.finish_reason is None]
            if len(going_on) < len(events):
                state, logits, history = state.select(going_on), logits[going_on], [history[r] for r in going_on]
                sampler.select(going_on)
            active = [events[row].request for row in going_on]
        self.stats.decode_seconds = time.perf_counter() - started - self.stats.first_token_seconds
