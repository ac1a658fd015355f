"""Side-by-side benchmark: rgemma, transformers and the official implementation on the same weights.

    rgemma bench --preset 2b --prompt-lengths 256,1024,4096 --batch-sizes 1,4 --json out.json
    rgemma bench --model path/to/recurrentgemma-2b --context-growth --plot growth.png

The weights (random for a preset) are written once as a Hugging Face
directory, and every engine loads them in its own process, so that peak
memory (resident set, reset before each measurement) is that engine's alone.
An engine is three functions: load, prefill (prompt -> next-token logits and
a cache) and step (one greedy token per row -> logits and the cache), each
through that implementation's normal incremental API.

The same run measures this machine's roofline: read bandwidth bounds a
decode step (every weight and each row's state are read once per step), and
GEMM throughput bounds prefill (2 FLOPs per weight that multiplies a token,
per token). Each measurement is reported as a fraction of its bound. The
bandwidth drifts by tens of percent within minutes on shared machines, so
each decode measurement's bound takes the bandwidth probed in its engine's
process right after its steps.

`--engines rgemma,rgemma-int8,rgemma-int4` adds rgemma with the same weights
quantized at load, and reports each one's decode speed over the float weights.

`--context-growth` decodes at growing context lengths against a transformer
of the same size (transformers' Gemma; Gemma-2B for RecurrentGemma-2B), whose
KV cache grows with the context while Griffin's state stays fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.util
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rgemma.state import AttentionState, RecurrentState

ENGINE_NAMES = ("rgemma", "transformers", "official")
# rgemma on the same weights quantized at load (`rgemma.quantize`), by bits:
# measured on request, against rgemma's float weights.
QUANTIZED_ENGINES = {"rgemma-int8": 8, "rgemma-int4": 4}
CONTEXT_ENGINES = ("rgemma", "gemma")
DEFAULT_CONTEXT_LENGTHS = "256,1024,4096,8192,16384,32768"
# The transformer RecurrentGemma-2B is measured against (Gemma-2B's published config).
GEMMA_2B = dict(vocab_size=256_000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256)
# The greedy tokens every engine must agree on: a prompt and continuation within
# the attention window (transformers' window is one key shorter than the official one).
CHECK_TOKENS = 4
# Greedy tokens can part where bf16 rounding reorders nearly equal logits, so the
# check also compares the first prediction's top logits.
CHECK_TOP = 5
BANDWIDTH_PROBE_BYTES = 2**28  # far past any CPU's last-level cache
MAX_GEMM_TOKENS = 1024
CHILD_MARK = "@rgemma-bench "


# Memory and timing ----------------------------------------------------------------


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int, budget: float = 2.0) -> float:
    """The fastest of `repeats` timed calls after a warm-up; fewer once `budget` seconds are spent."""
    seconds = []
    while len(seconds) <= repeats and sum(seconds) <= budget:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:] or seconds)  # the warm-up counts only when it is all there is


# Random weights ---------------------------------------------------------------------


@torch.no_grad()
def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with normal noise, 1/sqrt(fan-in) for matrices, 0.1 for vectors.

    Drawing billions of values takes about a minute on a small CPU, so each
    piece of 2^20 values is a slice of one block of noise, at a random offset
    and with a random factor: no two rows repeat, so no two logits tie exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(2**22, generator=generator)
    piece_size = 2**20
    for param in module.parameters():
        scale = param.shape[-1] ** -0.5 if param.ndim > 1 else 0.1
        flat = param.view(-1)
        for start in range(0, flat.numel(), piece_size):
            piece = flat[start : start + piece_size]
            offset = int(torch.randint(0, block.numel() - piece.numel() + 1, (), generator=generator))
            factor = scale * (0.5 + float(torch.rand((), generator=generator)))
            piece.copy_(block[offset : offset + piece.numel()] * factor)
    return module


@torch.no_grad()
def random_model(config, dtype: torch.dtype, seed: int):
    from rgemma.model import Griffin

    model = randomise_(Griffin(config, dtype=dtype, device="meta").to_empty(device="cpu"), seed)
    # A smaller embedding, so that the layers and not the input token decide
    # the next token: the engines' greedy tokens then agree only if every weight does.
    model.embed_tokens.weight.mul_(config.width**-0.5)
    return model.eval()


# Engines --------------------------------------------------------------------------


def tensor_bytes(value) -> int:
    """Bytes of the tensors in nested dicts, lists, tuples and dataclasses."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _load_rgemma(path, dtype, device, quantize: int | None = None):
    from rgemma.checkpoint import load_model

    model = load_model(path, dtype=dtype, device=device, quantize=quantize).eval()
    _backend(model)  # prepared for its device before anything runs
    return model


