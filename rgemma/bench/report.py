"""What a run's results say: whether the engines agree, the decode speed-ups, the tables and the plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from rgemma.bench.engines import QUANTIZED_ENGINES
from rgemma.bench.measure import CHECK_TOP

# (engine, over): the decode speed-ups the report states: rgemma's quantized weights over its float ones,
# and rgemma over each reference implementation.
RATIO_PAIRS = (*((name, "rgemma") for name in QUANTIZED_ENGINES), ("rgemma", "transformers"), ("rgemma", "official"))


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
    """The run's results as the tables `rgemma bench` prints."""
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
