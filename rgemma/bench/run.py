"""The run, in the parent process: write the weights once, measure the roofline, start a process per
engine (and per later round), and gather their measurements into one results dict."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from rgemma.bench.engines import CONTEXT_ENGINES, ENGINES, gemma_config, installed, random_model
from rgemma.bench.measure import CHECK_TOKENS, CHILD_MARK, Job
from rgemma.bench.report import agreement
from rgemma.bench.roofline import MAX_GEMM_TOKENS, add_fractions, matmul_throughput, read_bandwidth

DEFAULT_CONTEXT_LENGTHS = "256,1024,4096,8192,16384,32768"


@dataclasses.dataclass(frozen=True)
class Settings:
    source: str  # a preset name or a checkpoint
    is_preset: bool
    dtype: str
    device: str
    threads: int | None
    engines: tuple[str, ...]
    prompt_lengths: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    decode_steps: int
    warmup: int
    prefill_repeats: int
    rounds: int  # decode measurements, the engines taking turns
    context_lengths: tuple[int, ...]  # empty: no context growth
    context_fill: str
    seed: int


def _weights_directory(settings: Settings, scratch: Path) -> Path:
    """A Hugging Face directory every engine can load: random weights written once, or the checkpoint."""
    from rgemma.checkpoint import CONFIG_FILE, convert, save_model
    from rgemma.config import Config
    from rgemma.hub import resolve_model

    if settings.is_preset:
        model = random_model(Config.preset(settings.source), getattr(torch, settings.dtype), settings.seed)
        return save_model(model, scratch / "model")
    path = resolve_model(settings.source)
    if (path / CONFIG_FILE).is_file():
        return path
    return convert(path, scratch / "model", dtype=settings.dtype)  # an official .pt or Orbax checkpoint


def _describe(path: Path, settings: Settings) -> tuple[dict, object]:
    """The model's sizes for the report, and its Config."""
    from rgemma.checkpoint import load_model
    from rgemma.state import State

    dtype = getattr(torch, settings.dtype)
    model = load_model(path, dtype=dtype, device="meta")  # shapes only
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "source": settings.source, "dtype": settings.dtype, "parameters": parameters,
        "weight_bytes": parameters * dtype.itemsize,
        # The embedding table multiplies only the last position in prefill; the rest multiply every token.
        "flop_parameters": parameters - config.vocab_size * config.width,
        "state_bytes_per_sequence": State.zeros(config, 1, dtype=dtype, device="meta").nbytes,
        "config": config.to_hf_dict(),
    }, config


