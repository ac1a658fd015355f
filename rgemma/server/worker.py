"""The thread that owns the engine: jobs come in, each choice's events go out. It knows no HTTP.

One thread steps the engine, so requests join and leave the decode batch at
every step and long prompts are read a chunk per tick between decode steps
(rgemma/engine.py). The event loop talks to it through a command queue, and
it answers each job through `Job.send`, which the HTTP layer points at an
asyncio queue. Native calls release the GIL, so the event loop keeps
serving while a step runs.

Jobs are handed to the engine once it has read every earlier prompt, so a
job finds in the prefix cache the snapshots of all of them (jobs that
arrive together do not see each other's). A job
of n choices reads its prompt once, then forks: choice i continues a copy of
the state after the prompt.

After a chat reply, the worker reads ahead, as a job of its own, the reply's
turn as the client will send it back (re-rendered from the reply's text), so
that the next turn of the conversation finds everything before its new
message in the cache.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

from rgemma.context import Context
from rgemma.engine import Engine, Event, Request
from rgemma.sampling import SamplingParams
from rgemma.server.metrics import Metrics
from rgemma.server.prefix_cache import PrefixCache, Snapshot, chunk_ends, prefix_keys


@dataclasses.dataclass
class Started:
    cached_tokens: int  # prompt tokens taken from the prefix cache


@dataclasses.dataclass
class Token:
    choice: int
    event: Event


@dataclasses.dataclass
class Done:
    pass


@dataclasses.dataclass
class Failed:
    message: str


@dataclasses.dataclass(eq=False)
class Job:
    """One API request: a choice per SamplingParams, all continuing one prompt (none: read it only)."""

    prompt: list[int]
    sampling: list[SamplingParams]
    max_tokens: int = 16
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    breaks: list[int] = dataclasses.field(default_factory=list)  # turn ends within the prompt
    # Chat: the ids and turn ends of the conversation with choice 0's reply appended.
    follow_up: Callable[[str], tuple[list[int], list[int]]] | None = None
    send: Callable[[object], None] = lambda update: None  # given Started, Token..., then Done or Failed
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    # Kept by the worker.
    cached_tokens: int = 0
    queued: bool = True
    unfinished: int = 0
    engine_ids: set[int] = dataclasses.field(default_factory=set)
    last_token: dict[int, float] = dataclasses.field(default_factory=dict)  # per choice, when it came
    reply: list[str] = dataclasses.field(default_factory=list)  # choice 0's text, for follow_up


class Worker:
    def __init__(self, engine: Engine, cache: PrefixCache | None = None, metrics: Metrics | None = None,
                 max_queue: int = 256):
        self.engine = engine
        self.cache = cache if cache is not None and cache.max_bytes > 0 else None
        self.metrics = metrics or Metrics()
        self.max_queue = max_queue
        self.ready = threading.Event()  # the warm-up step has run
        self.settled = threading.Event()  # the warm-up has run, or failed: then `failure` says why
        self.failure: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[Job] = deque()  # submitted, not yet given to the engine
        self._owners: dict[int, tuple[Job, int]] = {}  # engine request id -> (job, choice)
        self._forks: list[tuple[Job, Context]] = []  # jobs whose prompt is read, with the context after it
        self._in_flight: set[Job] = set()  # clients' jobs given to the engine, not done
        self._submitted = 0  # written by the submitting thread only
        self._dequeued = 0  # written by the worker thread only
        self._thread = threading.Thread(target=self._run, name="rgemma-engine", daemon=True)

    # The event loop's side ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._commands.put(None)
        self._thread.join()

    @property
    def queued(self) -> int:
        """Jobs that have not produced their first token yet."""
        return self._submitted - self._dequeued

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        if self.queued >= self.max_queue:
            return False
        self._submitted += 1
        job.unfinished = len(job.sampling)
        self._commands.put(("submit", job))
        return True

    def cancel(self, job: Job) -> None:
        """Drop a job wherever it is; its slots are free after the current step."""
        self._commands.put(("cancel", job))

    # The worker's side ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._warm_up()
        except Exception as error:  # no step can run (a bug, out of memory): the server must not wait on it
            traceback.print_exc(file=sys.stderr)
            self.failure = f"the model's warm-up step failed ({type(error).__name__}: {error})"
            self.settled.set()
            return
        self.ready.set()
        self.settled.set()
        while True:
            idle = not self.engine.has_work and not self._pending
            try:
                while True:
                    command = self._commands.get(block=idle)
                    idle = False
                    if command is None:
                        return
                    self._apply(*command)
            except queue.Empty:
                pass
            try:
                self._admit()
                if self.engine.has_work:
                    self._step()
            except Exception:  # a bug, not bad input (the HTTP layer checks that): say so, serve on
                traceback.print_exc(file=sys.stderr)
                self._drop_everything("internal error while generating; the request was dropped")
            self._measure()

    def _warm_up(self) -> None:
        """Build the native kernels and run a prefill and a decode step before the first request."""
        tokenizer = self.engine.tokenizer
        request_id = self.engine.add(Request([tokenizer.bos_id if tokenizer else 1], max_tokens=2, ignore_eos=True))
        while self.engine.in_flight(request_id):
            self.engine.step()
        self.engine.timings.clear()

    def _apply(self, command: str, job: Job) -> None:
        if command == "submit":
            self._pending.append(job)
            return
        # cancel
        if job in self._pending:
            self._pending.remove(job)
        for request_id in job.engine_ids:
            self.engine.cancel(request_id)
            self._owners.pop(request_id, None)
        job.engine_ids.clear()
        self._in_flight.discard(job)
        self._forks = [(j, c) for j, c in self._forks if j is not job]
        self._dequeue(job)

    def _dequeue(self, job: Job) -> None:
        if job.queued:
            job.queued = False
            self._dequeued += 1

    def _admit(self) -> None:
        """Give the engine the pending jobs once it has read every earlier prompt; after a read-ahead, wait
        until it is read too, for the next turn of its conversation to find it."""
        if self.engine.waiting:
            return
        while self._pending:
            job = self._pending.popleft()
            self._start(job)
            if not job.sampling:
                return

    def _start(self, job: Job) -> None:
        """Look up the longest cached prefix, then read the rest (and fork the choices from it)."""
        ends = chunk_ends(len(job.prompt), job.breaks, self.engine.chunk_size)
        keys = prefix_keys(job.prompt, job.breaks, ends) if self.cache is not None else {}
        cached, snapshot = self.cache.longest(keys) if self.cache is not None else (0, None)
        job.cached_tokens = cached
        context = None if snapshot is None else Context(snapshot.state, snapshot.logits, [job.prompt[:cached]])
        rest = job.prompt[cached:]
        if job.sampling:  # a client's job, not a read-ahead
            self._in_flight.add(job)
            metrics = self.metrics
            (metrics.cache_hits if cached else metrics.cache_misses).inc()
            metrics.cache_hit_tokens.inc(cached)
            metrics.prompt_tokens.inc(len(job.prompt))
            metrics.prefill_tokens.inc(len(rest))
        else:
            self.metrics.cache_warm_tokens.inc(len(rest))
        job.send(Started(cached))
        store = self._store(keys)
        if len(job.sampling) == 1:
            self._add(job, 0, self._request(job, 0, rest, self._breaks(job, cached)), context, store)
        elif rest:
            def snapshot_taken(taken: Context) -> None:
                if store is not None:
                    store(taken)
                if len(taken.tokens[0]) == len(job.prompt) and job.sampling:
                    self._forks.append((job, taken))

            request_id = self.engine.add(Request(rest, max_tokens=0, breaks=self._breaks(job, cached)), context,
                                         snapshot=snapshot_taken)
            job.engine_ids.add(request_id)
        elif job.sampling:
            self._fork(job, context)

    @staticmethod
    def _breaks(job: Job, cached: int) -> list[int]:
        return [b - cached for b in job.breaks if b > cached]

    def _store(self, keys: dict[int, bytes]) -> Callable[[Context], None] | None:
        """What keeps a job's snapshots in the cache (None without a cache: the engine then takes none)."""
        if self.cache is None:
            return None

        def store(taken: Context) -> None:
            key = keys.get(len(taken.tokens[0]))
            if key is not None:
                self.cache.put(key, Snapshot(taken.state, taken.logits))
        return store

    def _add(self, job: Job, choice: int, request: Request, context: Context | None,
             snapshot: Callable[[Context], None] | None = None) -> None:
        request_id = self.engine.add(request, context, snapshot=snapshot)
        self._owners[request_id] = (job, choice)
        job.engine_ids.add(request_id)

    def _fork(self, job: Job, context: Context) -> None:
        """Each choice continues a copy of the state after the prompt (the engine copies it)."""
        for choice in range(len(job.sampling)):
            self._add(job, choice, self._request(job, choice, [], []), context)

    @staticmethod
    def _request(job: Job, choice: int, prompt: list[int], breaks: list[int]) -> Request:
        return Request(prompt, job.sampling[choice], job.max_tokens, job.stop, ignore_eos=job.ignore_eos, breaks=breaks)

    def _drop_everything(self, message: str) -> None:
        """After a failure inside the engine: a fresh engine over the same model; the jobs in it fail."""
        old = self.engine
        self.engine = Engine(old.model, old.tokenizer, backend=old.backend, max_batch=old.max_batch,
                             chunk_size=old.chunk_size)
        self._owners.clear()
        self._forks.clear()
        for job in self._in_flight:
            self._dequeue(job)
            job.send(Failed(message))
        self._in_flight.clear()

    def _step(self) -> None:
        events = self.engine.step()
        self.engine.timings.clear()  # the worker keeps its own clock
        forks, self._forks = self._forks, []
        for job, context in forks:
            self._fork(job, context)
        now = time.perf_counter()
        for event in events:
            self._deliver(event, now)

    def _deliver(self, event: Event, now: float) -> None:
        job, choice = self._owners[event.request]
        metrics = self.metrics
        metrics.generation_tokens.inc()
        if choice not in job.last_token:
            metrics.time_to_first_token.observe(now - job.arrived)
            self._dequeue(job)
        else:
            metrics.inter_token_latency.observe(now - job.last_token[choice])
        job.last_token[choice] = now
        if choice == 0 and job.follow_up is not None:
            job.reply.append(event.text)
        job.send(Token(choice, event))
        if event.finish_reason is None:
            return
        del self._owners[event.request]
        job.engine_ids.discard(event.request)
        job.unfinished -= 1
        if choice == 0 and job.follow_up is not None and self.cache is not None:
            ids, breaks = job.follow_up("".join(job.reply))
            self._pending.appendleft(Job(ids, [], max_tokens=0, breaks=breaks, queued=False))
        if not job.unfinished:
            self._in_flight.discard(job)
            job.send(Done())

    def _measure(self) -> None:
        metrics = self.metrics
        metrics.running.set(self.engine.running)
        metrics.queued.set(self.queued)
        if self.cache is not None:
            metrics.cache_bytes.set(self.cache.nbytes)
            metrics.cache_entries.set(len(self.cache))
