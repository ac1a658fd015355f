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
per token). Each measurement is reported as a fraction of its bound. A
machine's bandwidth drifts, on shared machines by more than the differences
between engines, so each decode measurement's bound takes the bandwidth
probed in its engine's process right after its steps.

`--engines rgemma,rgemma-int8,rgemma-int4` adds rgemma with the same weights
quantized at load, and reports each one's decode speed over the float weights.

`--context-growth` decodes at growing context lengths against a transformer
of the same size (transformers' Gemma; Gemma-2B for RecurrentGemma-2B), whose
KV cache grows with the context while Griffin's state stays fixed.

engines.py (what is compared), measure.py (one engine's process; it runs as
`python -m rgemma.bench JOB`), roofline.py (this machine's bounds), run.py
(the parent: settings, processes, rounds), report.py (agreement, speed-ups,
tables, plot).
"""

from rgemma.bench.engines import (
    CONTEXT_ENGINES,
    ENGINE_NAMES,
    ENGINES,
    QUANTIZED_ENGINES,
    gemma_config,
    installed,
    official_config,
    random_model,
    randomise_,
)
from rgemma.bench.measure import CHECK_TOKENS, CHECK_TOP, Job, measure
from rgemma.bench.report import agreement, decode_ratios, plot, report
from rgemma.bench.roofline import matmul_throughput, read_bandwidth
from rgemma.bench.run import DEFAULT_CONTEXT_LENGTHS, Settings, run

__all__ = [
    "CHECK_TOKENS", "CHECK_TOP", "CONTEXT_ENGINES", "DEFAULT_CONTEXT_LENGTHS", "ENGINES", "ENGINE_NAMES", "Job",
    "QUANTIZED_ENGINES", "Settings", "agreement", "decode_ratios", "gemma_config", "installed", "matmul_throughput",
    "measure", "official_config", "plot", "random_model", "randomise_", "read_bandwidth", "report", "run",
]