@functools.cache
def _backend(model):
    from rgemma.backends import prepare

    return prepare(model)


def _prefill_rgemma(model, tokens):
    return model.prefill(tokens)


def _step_rgemma(model, tokens, state, position):
    return _backend(model).step(tokens, state)


def _random_rgemma_state(model, batch: int, length: int):
    """A state as after `length` tokens, with random contents: its shape never depends on the length."""
    state = model.init_state(batch)
    window = model.config.attention_window
    positions = torch.arange(max(0, length - window), length, device=model.device)
    for layer in state.layers:
        if isinstance(layer, RecurrentState):
            layer.h.normal_()
            layer.conv.normal_()
        elif isinstance(layer, AttentionState):
            layer.k.normal_()
            layer.v.normal_()
            layer.pos[:, positions % window] = positions
    state.position.fill_(length)
    return state


def _load_transformers(path, dtype, device):
    from transformers import RecurrentGemmaForCausalLM

    return RecurrentGemmaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@functools.cache
def _cache_argument(model_type: type) -> str:
    # transformers 5 names the argument `cache`; earlier versions `past_key_values`.
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _hf_forward(model, tokens, positions, cache, **extra):
    out = model(tokens, position_ids=positions, use_cache=True, **{_cache_argument(type(model)): cache}, **extra)
    return out.logits[:, -1].float()


