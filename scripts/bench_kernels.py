"""Read bandwidth of the native weight products, per kernel level, against this machine's read roofline.

    python scripts/bench_kernels.py [--rows 15360 --inputs 2560 --batch 1 4 --levels avx2 avx512-vnni-bf16]

Prints GB/s of weights read per product (bf16, int8, int4) and the fraction of
the same run's bandwidth probe (the native read loop over 256 MiB).
"""

import argparse

import torch

from rgemma.backends.native import kernels, machine_levels
from rgemma.bench.roofline import best_seconds, read_bandwidth
from rgemma.quantize import DEFAULT_GROUP_SIZE, quantize_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=15360)
    parser.add_argument("--inputs", type=int, default=2560)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--levels", nargs="+", default=machine_levels())
    args = parser.parse_args()
    cpu = torch.device("cpu")
    weight = torch.randn(args.rows, args.inputs) / args.inputs**0.5
    formats = {"bf16": {"weight": weight.bfloat16()}, "int8": quantize_weight(weight, 8), "int4": quantize_weight(weight, 4)}
    roof = read_bandwidth(cpu)["bytes_per_s"]
    print(f"read roofline {roof / 1e9:.1f} GB/s; weights {args.rows} x {args.inputs}")
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
                read = sum(t.numel() * t.element_size() for t in formats[name].values() if t.dim() > 0)
                seconds = best_seconds(product, cpu, repeats=20)
                cells.append(f"{name} {read / seconds / 1e9:5.1f} GB/s ({read / seconds / roof:4.0%}, {seconds * 1e3:5.2f} ms)")
            print(f"{level:17s} batch {batch}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
