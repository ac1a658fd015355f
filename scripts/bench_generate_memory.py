"""Memory while generating a long sequence: flat, because the state has a fixed size.

Generates N tokens (ignoring eos) from a random-weights model through the
same engine the CLI uses, and samples the process's resident memory as it goes:

    python scripts/bench_generate_memory.py --preset tiny --window 2048 --vocab 32000 --tokens 50000

Prints RSS every --every tokens, and the growth after the first window of
tokens (once the attention ring buffers are full, nothing should grow).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm import tqdm

import rgemma
from rgemma.engine import Engine, Request
from rgemma.generate import Generation
from rgemma.sampling import SamplingParams

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--window", type=int, help="override the attention window")
    parser.add_argument("--vocab", type=int, help="override the vocabulary size")
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--every", type=int, default=5_000)
    parser.add_argument("--json", help="also write the samples to this file")
    args = parser.parse_args()

    overrides = {k: v for k, v in (("attention_window", args.window), ("vocab_size", args.vocab)) if v}
    torch.manual_seed(0)
    model = rgemma.Griffin(rgemma.Config.preset(args.preset, **overrides)).eval()
    request = Request([2, 10, 20, 30], SamplingParams(temperature=1.0, seed=0), max_tokens=args.tokens, ignore_eos=True)
    generation = Generation(Engine(model), [request])
    samples = []
    start = time.perf_counter()
    with tqdm(total=args.tokens, unit="tok", desc="generating") as bar:
        for step, _ in enumerate(generation, start=1):
            bar.update()
            if step == 1 or step % args.every == 0:
                samples.append({"tokens": step, "rss_bytes": rss_bytes(), "seconds": time.perf_counter() - start})

    window = model.config.attention_window
    print(f"preset {args.preset} {overrides}, state {generation.stats.state_bytes:,} bytes, "
          f"{generation.stats.decode_tokens_per_s:.0f} tok/s")
    print(f"{'tokens':>8} {'RSS MiB':>9}")
    for sample in samples:
        print(f"{sample['tokens']:>8} {sample['rss_bytes'] / 2**20:>9.1f}")
    settled = [s["rss_bytes"] for s in samples if s["tokens"] > window]
    if len(settled) >= 2:
        print(f"growth from {samples[-len(settled)]['tokens']} to {samples[-1]['tokens']} tokens: "
              f"{(settled[-1] - settled[0]) / 2**20:+.1f} MiB (max-min {(max(settled) - min(settled)) / 2**20:.1f} MiB)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(samples, out, indent=1)


if __name__ == "__main__":
    main()
