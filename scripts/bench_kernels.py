"""The native weight products per kernel level: bf16, int8 and int4 weights, at several rows of x.

    python scripts/bench_kernels.py [--rows 15360 --inputs 2560 --batch 1 4 16 --levels avx2 avx512-vnni-bf16]
    python scripts/bench_kernels.py --arithmetic [--rows 1024]

By default, all threads and weights far past the caches: GB/s of weights
read per product, and the fraction of the same run's bandwidth probe (the
native read loop over 256 MiB). With --arithmetic, one thread on weights
that fit its caches, timed by the thread's own CPU time: the cost of the
arithmetic alone, which holds still while other processes load the machine
(wall-clock figures do not).
"""

import argparse
import time

import torch

from rgemma.backends.native import kernels, machine_levels
from rgemma.bench.roofline import best_seconds, read_bandwidth
from rgemma.quantize import DEFAULT_GROUP_SIZE, quantize_weight


def thread_seconds(fn, calls: int = 100, repeats: int = 5) -> float:
    """The fastest of `repeats` mean thread CPU times of `calls` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, help="weight rows (default 15360, or 1024 with --arithmetic)")
    parser.add_argument("--inputs", type=int, default=2560)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--levels", nargs="+", default=machine_levels())
    parser.add_argument("--arithmetic", action="store_true", help="one thread, cached weights, thread CPU time")
    args = parser.parse_args()
    rows = args.rows or (1024 if args.arithmetic else 15360)
    cpu = torch.device("cpu")
    weight = torch.randn(rows, args.inputs) / args.inputs**0.5
    formats = {"bf16": {"weight": weight.bfloat16()}, "int8": quantize_weight(weight, 8),
               "int4": quantize_weight(weight, 4)}
    if args.arithmetic:
        torch.set_num_threads(1)
        print(f"one thread, thread CPU time; weights {rows} x {args.inputs}")
    else:
        roof = read_bandwidth(cpu)["bytes_per_s"]
        print(f"read roofline {roof / 1e9:.1f} GB/s; weights {rows} x {args.inputs}")
    for level in args.levels:
        native = kernels(level)
        for batch in args.batch:
            x = torch.randn(batch, args.inputs)
            products = {
                "bf16": lambda: native.float_linear(x, formats["bf16"]["weight"]),
                "int8": lambda: native.int8_linear(x, formats["int8"]["qweight"], formats["int8"]["scale"]),
                "int4": lambda: native.int4_linear(x, formats["int4"]["qweight"], formats["int4"]["scale"],
                                                   formats["int4"]["minimum"], DEFAULT_GROUP_SIZE),
            }
            cells = []
            for name, product in products.items():
                if args.arithmetic:
                    seconds = thread_seconds(product)
                    cells.append(f"{name} {rows * args.inputs / seconds / 1e9:5.1f} Gweights/s")
                else:
                    read = sum(t.numel() * t.element_size() for t in formats[name].values())
                    seconds = best_seconds(product, cpu, repeats=20)
                    cells.append(f"{name} {read / seconds / 1e9:5.1f} GB/s ({read / seconds / roof:4.0%})")
            print(f"{level:17s} batch {batch:2d}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