def _prefill_hf(model, tokens, chunk: int | None = None):
    """Read the prompt (in chunks where the model can append several tokens to a cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    chunk = chunk or tokens.shape[1]
    for start in range(0, tokens.shape[1], chunk):
        part = slice(start, start + chunk)
        logits = _hf_forward(model, tokens[:, part], positions[:, part], cache, logits_to_keep=1)
    return logits, cache


def _step_hf(model, tokens, cache, position):
    positions = torch.full_like(tokens, position)
    return _hf_forward(model, tokens, positions, cache), cache


def _hf_cache_bytes(model, cache) -> int:
    # transformers' RecurrentGemma keeps the recurrent states on its modules, not in the cache.
    module_states = [(m.conv1d_state, m.rg_lru.recurrent_states) for m in model.modules() if hasattr(m, "conv1d_state")]
    layers = [[getattr(layer, "keys", None), getattr(layer, "values", None)] for layer in cache.layers]
    return tensor_bytes(layers) + tensor_bytes(module_states)


def official_config(config):
    """rgemma Config -> the official GriffinConfig."""
    from recurrentgemma import common

    kinds = {"recurrent": common.TemporalBlockType.RECURRENT, "attention": common.TemporalBlockType.ATTENTION}
    return common.GriffinConfig(
        vocab_size=config.vocab_size, width=config.width, mlp_expanded_width=config.mlp_width,
        num_heads=config.num_heads, lru_width=config.lru_width,
        block_types=tuple(kinds[b] for b in config.block_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window, logits_soft_cap=config.logits_soft_cap,
    )


@torch.no_grad()
def _load_official(path, dtype, device):
    """The official model with the weights rgemma reads, written through rgemma's official naming table.

    The table's fix-ups turn an official tensor into a view in rgemma's layout,
    so copying into that view writes the official tensor.
    """
    from recurrentgemma.torch import griffin

    from rgemma.checkpoint import official_name

    ours = _load_rgemma(path, dtype, "cpu")
    model = griffin.Griffin(official_config(ours.config), gradient_checkpointing=False, device="meta", dtype=dtype)
    model = model.to_empty(device=device)
    theirs = model.state_dict()
    written = set()
    for name, tensor in ours.state_dict().items():
        their_name, fix = official_name(name)
        fix(theirs[their_name]).copy_(tensor)
        written.add(their_name)
    if written != theirs.keys():
        raise ValueError(f"official tensors not written: {sorted(theirs.keys() - written)}")
    return model.eval()


def _positions(tokens, start: int = 0):
    return (start + torch.arange(tokens.shape[1], device=tokens.device)).expand_as(tokens)


def _prefill_official(model, tokens):
    # As the official sampler does: all but the last token without logits, then the last.
    cache = None
    if tokens.shape[1] > 1:
        _, cache = model(tokens[:, :-1], _positions(tokens[:, :-1]), return_logits=False, return_cache=True)
    logits, cache = model(tokens[:, -1:], _positions(tokens[:, -1:], tokens.shape[1] - 1), cache)
    return logits[:, -1].float(), cache


def _step_official(model, tokens, cache, position):
    logits, cache = model(tokens, _positions(tokens, position), cache)
    return logits[:, -1].float(), cache


def gemma_config(config) -> dict:
    """The transformer of the context-growth comparison: Gemma-2B for the 2b shape, else one of the same shape."""
    from rgemma.config import PRESETS

    shape = ("vocab_size", "width", "mlp_width", "num_heads", "block_types")
    if all(getattr(config, f) == getattr(PRESETS["2b"], f) for f in shape):
        return dict(GEMMA_2B)
    return dict(vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_width,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                num_key_value_heads=1, head_dim=config.head_dim)


def _load_gemma(gemma: dict, dtype, device):
    from transformers import GemmaConfig, GemmaForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # randomise_ fills the weights much faster than the init functions
        model = GemmaForCausalLM._from_config(GemmaConfig(**gemma), dtype=dtype)
    model.tie_weights()
    return randomise_(model, seed=1).to(device).eval()


def _random_hf_cache(model, batch: int, length: int):
    from transformers import DynamicCache

    config = model.config
    cache = DynamicCache(config=config)
    shape = (batch, config.num_key_value_heads, length, config.head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, dtype=model.dtype, device=model.device),
                     torch.randn(shape, dtype=model.dtype, device=model.device), layer)
    return cache


@dataclasses.dataclass(frozen=True)
class Engine:
    package: str  # the module that must be installed
    load: Callable  # (weights directory, or the Gemma config dict; dtype, device) -> model
    prefill: Callable  # (model, tokens (B, T)) -> next-token logits (B, V) float32, cache
    step: Callable  # (model, tokens (B, 1), cache, position) -> logits (B, V) float32, cache
    cache_bytes: Callable  # (model, cache) -> bytes held for the sequences
    random_cache: Callable | None = None  # (model, batch, length) -> a cache as after `length` tokens


# In the order they run: the official code, the slowest on CPUs without bf16 arithmetic, last.
ENGINES = {
    "rgemma": Engine("rgemma", _load_rgemma, _prefill_rgemma, _step_rgemma,
                     lambda model, state: state.nbytes, _random_rgemma_state),
    **{name: Engine("rgemma", functools.partial(_load_rgemma, quantize=bits), _prefill_rgemma, _step_rgemma,
                    lambda model, state: state.nbytes)
       for name, bits in QUANTIZED_ENGINES.items()},
    "transformers": Engine("transformers", _load_transformers, _prefill_hf, _step_hf, _hf_cache_bytes),
    # Only in --context-growth: the transformer baseline, random weights.
    "gemma": Engine("transformers", _load_gemma, lambda model, tokens: _prefill_hf(model, tokens, chunk=2048),
                    _step_hf, _hf_cache_bytes, _random_hf_cache),
    "official": Engine("recurrentgemma", _load_official, _prefill_official, _step_official,
                       lambda model, cache: tensor_bytes(cache)),
}


def installed(engine: str) -> bool:
    return importlib.util.find_spec(ENGINES[engine].package) is not None


# Measurements, in the engine's own process ------------------------------------------


def _emit(section: str, **fields) -> None:
    print(CHILD_MARK + json.dumps({"section": section, **fields}), flush=True)


@torch.no_grad()
def _decode(engine: Engine, model, logits, cache, position: int, warmup: int, steps: int, device):
    """Greedy steps from `logits`; each step timed from the logits to the next token's logits.

    Returns the timed steps' seconds, the tokens of row 0 and the cache.
    """
    seconds, tokens = [], []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        token = logits.argmax(-1, keepdim=True)  # (B, 1) greedy
        logits, cache = engine.step(model, token, cache, position + i)
        _sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        tokens.append(int(token[0, 0]))
    return seconds, tokens, cache


def _step_stats(seconds: list[float], batch: int) -> dict:
    median = statistics.median(seconds)
    return {"step_seconds_median": median, "step_seconds_mean": statistics.fmean(seconds),
            "latency_ms": 1000 * median, "tokens_per_s": batch / median}


def _quantized_bytes(model) -> int:
    """Bytes of rgemma's quantized weights, which are buffers, not parameters."""
    from rgemma.quantize import quantized_modules

    return sum(getattr(m, part).nbytes for m in quantized_modules(model).values() for part in m.FORMAT)


