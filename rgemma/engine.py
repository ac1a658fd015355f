"""The generation engine: long-lived, requests join and leave at every step.

One engine serves every front end (`rgemma generate`, `chat`, `bench`, the
server); it knows nothing of HTTP. `add(request)` queues a request and
returns its id, `cancel(id)` drops it at once, and each `step()` does one
tick of work and returns the events it produced:
- prompt chunks of the requests still reading their prompts, oldest
  first: while requests run, one chunk (a forward) per tick, so that a
  running request waits at most one forward between its tokens, however
  many prompts arrive at once (each forward, however short, is a whole
  pass over the weights: fifteen 32-token prompts of a 2b model read in one
  tick once held running streams for 12 s); while none runs, about one
  chunk's worth of tokens in all (many short prompts join in one tick).
  A request is prefilled alone, in chunks whose ends fall on multiples of
  the chunk size in its absolute positions, so the products it runs never
  depend on what else is queued or running; its first token is sampled
  when the prompt is read. A request may name more chunk ends (`breaks`,
  a chat's turn boundaries) and ask for a snapshot of its Context after
  each chunk: a request that later starts from such a snapshot runs the
  same products from there as one that read the whole prompt itself, so
  the two give the same tokens (the server's prefix cache rests on this);
- one decode step of every running request, in one batch.

Running requests live in the rows of a pool of states (`slots`): rows 0..n-1
are the running ones, so a decode step reads a prefix view of the pool. A
request joins by copying its one-row state into row n and leaves by moving
the last row into its place: nothing else is copied. The pool doubles when
full, up to `max_batch` rows.

A request's tokens do not depend on what else runs: each row of a decode
step is computed on its own (the native CPU step and the plain forward
alike), and each request samples from its own generator.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from rgemma.backends import Backend, prepare
from rgemma.context import Context
from rgemma.model import Griffin, prefill_chunk
from rgemma.sampling import Sampler, SamplingParams
from rgemma.state import State


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 256
    stop: Sequence[str] = ()
    stop_tokens: Sequence[int] = ()  # more token ids that end the request, besides the model's end tokens
    ignore_eos: bool = False  # the model's end tokens do not end it (benchmarks: exactly max_tokens)
    keep_context: bool = False  # read the last token too and keep the request's Context
    # Prompt offsets where a prefill chunk must end (a chat's turn boundaries): a snapshot taken
    # there is the state a later request starting from it would have computed itself.
    breaks: Sequence[int] = ()

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be at least 0 (0: read the prompt only), got {self.max_tokens}")
        bad = [b for b in self.breaks if not 0 < b <= len(self.prompt)]
        if bad:
            raise ValueError(f"break {bad[0]} is not an offset within the prompt of {len(self.prompt)} tokens")


@dataclasses.dataclass
class Event:
    request: int  # the id `Engine.add` returned
    token: int
    text: str  # new text; stop strings and stop tokens are never emitted
    logprob: float
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"


@dataclasses.dataclass
class Timing:
    """One request's clock, in seconds from `time.perf_counter`."""

    added: float
    prompt_tokens: int
    prefilled: float | None = None  # when its prompt was read
    first_token: float | None = None
    last_token: float | None = None
    generated_tokens: int = 0


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


@dataclasses.dataclass
class _Sequence:
    """A request in flight: its prompt still to read, its output so far, and its place in the pool."""

    id: int
    request: Request
    state: State | None  # its own one-row state while it reads its prompt; None once in the pool
    logits: torch.Tensor | None  # (1, V) next-token logits of a context it continues
    unread: list[int]  # prompt tokens not read yet
    position: int  # the absolute position of its next prompt token, for aligning prefill chunks
    breaks: list[int]  # absolute positions where a prefill chunk must end
    tokens: list[int]  # the context's tokens, the prompt, then each generated token
    read: int  # how many of `tokens` the state has read
    sampler: Sampler | None
    detokenizer: object
    stops: StopStrings
    timing: Timing
    progress: Callable[[int], None] | None
    snapshot: Callable[[Context], None] | None
    produced: int = 0
    next_token: int | None = None  # sampled, to be read at the next decode step
    finishing: bool = False  # finished; reads its last token only to keep its context


