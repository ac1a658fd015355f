"""One engine's measurements, in that engine's own process (`python -m rgemma.bench JOB`).

A Job says what to measure; `measure(job)` yields each section as soon as it
is measured: "load", then "check" (the greedy tokens every engine must agree
on), "prefill" per prompt length, "decode" per batch size and "context" per
context length. Peak memory is the process's resident-set high-water mark,
reset before each section (Linux), and on CUDA the peak allocation.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Iterator

import torch

from rgemma.bench.engines import ENGINES, Engine, weight_bytes
from rgemma.bench.roofline import read_bandwidth, sync

# The greedy tokens every engine must agree on: a prompt and continuation within
# the attention window (transformers' window is one key shorter than the official one).
CHECK_TOKENS = 4
# Greedy tokens can part where bf16 rounding reorders nearly equal logits, so the
# check also compares the first prediction's top logits.
CHECK_TOP = 5
# Starts each event line a child prints, so that anything else on its stdout passes by.
CHILD_MARK = "@rgemma-bench "


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """What one engine's process measures; a section left at its default is not measured."""

    engine: str  # a name in ENGINES
    source: str | dict  # the weights directory, or for "gemma" its GemmaConfig fields
    dtype: str
    device: str
    seed: int  # of the random prompts, and of the random caches
    vocab_size: int
    decode_steps: int  # timed greedy steps per decode or context measurement
    warmup: int  # untimed steps before them
    threads: int | None = None
    check_prompt: int = 0  # prompt tokens of the check
    check_steps: int = 0  # its greedy tokens
    prompt_lengths: tuple[int, ...] = ()  # prefill, batch 1
    prefill_repeats: int = 1  # the fastest is kept
    batch_sizes: tuple[int, ...] = ()  # decode, after a prompt of `decode_context` tokens
    decode_context: int = 0
    context_lengths: tuple[int, ...] = ()  # decode at batch 1 after this many tokens
    context_fill: str = "random"  # those tokens' cache: "random" values of the right shape, or by "prefill"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak(device: torch.device) -> None:
    """Start a new peak: the resident set's high-water mark (Linux) and CUDA's peak allocation."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        pass  # elsewhere the peak counts from the start of the process
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device: torch.device) -> dict:
    import resource

    peak = _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"peak_rss_bytes": peak, "rss_bytes": _proc_status("VmRSS") or peak}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


@torch.no_grad()
def _decode(engine: Engine, model, logits, cache, position: int, warmup: int, steps: int, device):
    """Greedy steps from `logits`; each step timed from the logits to the next token's logits.

    Returns the timed steps' seconds, the tokens of row 0 and the cache.
    """
    seconds, tokens = [], []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        token = logits.argmax(-1, keepdim=True)  # (B, 1) greedy
        logits, cache = engine.step(model, token, cache, position + i)
        sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        tokens.append(int(token[0, 0]))
    return seconds, tokens, cache


def _step_stats(seconds: list[float], batch: int) -> dict:
    median = statistics.median(seconds)
    return {"step_seconds_median": median, "step_seconds_mean": statistics.fmean(seconds),
            "latency_ms": 1000 * median, "tokens_per_s": batch / median}


@torch.no_grad()
def measure(job: Job) -> Iterator[tuple[str, dict]]:
    """(section, fields) for each section the job asks for, as soon as it is measured."""
    engine = ENGINES[job.engine]
    device, dtype = torch.device(job.device), getattr(torch, job.dtype)
    _reset_peak(device)
    start = time.perf_counter()
    model = engine.load(job.source, dtype, device)
    yield "load", dict(seconds=time.perf_counter() - start, weight_bytes=weight_bytes(model), **_peaks(device))
    generator = torch.Generator().manual_seed(job.seed)

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, job.vocab_size, (batch, length), generator=generator).to(device)

    if job.check_prompt:
        logits, cache = engine.prefill(model, prompt(1, job.check_prompt))
        top = logits[0].topk(CHECK_TOP)
        _, tokens, _ = _decode(engine, model, logits, cache, job.check_prompt, 0, job.check_steps, device)
        yield "check", dict(tokens=tokens, top_tokens=top.indices.tolist(), top_logits=top.values.tolist())

    for length in job.prompt_lengths:
        tokens = prompt(1, length)
        _reset_peak(device)
        seconds = []
        for _ in range(job.prefill_repeats):
            sync(device)
            start = time.perf_counter()
            logits, cache = engine.prefill(model, tokens)
            logits.argmax(-1).tolist()  # the first token
            seconds.append(time.perf_counter() - start)
            del logits, cache
        best = min(seconds)
        yield "prefill", dict(prompt_length=length, seconds=best, tokens_per_s=length / best, first_token_s=best,
                              **_peaks(device))

    for batch in job.batch_sizes:
        context = job.decode_context
        logits, cache = engine.prefill(model, prompt(batch, context))
        _reset_peak(device)  # the peak of decoding: weights, cache and one step's activations
        seconds, _, cache = _decode(engine, model, logits, cache, context, job.warmup, job.decode_steps, device)
        peaks = _peaks(device)
        # The bandwidth drifts, so this row's roofline takes the bandwidth probed right after its steps.
        yield "decode", dict(batch_size=batch, context=context, cache_bytes=engine.cache_bytes(model, cache),
                             bandwidth_bytes_per_s=read_bandwidth(device)["bytes_per_s"],
                             **_step_stats(seconds, batch), **peaks)
        del logits, cache
        gc.collect()

    for length in job.context_lengths:  # batch 1; the cache filled at random or by a prefill
        _reset_peak(device)
        start = time.perf_counter()
        if job.context_fill == "random":
            torch.manual_seed(job.seed)
            cache = engine.random_cache(model, 1, length)
            logits = torch.zeros(1, job.vocab_size, device=device)
        else:
            logits, cache = engine.prefill(model, prompt(1, length))
        sync(device)
        fill_seconds = time.perf_counter() - start
        filled_rss = _peaks(device)["rss_bytes"]
        seconds, _, cache = _decode(engine, model, logits, cache, length, job.warmup, job.decode_steps, device)
        yield "context", dict(context=length, fill_seconds=fill_seconds, cache_bytes=engine.cache_bytes(model, cache),
                              rss_after_fill_bytes=filled_rss, **_step_stats(seconds, 1), **_peaks(device))
        del logits, cache
        gc.collect()
