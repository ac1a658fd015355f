"""Peak resident memory of `rgemma.load_model` against the size of the weights.

Writes a random-weights checkpoint (default: the 2b preset in bfloat16, about
5.4 GB) into a temporary directory, loads it in a fresh process, and reports
that process's peak RSS after loading and after one forward pass (which
touches every weight), next to its RSS before loading. The checkpoint is
deleted afterwards.

    python scripts/measure_load_memory.py [--preset 2b] [--format hf|pt] [--dir DIR]

`--format pt` writes the official PyTorch layout with the `recurrentgemma` package.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# A child's ru_maxrss starts from its parent's peak (Linux carries it across
# fork and exec), so this process stays small: writing and loading each run
# in a fresh interpreter.
WRITER = """
import json, sys, torch, rgemma
from rgemma.bench import official_config
from pathlib import Path

def randomise_(module):
    # Allocate the meta-device parameters and fill them, one tensor at a time.
    module.to_empty(device="cpu")
    with torch.no_grad():
        for param in module.parameters():
            param.uniform_(-0.02, 0.02)
    return module

preset, layout, directory = sys.argv[1], sys.argv[2], Path(sys.argv[3])
config = rgemma.Config.preset(preset)
if layout == "hf":
    model = randomise_(rgemma.Griffin(config, dtype=torch.bfloat16, device="meta"))
    path = rgemma.save_model(model, directory / "model")
else:
    from recurrentgemma.torch import griffin
    model = randomise_(griffin.Griffin(official_config(config), device="meta", dtype=torch.bfloat16))
    path = directory / "model.pt"
    torch.save(model.state_dict(), path)
weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"path": str(path), "weight_bytes": weight_bytes}))
"""

LOADER = """
import json, resource, sys, torch, rgemma

def peak():  # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

before = peak()
model = rgemma.load_model(sys.argv[1])
loaded = peak()
with torch.no_grad():
    model(torch.tensor([[2, 3, 4]]))
print(json.dumps({"before": before, "loaded": loaded, "forward": peak(), "dtype": str(model.dtype)}))
"""


def run(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--format", choices=("hf", "pt"), default="hf")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the temporary checkpoint")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        written = run(WRITER, args.preset, args.format, directory)
        rss = run(LOADER, written["path"])
    weight_bytes, gib = written["weight_bytes"], 2**30
    print(f"{args.preset} {rss['dtype']}, {args.format} layout: weights {weight_bytes / gib:.2f} GiB")
    print(f"RSS before loading (python, torch, rgemma): {rss['before'] / gib:.2f} GiB")
    for stage in ("loaded", "forward"):
        added = rss[stage] - rss["before"]
        print(
            f"peak RSS after {stage:7s}: {rss[stage] / gib:.2f} GiB; "
            f"above the baseline {added / gib:.2f} GiB = {added / weight_bytes:.3f} x weights; "
            f"total = {rss[stage] / weight_bytes:.3f} x weights"
        )


if __name__ == "__main__":
    main()