class Engine:
    """add / cancel / step over a pool of state slots; see the module docstring.

    `contexts[id]` holds the final Context of each finished request that
    asked for it (keep_context); `timings[id]` each finished request's clock.
    """

    def __init__(self, model: Griffin, tokenizer=None, backend: Backend | None = None, max_batch: int = 64,
                 chunk_size: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend or prepare(model)
        self.max_batch = max_batch
        self.chunk_size = chunk_size or prefill_chunk(model.device)
        eos = tokenizer.eos_id if tokenizer is not None else 1
        turn_end = getattr(tokenizer, "end_of_turn_id", None)
        # -it models end their turn with <end_of_turn>; base models never produce it.
        self.end_tokens = {eos} | ({turn_end} if turn_end is not None else set())
        self.contexts: dict[int, Context] = {}
        self.timings: dict[int, Timing] = {}
        self._next_id = 0
        self._waiting: deque[_Sequence] = deque()  # still reading their prompts, oldest first
        self._running: list[_Sequence] = []  # row i of the pool is _running[i]
        self._pool: State | None = None
        self._views: dict[int, State] = {}  # rows 0..n-1 of the pool, one State object per n
        self._sampler: Sampler | None = None  # the running rows', in pool order

    # Requests ---------------------------------------------------------------------

    def add(self, request: Request, context: Context | None = None,
            progress: Callable[[int], None] | None = None,
            snapshot: Callable[[Context], None] | None = None) -> int:
        """Queue a request, continuing `context` (one row, not changed) if given; returns its id.

        `progress` is told how many prompt tokens each prefill chunk read;
        `snapshot` is given a copy of the request's Context after each chunk
        (at aligned boundaries, at breaks and at the prompt's end).
        A request with max_tokens 0 only reads its prompt.
        """
        if request.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if context is not None and context.batch_size != 1:
            raise ValueError(f"a request continues a context of one row, not {context.batch_size}")
        if not request.prompt and (context is None or context.logits is None):
            raise ValueError("empty prompt: give at least one token to start from")
        vocab = self.model.config.vocab_size
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token {bad[0]} is outside the vocabulary of {vocab}")
        if context is None:
            state, logits, tokens, position = self.model.init_state(1), None, [], 0
        else:
            state, logits, tokens = context.state.clone(), context.logits, list(context.tokens[0])
            position = int(context.state.position[0])
        sequence = _Sequence(
            id=self._next_id, request=request, state=state, logits=logits, unread=list(request.prompt),
            position=position, breaks=[position + b for b in sorted(request.breaks)],
            tokens=tokens + list(request.prompt), read=len(tokens), sampler=None,
            detokenizer=self.tokenizer.detokenizer() if self.tokenizer is not None else None,
            stops=StopStrings(request.stop), timing=Timing(time.perf_counter(), len(request.prompt)),
            progress=progress, snapshot=snapshot,
        )
        self._next_id += 1
        self._waiting.append(sequence)
        return sequence.id

    def cancel(self, request_id: int) -> bool:
        """Drop a request at once, freeing its slot; False if it is not in flight."""
        for sequence in self._waiting:
            if sequence.id == request_id:
                self._waiting.remove(sequence)
                return True
        for row, sequence in enumerate(self._running):
            if sequence.id == request_id:
                self._leave(row)
                return True
        return False

    def in_flight(self, request_id: int) -> bool:
        """Whether the request is still reading its prompt or generating."""
        return any(s.id == request_id for s in self._waiting) or any(s.id == request_id for s in self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def running(self) -> int:
        """Requests in the decode batch."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests still reading their prompts."""
        return len(self._waiting)

    @property
    def capacity(self) -> int:
        """Rows of the state pool (it grows as needed, up to max_batch)."""
        return 0 if self._pool is None else self._pool.batch_size

    # One tick -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Event]:
        """One decode step of the running requests, then prefill chunks; the events of both."""
        running = bool(self._running)
        events = self._decode() if running else []
        # Prompt tokens this tick: one forward while requests run, else about a chunk's worth (the last chunk
        # may pass it: chunks stay aligned).
        budget = 1 if running else self.chunk_size
        while self._waiting and len(self._running) < self.max_batch and budget > 0:
            sequence = self._waiting[0]
            unread = len(sequence.unread)
            events += self._prefill_chunk(sequence)
            budget -= max(1, unread - len(sequence.unread))
        return events

    def _prefill_chunk(self, sequence: _Sequence) -> list[Event]:
        if sequence.unread:
            # The next aligned boundary, or the next break if that comes first.
            end = (sequence.position // self.chunk_size + 1) * self.chunk_size
            end = min([end] + [b for b in sequence.breaks if b > sequence.position])
            chunk = sequence.unread[: end - sequence.position]
            tokens = torch.tensor([chunk], dtype=torch.int64, device=self.model.device)
            hidden, _ = self.model.hidden_states(tokens, state=sequence.state)
            del sequence.unread[: len(chunk)]
            sequence.position += len(chunk)
            sequence.read += len(chunk)
            if sequence.progress is not None:
                sequence.progress(len(chunk))
            if sequence.unread and sequence.snapshot is None:
                return []
            sequence.logits = self.model.logits(hidden[:, -1])
            if sequence.snapshot is not None:
                tokens_read = sequence.tokens[: sequence.read]
                sequence.snapshot(Context(sequence.state.clone(), sequence.logits.clone(), [tokens_read]))
            if sequence.unread:
                return []
        self._waiting.popleft()
        sequence.timing.prefilled = time.perf_counter()
        if sequence.request.max_tokens == 0:
            self.timings[sequence.id] = sequence.timing
            self._finish(sequence, sequence.state, sequence.logits)
            return []
        sequence.sampler = Sampler([sequence.request.sampling], self.model.config.vocab_size, self.model.device)
        sequence.sampler.add_context(0, sequence.tokens)
        event = self._sampled(sequence, sequence.sampler(sequence.logits), 0)
        if sequence.next_token is not None:
            self._join(sequence)
        return [event]

    def _decode(self) -> list[Event]:
        count = len(self._running)
        view = self._view(count)
        tokens = torch.tensor([[s.next_token] for s in self._running], dtype=torch.int64, device=self.model.device)
        logits, _ = self.backend.step(tokens, view)
        # Rows that finished earlier and read their last token only to keep their context.
        read_last = [s.finishing for s in self._running]
        sample = self._sampler(logits)
        events = []
        for row, sequence in enumerate(self._running):
            if not read_last[row]:
                events.append(self._sampled(sequence, sample, row))
        # In reverse, so that the last row, which moves into a freed slot, has been dealt with.
        for row in reversed(range(count)):
            sequence = self._running[row]
            if read_last[row]:
                self._finish(sequence, view.select([row]), logits[row : row + 1])
                self._leave(row)
            elif sequence.next_token is None:  # finished, keeping nothing
                self._leave(row)
        return events

    def _sampled(self, sequence: _Sequence, sample, row: int) -> Event:
        """The event of the token sampled for `sequence` at `row` of `sample`; marks how it goes on."""
        token = int(sample.tokens[row])
        request = sequence.request
        sequence.produced += 1
        now = time.perf_counter()
        timing = sequence.timing
        timing.first_token = timing.first_token or now
        timing.last_token = now
        timing.generated_tokens = sequence.produced
        finish = None
        if token in request.stop_tokens or (token in self.end_tokens and not request.ignore_eos):
            text, finish = sequence.stops.flush(), "stop"
        else:
            detokenizer = sequence.detokenizer
            text, stopped = sequence.stops.feed(detokenizer.add(token) if detokenizer else "")
            if stopped:
                finish = "stop"
            elif sequence.produced == request.max_tokens:
                finish = "length"
                if detokenizer:
                    text += sequence.stops.feed(detokenizer.flush())[0] + sequence.stops.flush()
        sequence.tokens.append(token)
        # Read at the next step, unless finished; a request keeping its context reads its last token too.
        sequence.next_token = token if finish is None or request.keep_context else None
        sequence.finishing = finish is not None and request.keep_context
        if finish is not None:
            self.timings[sequence.id] = timing
        return Event(sequence.id, token, text, float(sample.logprobs[row]), sample.top_logprobs[row], finish)

    def _finish(self, sequence: _Sequence, state: State, logits: torch.Tensor) -> None:
        if sequence.request.keep_context:
            self.contexts[sequence.id] = Context(state.clone(), logits.clone(), [sequence.tokens])

    # Slots ---------------------------------------------------------------------------

    def _view(self, count: int) -> State:
        """Rows 0..count-1 of the pool, as one State object per count (a CUDA graph replays over it)."""
        view = self._views.get(count)
        if view is None:
            view = self._views[count] = self._pool.map(lambda t: t[:count])
        return view

    def _join(self, sequence: _Sequence) -> None:
        row = len(self._running)
        if self._pool is None or row == self._pool.batch_size:
            self._grow(min(self.max_batch, max(1, 2 * row)))
        for slot, value in zip(self._pool.tensors(), sequence.state.tensors()):
            slot[row].copy_(value[0])
        sequence.state = None
        self._running.append(sequence)
        self._sampler = sequence.sampler if self._sampler is None else Sampler.merge([self._sampler, sequence.sampler])
        sequence.sampler = None

    def _grow(self, rows: int) -> None:
        pool = self.model.init_state(rows)
        if self._pool is not None:
            count = len(self._running)
            for new, old in zip(pool.tensors(), self._pool.tensors()):
                new[:count].copy_(old[:count])
        self._pool, self._views = pool, {}

    def _leave(self, row: int) -> None:
        """Free the slot at `row`: the last running row moves into it."""
        last = len(self._running) - 1
        if row != last:
            for slot in self._pool.tensors():
                slot[row].copy_(slot[last])
        self._running[row] = self._running[last]
        self._running.pop()
        order = list(range(last + 1))
        order[row] = last
        self._sampler.select(order[:last])
        if not self._running:
            self._sampler = None