def _loaded(engine: Engine, job: dict):
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    _reset_peak(device)
    start = time.perf_counter()
    model = engine.load(job["source"], dtype, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + _quantized_bytes(model)
    _emit("load", seconds=time.perf_counter() - start, weight_bytes=weights, **_peaks(device))
    return model, device


@torch.no_grad()
def measure(job: dict) -> None:
    """The sections the job asks for, each emitted as soon as it is measured."""
    engine = ENGINES[job["engine"]]
    model, device = _loaded(engine, job)
    generator = torch.Generator().manual_seed(job["seed"])

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, job["vocab_size"], (batch, length), generator=generator).to(device)

    if job["check_prompt"]:
        logits, cache = engine.prefill(model, prompt(1, job["check_prompt"]))
        top = logits[0].topk(CHECK_TOP)
        _, tokens, _ = _decode(engine, model, logits, cache, job["check_prompt"], 0, job["check_steps"], device)
        _emit("check", tokens=tokens, top_tokens=top.indices.tolist(), top_logits=top.values.tolist())

    for length in job["prompt_lengths"]:
        tokens = prompt(1, length)
        _reset_peak(device)
        seconds = []
        for _ in range(job["prefill_repeats"]):
            _sync(device)
            start = time.perf_counter()
            logits, cache = engine.prefill(model, tokens)
            logits.argmax(-1).tolist()  # the first token
            seconds.append(time.perf_counter() - start)
            del logits, cache
        best = min(seconds)
        _emit("prefill", prompt_length=length, seconds=best, tokens_per_s=length / best,
              first_token_s=best, **_peaks(device))

    for batch in job["batch_sizes"]:
        context = job["decode_context"]
        logits, cache = engine.prefill(model, prompt(batch, context))
        _reset_peak(device)  # the peak of decoding: weights, cache and one step's activations
        seconds, _, cache = _decode(engine, model, logits, cache, context, job["warmup"], job["decode_steps"], device)
        peaks = _peaks(device)
        _emit("decode", batch_size=batch, context=context, cache_bytes=engine.cache_bytes(model, cache),
              bandwidth_bytes_per_s=read_bandwidth(device)["bytes_per_s"], **_step_stats(seconds, batch), **peaks)
        del logits, cache
        gc.collect()

    for length in job["context_lengths"]:  # batch 1; the cache filled at random or by a prefill
        _reset_peak(device)
        start = time.perf_counter()
        if job["context_fill"] == "random":
            torch.manual_seed(job["seed"])
            cache = engine.random_cache(model, 1, length)
            logits = torch.zeros(1, job["vocab_size"], device=device)
        else:
            logits, cache = engine.prefill(model, prompt(1, length))
        _sync(device)
        fill_seconds = time.perf_counter() - start
        filled_rss = _peaks(device)["rss_bytes"]
        seconds, _, cache = _decode(engine, model, logits, cache, length, job["warmup"], job["decode_steps"], device)
        _emit("context", context=length, fill_seconds=fill_seconds, cache_bytes=engine.cache_bytes(model, cache),
              rss_after_fill_bytes=filled_rss, **_step_stats(seconds, 1), **_peaks(device))
        del logits, cache
        gc.collect()


