"""Training throughput: rgemma against the official PyTorch Griffin, same size, same batch, one run.

One step = forward, next-token cross-entropy, backward, gradient clipping and
an AdamW update. Variants:
    official        recurrentgemma.torch.Griffin + F.cross_entropy on its logits
    rgemma-plain    our model's logits + F.cross_entropy (the same loss code as official)
    rgemma          what `rgemma train` runs: model(..., hidden_only=True) + chunked fused loss
    rgemma-bf16     the same under bfloat16 autocast
    rgemma-compile  the same with torch.compile of the model (compile time reported apart)

    python scripts/bench_train.py                       # shipped size, fp32
    python scripts/bench_train.py --variants official rgemma rgemma-bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/reference.py

from rgemma import Config, Griffin  # noqa: E402
from rgemma.config import griffin_pattern  # noqa: E402
from rgemma.train import IGNORE, autocast, next_token_loss, parameter_groups  # noqa: E402


def official_step_fn(config: Config):
    from recurrentgemma.torch import Griffin as OfficialGriffin
    from reference import official_config

    model = OfficialGriffin(official_config(config), gradient_checkpointing=False)

    def loss_fn(tokens, positions, targets):
        logits, _ = model(tokens, positions, return_cache=False)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)

    return model, loss_fn


def rgemma_step_fn(config: Config, variant: str):
    model = Griffin(config)
    forward = torch.compile(model) if variant == "rgemma-compile" else model
    dtype = "bfloat16" if variant == "rgemma-bf16" else "float32"

    def loss_fn(tokens, positions, targets):
        with autocast(dtype):
            if variant == "rgemma-plain":
                logits, _ = model(tokens, positions)
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
            hidden, _ = forward(tokens, positions, hidden_only=True)
            return next_token_loss(model, hidden, targets)

    return model, loss_fn


def setup(variant: str, config: Config):
    torch.manual_seed(0)
    model, loss_fn = official_step_fn(config) if variant == "official" else rgemma_step_fn(config, variant)
    model.train()
    groups = parameter_groups(model, 0.1) if variant != "official" else [{"params": list(model.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(tokens, positions, targets) -> float:
        loss = loss_fn(tokens, positions, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench(variants: list[str], config: Config, batch: tuple, steps: int, warmup: int) -> dict:
    """Steps taken in turn, one variant after another, so that drift in the shared machine's speed hits all alike."""
    step_fns = {variant: setup(variant, config) for variant in variants}
    times = {variant: [] for variant in variants}
    first_loss = {}
    for i in range(warmup + steps):
        for variant, step in step_fns.items():
            start = time.perf_counter()
            loss = step(*batch)
            times[variant].append(time.perf_counter() - start)
            first_loss.setdefault(variant, loss)
    results = {}
    for variant in variants:
        step_s = statistics.median(times[variant][warmup:])
        results[variant] = {"step_s": step_s, "tokens_per_s": batch[0].numel() / step_s,
                            "first_step_s": times[variant][0], "first_loss": first_loss[variant]}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--variants", nargs="+", default=["official", "rgemma-plain", "rgemma", "rgemma-bf16"],
                        choices=["official", "rgemma-plain", "rgemma", "rgemma-bf16", "rgemma-compile"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config(vocab_size=args.vocab, width=args.width, mlp_width=3 * args.width, num_heads=args.heads,
                    lru_width=args.width, block_types=griffin_pattern(args.layers), attention_window=args.window)
    # Packed rows: documents of random lengths, positions restarting at each.
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len)
    tokens = torch.randint(3, args.vocab, shape, generator=generator)
    targets = torch.randint(3, args.vocab, shape, generator=generator)
    starts = torch.rand(shape, generator=generator) < 1 / 200
    starts[:, 0] = True
    index = torch.arange(args.seq_len).expand(shape)
    positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    batch = (tokens, positions, targets)
    params = sum(p.numel() for p in Griffin(config, device="meta").parameters())
    print(f"config: width {args.width}, {args.layers} blocks, heads {args.heads}, lru {args.width}, "
          f"mlp {3 * args.width} x2, window {args.window}, vocab {args.vocab}; {params / 1e6:.1f}M parameters; "
          f"batch {args.batch_size} x {args.seq_len}; {torch.get_num_threads()} threads; "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    results = bench(args.variants, config, batch, args.steps, args.warmup)
    for variant, result in results.items():
        print(f"{variant:15s} {result['tokens_per_s']:8.0f} tokens/s  {result['step_s']:.3f} s/step  "
              f"(first step {result['first_step_s']:.1f} s, loss {result['first_loss']:.3f})", flush=True)
    if "official" in results:
        base = results["official"]["tokens_per_s"]
        for variant, result in results.items():
            if variant != "official":
                print(f"{variant} / official: {result['tokens_per_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
