"""Forward-pass speed and memory: rgemma against the official PyTorch implementation.

Each measurement runs in a fresh subprocess (so peak RSS is its own), on
random weights of the chosen preset:

    python scripts/bench_forward.py --preset 2b --dtype float32 --tokens 1024
    python scripts/bench_forward.py --preset 2b --dtype float32 --prefill 4096 32768

The first compares one full forward pass (logits for every token) of both
implementations; the second reads long prompts with `Griffin.prefill` and
shows that peak memory stays at the weights plus one chunk, whatever the length.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _random_(model: torch.nn.Module) -> None:
    """Fill an uninitialised model quickly; speed does not depend on the values."""
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02)


def _build(implementation: str, preset: str, dtype: torch.dtype) -> torch.nn.Module:
    import rgemma

    config = rgemma.Config.preset(preset)
    if implementation == "rgemma":
        model = rgemma.Griffin(config, dtype=dtype, device="meta")
    else:
        sys.path.insert(0, "tests")
        from reference import official_config
        from recurrentgemma.torch import griffin

        model = griffin.Griffin(official_config(config), gradient_checkpointing=False, device="meta", dtype=dtype)
    model = model.to_empty(device="cpu")
    _random_(model)
    return model.eval()


def _forward(model, implementation: str, tokens: torch.Tensor):
    if implementation == "rgemma":
        return model(tokens)[0]
    positions = torch.arange(tokens.shape[1]).repeat(tokens.shape[0], 1)
    return model(tokens, positions, return_cache=False)[0]


def measure(implementation: str, preset: str, dtype_name: str, mode: str, length: int) -> dict:
    dtype = getattr(torch, dtype_name)
    model = _build(implementation, preset, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _forward(model, implementation, tokens[:, :16])  # warm-up: kernel selection, allocator
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        if mode == "forward":
            _forward(model, implementation, tokens)
        else:
            model.prefill(tokens)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "implementation": implementation, "mode": mode, "tokens": length, "seconds": seconds,
        "tokens_per_s": length / seconds, "weight_bytes": weight_bytes, "peak_rss": peak,
        "peak_over_weights": peak - weight_bytes, "rss_before": rss_before,
    }


def _in_subprocess(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=1024, help="forward-pass length for the side-by-side")
    parser.add_argument("--prefill", type=int, nargs="*", default=[], help="prompt lengths for rgemma's prefill")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        implementation, preset, dtype_name, mode, length = args.child
        print(json.dumps(measure(implementation, preset, dtype_name, mode, int(length))))
        return

    rows = []
    if args.tokens:
        for implementation in ("official", "rgemma"):
            print(f"forward {args.tokens} tokens: {implementation} ...", file=sys.stderr, flush=True)
            rows.append(_in_subprocess(implementation, args.preset, args.dtype, "forward", args.tokens))
    for length in args.prefill:
        print(f"prefill {length} tokens: rgemma ...", file=sys.stderr, flush=True)
        rows.append(_in_subprocess("rgemma", args.preset, args.dtype, "prefill", length))

    print(f"\npreset {args.preset}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'implementation':<14} {'mode':<8} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'peak RSS GiB':>13} {'over weights GiB':>17}")
    for row in rows:
        print(f"{row['implementation']:<14} {row['mode']:<8} {row['tokens']:>7} {row['seconds']:>8.1f} "
              f"{row['tokens_per_s']:>7.1f} {row['peak_rss'] / 2**30:>13.2f} {row['peak_over_weights'] / 2**30:>17.2f}")
    forward = {row["implementation"]: row for row in rows if row["mode"] == "forward"}
    if len(forward) == 2:
        ratio = forward["rgemma"]["tokens_per_s"] / forward["official"]["tokens_per_s"]
        print(f"rgemma / official forward speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