# Roofline ----------------------------------------------------------------------------


def read_bandwidth(device: torch.device) -> dict:
    """Bytes/s reading a 1 GiB tensor: torch's sum, and rgemma's native read loop on CPUs that build it."""
    from rgemma.backends.native import kernels

    probe = torch.ones(BANDWIDTH_PROBE_BYTES // 4, dtype=torch.float32, device=device)
    probes = {"torch_sum": lambda: probe.sum()}
    native = kernels() if device.type == "cpu" else None
    if native is not None:
        probes["native_read_all"] = lambda: native.read_all(probe)
    found = {name: BANDWIDTH_PROBE_BYTES / _best_seconds(fn, device, repeats=5) for name, fn in probes.items()}
    return {"bytes_per_s": max(found.values()), "probes": found, "probe_bytes": BANDWIDTH_PROBE_BYTES}


def matmul_throughput(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> dict:
    """FLOP/s of (M, K) @ (K, N) in float32 and in `dtype`, where the hardware computes it natively.

    CPUs without bf16/fp16 arithmetic run those GEMMs many times slower than
    float32 (rgemma computes in float32 there), so they are not measured.
    """
    from rgemma.backends import Options

    m, k, n = shape
    native = dtype if device.type == "cuda" or Options().resolved().native_bf16 else torch.float32
    found = {}
    for kind in dict.fromkeys([torch.float32, native]):
        a = torch.randn(m, k, device=device).to(kind)
        b = torch.randn(k, n, device=device).to(kind)
        found[str(kind).removeprefix("torch.")] = 2 * m * k * n / _best_seconds(lambda: a @ b, device, repeats=3)
    not_native = [] if native == dtype else [str(dtype).removeprefix("torch.")]
    return {"flops_per_s": max(found.values()), "by_dtype": found, "not_native": not_native, "shape": list(shape)}


# The run, in the parent process -------------------------------------------------------


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


def _run_child(job: dict, on_event: Callable[[dict], None]) -> str:
    """Run one job in a fresh interpreter; pass each measurement to `on_event`. Returns "ok" or why not.

    Ctrl-C ends the job but not the run, which reports what it measured so far.
    """
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen([sys.executable, "-m", "rgemma.bench", json.dumps(job)], stdout=subprocess.PIPE,
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


def _collect(job: dict, progress) -> dict:
    """Run a job and gather its measurements: {"status", "load", "check", "prefill": [...], ...}."""
    result: dict = {"prefill": [], "decode": [], "context": []}

    def on_event(event: dict) -> None:
        section = event.pop("section")
        if section in ("prefill", "decode", "context"):
            result[section].append(event)
        else:
            result[section] = event
        progress.set_postfix_str(f"{job['engine']} {section}")
        progress.update()

    result["status"] = _run_child(job, on_event)
    return {key: value for key, value in result.items() if value != []}


def _roofline_fractions(results: dict) -> None:
    """Add each measurement's fraction of its bound (the bound's seconds over the measured seconds)."""
    model, roof = results["model"], results["roofline"]
    for engine in results["engines"].values():
        for row in engine.get("prefill", []):
            row["roofline_seconds"] = 2 * model["flop_parameters"] * row["prompt_length"] / roof["matmul"]["flops_per_s"]
            row["roofline_fraction"] = row["roofline_seconds"] / row["seconds"]
        for row in engine.get("decode", []):
            # Each engine's own weights: quantized ones read fewer bytes.
            read = engine["load"]["weight_bytes"] + row["batch_size"] * model["state_bytes_per_sequence"]
            row["roofline_seconds"] = read / row["bandwidth_bytes_per_s"]
            row["roofline_fraction"] = row["roofline_seconds"] / row["step_seconds_median"]


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


def _jobs(settings: Settings, config, path: Path) -> dict[str, dict]:
    """What each engine's process measures: the main sections for --engines, the context for --context-growth."""
    check_prompt = min(CHECK_TOKENS, max(1, config.attention_window // 2))
    common = {
        "dtype": settings.dtype, "device": settings.device, "threads": settings.threads, "seed": settings.seed,
        "vocab_size": config.vocab_size, "decode_context": min(settings.prompt_lengths),
        "decode_steps": settings.decode_steps, "warmup": settings.warmup, "context_fill": settings.context_fill,
        "prefill_repeats": settings.prefill_repeats,
    }
    main = {"check_prompt": check_prompt, "check_steps": min(CHECK_TOKENS, config.attention_window - check_prompt),
            "prompt_lengths": settings.prompt_lengths, "batch_sizes": settings.batch_sizes}
    nothing = {"check_prompt": 0, "check_steps": 0, "prompt_lengths": (), "batch_sizes": ()}
    gemma = gemma_config(config) | {"max_position_embeddings": max(settings.context_lengths, default=0) + 1024}
    jobs = {}
    for name in ENGINES:
        sections = main if name in settings.engines else nothing
        context = settings.context_lengths if name in CONTEXT_ENGINES else ()
        if sections is not nothing or context:
            jobs[name] = {**common, **sections, "engine": name, "context_lengths": context,
                          "source": gemma if name == "gemma" else str(path)}
    return jobs


def _steps(job: dict) -> int:
    return 1 + bool(job["check_prompt"]) + sum(len(job[k]) for k in ("prompt_lengths", "batch_sizes", "context_lengths"))


def _decode_only(job: dict) -> dict:
    """The job of a later round: load, then the decode measurements only."""
    return {**job, "check_prompt": 0, "check_steps": 0, "prompt_lengths": (), "context_lengths": ()}


def _merge_rounds(engine: dict, rounds: list[list[dict]]) -> None:
    """engine["decode"]: for each batch size the round with the median step time, and every round's step time."""
    merged = []
    for rows in zip(*rounds):  # one batch size, each round's row
        seconds = [row["step_seconds_median"] for row in rows]
        middle = rows[seconds.index(statistics.median_low(seconds))]
        merged.append({**middle, "rounds_step_seconds": seconds})
    engine["decode"] = merged


def run(settings: Settings) -> dict:
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
        decoding = [name for name, job in jobs.items() if job["batch_sizes"] and installed(name)]
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
            "fill": settings.context_fill, "batch_size": 1, "transformer": jobs["gemma"]["source"],
            "engines": {name: {"status": done[name]["status"], "load": done[name].get("load"),
                               "context": done[name].pop("context", [])} for name in CONTEXT_ENGINES},
        }
    _roofline_fractions(results)
    results["agreement"] = agreement(results["engines"])
    return results


def agreement(engines: dict) -> dict:
    """Whether the float engines' greedy tokens are the same, and how every engine's first top logits
    compare with the first float engine's (quantized weights are expected to move them a little)."""
    checks = {name: e["check"] for name, e in engines.items() if "check" in e}
    exact = {name: check for name, check in checks.items() if name not in QUANTIZED_ENGINES}
    if len(checks) < 2 or not exact:
        return {"greedy_tokens_agree": None, "top": {}}
    first, reference = next(iter(exact.items()))
    others = [(name, check) for name, check in checks.items() if name != first]
    logits = dict(zip(reference["top_tokens"], reference["top_logits"]))
    top = {}
    for name, check in others:
        shared = [(t, v) for t, v in zip(check["top_tokens"], check["top_logits"]) if t in logits]
        top[name] = {"against": first, "shared": len(shared), "of": len(logits),
                     "max_logit_difference": max((abs(v - logits[t]) for t, v in shared), default=None)}
    agree = len({tuple(c["tokens"]) for c in exact.values()}) == 1 if len(exact) > 1 else None
    return {"greedy_tokens_agree": agree, "top": top}


# (engine, over): the decode speed-ups the report states: rgemma's quantized weights over its float ones,
# and rgemma over each reference implementation.
RATIO_PAIRS = (*((name, "rgemma") for name in QUANTIZED_ENGINES), ("rgemma", "transformers"), ("rgemma", "official"))


def decode_ratios(engines: dict) -> dict[tuple[str, str], dict[int, dict]]:
    """Decode speed of each pair's engine over the other, by batch size: {"ratio": the median over rounds,
    "rounds": each round's}. Within a round the engines ran one after the other."""
    out = {}
    for name, over in RATIO_PAIRS:
        over_rows = {row["batch_size"]: row for row in engines.get(over, {}).get("decode", [])}
        by_batch = {}
        for row in engines.get(name, {}).get("decode", []):
            if row["batch_size"] in over_rows:
                ratios = [slow / fast for slow, fast in zip(over_rows[row["batch_size"]]["rounds_step_seconds"],
                                                            row["rounds_step_seconds"])]
                by_batch[row["batch_size"]] = {"ratio": statistics.median(ratios), "rounds": ratios}
        if by_batch:
            out[name, over] = by_batch
    return out


# Report ------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    rows = [row + [""] * (len(header) - len(row)) for row in rows]
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _section(title: str, header: list[str], engines: dict, section: str, key: str,
             cells: Callable[[dict], list[str]]) -> list[str]:
    """A table of one section of every engine, by `key` then engine; a line for each engine that did not run."""
    rows = sorted(([str(r[key]), name, *cells(r)] for name, e in engines.items() for r in e.get(section, [])),
                  key=lambda row: int(row[0]))
    missing = [f"{name}: {e['status']}" for name, e in engines.items() if e["status"] != "ok"]
    return ["", title, *_table(header, rows), *missing]


def _memory_key(results: dict) -> str:
    return "peak_rss_bytes" if results["machine"]["device"] == "cpu" else "peak_cuda_bytes"


def report(results: dict) -> str:
    model, roof, machine, settings = results["model"], results["roofline"], results["machine"], results["settings"]
    memory = _memory_key(results)
    memory_name = "peak RSS GiB" if memory == "peak_rss_bytes" else "peak CUDA GiB"
    probes = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in roof["bandwidth"]["probes"].items())
    gemm = ", ".join([f"{k} {v / 1e9:.3g}" for k, v in roof["matmul"]["by_dtype"].items()]
                     + [f"{k} not native here, not measured" for k in roof["matmul"]["not_native"]])
    engines = results["engines"]
    rounds = f", the median round of {settings['rounds']}" if settings["rounds"] > 1 else ""
    out = [
        f"rgemma bench: {model['source']}, {model['dtype']}, {machine['device']} ({machine['cpu_capability']}), "
        f"{machine['threads']} threads, torch {machine['torch']}",
        f"weights: {model['parameters']:,} parameters, {_gib(model['weight_bytes'])} GiB; "
        f"state {_mib(model['state_bytes_per_sequence'])} MiB per sequence in {model['dtype']}",
        f"roofline: read bandwidth {roof['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s at the start ({probes}); "
        f"GEMM {'x'.join(map(str, roof['matmul']['shape']))} GFLOP/s: {gemm}",
        "",
        "load, each engine in its own process",
        *_table(["engine", "status", "seconds", "peak RSS GiB", "RSS after GiB"], [
            [name, e["status"], *([f"{e['load']['seconds']:.1f}", _gib(e["load"]["peak_rss_bytes"]),
                                   _gib(e["load"]["rss_bytes"])] if "load" in e else [])]
            for name, e in engines.items()]),
    ]
    out += _section(
        f"prefill, batch 1, best of {settings['prefill_repeats']}; "
        "roofline: 2 FLOPs x non-embedding parameters x tokens at the best GEMM rate",
        ["prompt", "engine", "tokens/s", "first token s", memory_name, "% roofline"], engines, "prefill",
        "prompt_length", lambda r: [f"{r['tokens_per_s']:.1f}", f"{r['first_token_s']:.2f}", _gib(r[memory]),
                                    f"{100 * r['roofline_fraction']:.0f}"])
    out += _section(
        f"decode, greedy, after a {min(settings['prompt_lengths'])}-token prompt, median of {settings['decode_steps']} "
        f"steps{rounds}; roofline: weights + batch x rgemma state read once per step at the read bandwidth probed "
        "in the engine's process right after its steps",
        ["batch", "engine", "tokens/s", "ms/token", memory_name, "cache MiB", "probe GB/s", "% roofline"], engines,
        "decode", "batch_size", lambda r: [f"{r['tokens_per_s']:.2f}", f"{r['latency_ms']:.1f}", _gib(r[memory]),
                                           _mib(r["cache_bytes"]), f"{r['bandwidth_bytes_per_s'] / 1e9:.1f}",
                                           f"{100 * r['roofline_fraction']:.0f}"])
    for (name, over), by_batch in decode_ratios(engines).items():
        against = f"rgemma's {model['dtype']} weights" if over == "rgemma" else over
        out.append(f"{name} decode over {against}: " + ", ".join(
            f"{r['ratio']:.2f}x at batch {batch}"
            + (f" (rounds: {', '.join(f'{x:.2f}' for x in r['rounds'])})" if len(r["rounds"]) > 1 else "")
            for batch, r in by_batch.items()))
    same = results["agreement"]
    agree = {True: "agree", False: "DIFFER", None: "(fewer than two float engines)"}[same["greedy_tokens_agree"]]
    checks = "; ".join(f"{name} {e['check']['tokens']}" for name, e in engines.items()
                       if "check" in e and name not in QUANTIZED_ENGINES)
    out += ["", f"greedy tokens on the same weights {agree}: {checks}"]
    out += [f"first prediction's top {CHECK_TOP} tokens, {name} against {t['against']}: {t['shared']} of {t['of']} shared"
            + ("" if t["max_logit_difference"] is None else f", logits within {t['max_logit_difference']:.2g}")
            for name, t in same["top"].items()]
    growth = results.get("context_growth")
    if growth:
        t = growth["transformer"]
        fill = ("caches and states filled with random values of the right shape" if growth["fill"] == "random"
                else "caches and states built by a chunked prefill")
        out += _section(
            f"context growth, decode at batch 1, {fill}; gemma = transformers GemmaForCausalLM "
            f"(hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, {t['num_attention_heads']} heads, "
            f"{t['num_key_value_heads']} KV head, head dim {t['head_dim']}, random weights)",
            ["context", "engine", "tokens/s", "ms/token", "cache/state MiB", memory_name], growth["engines"],
            "context", "context", lambda r: [f"{r['tokens_per_s']:.2f}", f"{r['latency_ms']:.1f}",
                                             _mib(r["cache_bytes"]), _gib(r[memory])])
    return "\n".join(out)


def plot(results: dict, path: str) -> None:
    """Decode tokens/s and memory against context (or prefill against prompt length without --context-growth)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    memory = _memory_key(results)
    growth = results.get("context_growth")
    if growth:
        series = {name: e.get("context", []) for name, e in growth["engines"].items()}
        x_key, x_label, speed, title = "context", "context (tokens)", "decode tokens/s (batch 1)", "decode as the context grows"
    else:
        series = {name: e.get("prefill", []) for name, e in results["engines"].items()}
        x_key, x_label, speed, title = "prompt_length", "prompt (tokens)", "prefill tokens/s", "prefill"
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    for name, rows in series.items():
        if not rows:
            continue
        x = [r[x_key] for r in rows]
        line, = left.plot(x, [r["tokens_per_s"] for r in rows], marker="o", label=name)
        right.plot(x, [r[memory] / 2**30 for r in rows], marker="o", color=line.get_color(), label=f"{name} peak")
        if "cache_bytes" in rows[0]:
            right.plot(x, [r["cache_bytes"] / 2**30 for r in rows], marker="s", linestyle="--",
                       color=line.get_color(), label=f"{name} cache/state")
    for axes, y_label in ((left, speed), (right, "GiB")):
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3)
        axes.legend()
    model = results["model"]
    figure.suptitle(f"{title}: {model['source']}, {model['dtype']}, {results['machine']['device']}")
    figure.savefig(path, dpi=120)


if __name__ == "__main__":  # one engine's measurements, in its own process
    job = json.loads(sys.argv[1])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    measure(job)
