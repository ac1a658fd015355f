"""This machine's bounds, measured in the same run as the engines.

Read bandwidth bounds a decode step: every weight and each row's state are
read once per step. GEMM throughput bounds prefill: 2 FLOPs per weight that
multiplies a token, per token. Each measurement is reported as a fraction of
its bound (the bound's seconds over the measured seconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

BANDWIDTH_PROBE_BYTES = 2**28  # far past any CPU's last-level cache
MAX_GEMM_TOKENS = 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int, budget: float = 2.0) -> float:
    """The fastest of `repeats` timed calls after a warm-up; fewer once `budget` seconds are spent."""
    seconds = []
    while len(seconds) <= repeats and sum(seconds) <= budget:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:] or seconds)  # the warm-up counts only when it is all there is


def read_bandwidth(device: torch.device) -> dict:
    """Bytes/s reading a 256 MiB tensor: torch's sum, and rgemma's native read loop on CPUs that build it."""
    from rgemma.backends.native import kernels

    probe = torch.ones(BANDWIDTH_PROBE_BYTES // 4, dtype=torch.float32, device=device)
    probes = {"torch_sum": lambda: probe.sum()}
    native = kernels() if device.type == "cpu" else None
    if native is not None:
        probes["native_read_all"] = lambda: native.read_all(probe)
    found = {name: BANDWIDTH_PROBE_BYTES / best_seconds(fn, device, repeats=5) for name, fn in probes.items()}
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
        found[str(kind).removeprefix("torch.")] = 2 * m * k * n / best_seconds(lambda: a @ b, device, repeats=3)
    not_native = [] if native == dtype else [str(dtype).removeprefix("torch.")]
    return {"flops_per_s": max(found.values()), "by_dtype": found, "not_native": not_native, "shape": list(shape)}


def add_fractions(results: dict) -> None:
    """Add each prefill and decode row's bound and its fraction of it to the run's results."""
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