def _jobs(settings: Settings, config, path: Path) -> dict[str, Job]:
    """What each engine's process measures: the main sections for --engines, the context for --context-growth."""
    check_prompt = min(CHECK_TOKENS, max(1, config.attention_window // 2))
    common = dict(
        dtype=settings.dtype, device=settings.device, threads=settings.threads, seed=settings.seed,
        vocab_size=config.vocab_size, decode_context=min(settings.prompt_lengths),
        decode_steps=settings.decode_steps, warmup=settings.warmup, context_fill=settings.context_fill,
        prefill_repeats=settings.prefill_repeats,
    )
    main = dict(check_prompt=check_prompt, check_steps=min(CHECK_TOKENS, config.attention_window - check_prompt),
                prompt_lengths=settings.prompt_lengths, batch_sizes=settings.batch_sizes)
    gemma = gemma_config(config) | {"max_position_embeddings": max(settings.context_lengths, default=0) + 1024}
    jobs = {}
    for name in ENGINES:
        sections = main if name in settings.engines else {}
        context = settings.context_lengths if name in CONTEXT_ENGINES else ()
        if sections or context:
            jobs[name] = Job(**common, **sections, engine=name, context_lengths=context,
                             source=gemma if name == "gemma" else str(path))
    return jobs


def _steps(job: Job) -> int:
    """The progress bar's steps: one per section the job emits."""
    return 1 + bool(job.check_prompt) + len(job.prompt_lengths) + len(job.batch_sizes) + len(job.context_lengths)


def _decode_only(job: Job) -> Job:
    """The job of a later round: load, then the decode measurements only."""
    return dataclasses.replace(job, check_prompt=0, check_steps=0, prompt_lengths=(), context_lengths=())


def _run_child(job: Job, on_event: Callable[[dict], None]) -> str:
    """Run one job in a fresh interpreter; pass each measurement to `on_event`. Returns "ok" or why not.

    Ctrl-C ends the job but not the run, which reports what it measured so far.
    """
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen([sys.executable, "-m", "rgemma.bench", job.to_json()], stdout=subprocess.PIPE,
                                 stderr=errors, text=True, env=env)
        try:
            for line in child.stdout:
                if line.startswith(CHILD_MARK):
                    on_event(json.loads(line[len(CHILD_MARK):]))
            child.wait()
        except KeyboardInterrupt:  # keep what was measured; the caller starts nothing more
            # Until run() returns, ignore further signals (`timeout -s INT` sends two), so the report comes out.
            for number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(number, signal.SIG_IGN)
            child.kill()
            child.wait()
            return "interrupted"
        except BaseException:
            child.kill()
            child.wait()
            raise
        if child.returncode == 0:
            return "ok"
        if child.returncode < 0:
            return f"failed: killed by signal {-child.returncode}" + (" (out of memory?)" if child.returncode == -9 else "")
        errors.seek(0)
        lines = [line.strip() for line in errors.read().splitlines() if line.strip()]
        return f"failed: {lines[-1] if lines else f'exit status {child.returncode}'}"


def _collect(job: Job, progress) -> dict:
    """Run a job and gather its measurements: {"status", "load", "check", "prefill": [...], ...}."""
    result: dict = {"prefill": [], "decode": [], "context": []}

    def on_event(event: dict) -> None:
        section = event.pop("section")
        if section in ("prefill", "decode", "context"):
            result[section].append(event)
        else:
            result[section] = event
        progress.set_postfix_str(f"{job.engine} {section}")
        progress.update()

    result["status"] = _run_child(job, on_event)
    return {key: value for key, value in result.items() if value != []}


def _merge_rounds(engine: dict, rounds: list[list[dict]]) -> None:
    """engine["decode"]: for each batch size the round with the median step time, and every round's step time."""
    merged = []
    for rows in zip(*rounds):  # one batch size, each round's row
        seconds = [row["step_seconds_median"] for row in rows]
        middle = rows[seconds.index(statistics.median_low(seconds))]
        merged.append({**middle, "rounds_step_seconds": seconds})
    engine["decode"] = merged


def run(settings: Settings) -> dict:
    """Every measurement of the run, as the JSON `rgemma bench --json` writes."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(settings)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def _run(settings: Settings) -> dict:
    from tqdm import tqdm

    device, dtype = torch.device(settings.device), getattr(torch, settings.dtype)
    results: dict = {"settings": dataclasses.asdict(settings)}
    with tempfile.TemporaryDirectory(prefix="rgemma-bench-") as scratch, \
            tqdm(desc="rgemma bench", unit="step", file=sys.stderr, leave=False) as progress:
        progress.set_postfix_str("writing the weights" if settings.is_preset else "reading the checkpoint")
        path = _weights_directory(settings, Path(scratch))
        results["model"], config = _describe(path, settings)
        jobs = _jobs(settings, config, path)
        decoding = [name for name, job in jobs.items() if job.batch_sizes and installed(name)]
        later = (settings.rounds - 1) * len(decoding) * (1 + len(settings.batch_sizes))
        progress.total = 3 + sum(_steps(job) for name, job in jobs.items() if installed(name)) + later
        progress.update()
        results["machine"] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
        }
        progress.set_postfix_str("roofline: read bandwidth")
        bandwidth = read_bandwidth(device)
        progress.update()
        progress.set_postfix_str("roofline: matmul")
        shape = (min(max(settings.prompt_lengths), MAX_GEMM_TOKENS), config.width, config.mlp_width)
        matmul = matmul_throughput(shape, dtype, device)
        progress.update()
        done = {}
        for name, job in jobs.items():
            if any(d["status"] == "interrupted" for d in done.values()):
                done[name] = {"status": "interrupted"}
            else:
                done[name] = _collect(job, progress) if installed(name) else {"status": "not installed"}
        # Later rounds: the bandwidth drifts between one engine's process and the next, so every engine
        # decodes again in turn, and each round's ratios compare engines measured minutes apart at most.
        rounds = {name: [done[name].get("decode", [])] for name in decoding}
        for _ in range(settings.rounds - 1):
            if any(d["status"] != "ok" for d in done.values() if d["status"] != "not installed"):
                break
            for name in decoding:
                again = _collect(_decode_only(jobs[name]), progress)
                if again["status"] != "ok":
                    done[name]["status"] = again["status"]
                    break
                rounds[name].append(again.get("decode", []))
        for name, measured in rounds.items():
            _merge_rounds(done[name], measured[:min(len(m) for m in rounds.values())])
        results["roofline"] = {"bandwidth": bandwidth, "matmul": matmul}

    results["engines"] = {name: done[name] for name in settings.engines}
    if settings.context_lengths:
        results["context_growth"] = {
            "fill": settings.context_fill, "batch_size": 1, "transformer": jobs["gemma"].source,
            "engines": {name: {"status": done[name]["status"], "load": done[name].get("load"),
                               "context": done[name].pop("context", [])} for name in CONTEXT_ENGINES},
        }
    add_fractions(results)
    results["agreement"] = agreement(results["engines"])
    return results
