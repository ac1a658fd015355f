"""`rgemma bench`: three engines (and rgemma quantized) on the same weights, every number reported, one-line errors."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

import rgemma
from rgemma import bench
from rgemma.cli import main

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ENGINES = ["rgemma", "rgemma-int8", "rgemma-int4", "transformers", "official"]
PNG = b"\x89PNG\r\n\x1a\n"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One end-to-end run through the CLI, in a real process: (stdout, JSON, output directory)."""
    out = tmp_path_factory.mktemp("bench")
    # One thread: a tiny model gains nothing from more, and the tests share the machine.
    args = ["--preset", "tiny", "--dtype", "float32", "--engines", ",".join(ENGINES),
            "--prompt-lengths", "16,32", "--batch-sizes", "1,2",
            "--decode-steps", "3", "--warmup", "1", "--prefill-repeats", "2", "--rounds", "2", "--threads", "1",
            "--json", out / "bench.json"]
    if HAS_MATPLOTLIB:
        args += ["--plot", out / "bench.png"]
    result = subprocess.run([sys.executable, "-m", "rgemma.cli", "bench", *map(str, args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads((out / "bench.json").read_text()), out


def test_every_engine_is_measured(run):
    stdout, results, _ = run
    assert list(results["engines"]) == ENGINES
    assert results["machine"]["threads"] == 1 and "context_growth" not in results
    for name, engine in results["engines"].items():
        assert engine["status"] == "ok", name
        assert positive(engine["load"]["seconds"]) and positive(engine["load"]["peak_rss_bytes"])
        if name in bench.QUANTIZED_ENGINES:  # the quantized format's bytes, which the decode roofline reads
            assert 0 < engine["load"]["weight_bytes"] < results["model"]["weight_bytes"]
        else:
            assert engine["load"]["weight_bytes"] == results["model"]["weight_bytes"]
        assert [row["prompt_length"] for row in engine["prefill"]] == [16, 32]
        assert [row["batch_size"] for row in engine["decode"]] == [1, 2]
        for row in engine["prefill"]:
            for key in ("seconds", "tokens_per_s", "first_token_s", "peak_rss_bytes", "roofline_seconds",
                        "roofline_fraction"):
                assert positive(row[key]), (name, key, row)
        for row in engine["decode"]:
            for key in ("tokens_per_s", "latency_ms", "step_seconds_median", "step_seconds_mean", "peak_rss_bytes",
                        "cache_bytes", "bandwidth_bytes_per_s", "roofline_seconds", "roofline_fraction"):
                assert positive(row[key]), (name, key, row)
            # The bound: this engine's weights and the rows' states at the bandwidth probed right after its steps.
            read = engine["load"]["weight_bytes"] + row["batch_size"] * results["model"]["state_bytes_per_sequence"]
            assert row["roofline_seconds"] == pytest.approx(read / row["bandwidth_bytes_per_s"])
            assert row["roofline_fraction"] == pytest.approx(row["roofline_seconds"] / row["step_seconds_median"])
            assert row["context"] == 16
            # Two rounds, the engines taking turns; the row is the median round's (the lower of two).
            assert len(row["rounds_step_seconds"]) == 2 and all(map(positive, row["rounds_step_seconds"]))
            assert row["step_seconds_median"] == min(row["rounds_step_seconds"])
        assert stdout.count(f"\n{name} ") >= 1
    assert "prefill, batch 1, best of 2" in stdout and results["settings"]["prefill_repeats"] == 2
    decode = results["engines"]["rgemma"]["decode"]
    assert decode[1]["cache_bytes"] == 2 * decode[0]["cache_bytes"] == 2 * results["model"]["state_bytes_per_sequence"]


def test_decode_speedups_are_stated_round_by_round(run):
    """Quantized rgemma over its float weights, rgemma over each reference: every round's ratio of step times,
    and their median."""
    stdout, results, _ = run
    engines = results["engines"]
    ratios = bench.decode_ratios(engines)
    assert list(ratios) == [("rgemma-int8", "rgemma"), ("rgemma-int4", "rgemma"), ("rgemma", "transformers"),
                            ("rgemma", "official")]
    for (name, over), by_batch in ratios.items():
        assert list(by_batch) == [1, 2]
        for batch, ratio in by_batch.items():
            seconds = [next(r["rounds_step_seconds"] for r in engines[e]["decode"] if r["batch_size"] == batch)
                       for e in (name, over)]
            assert ratio["rounds"] == pytest.approx([slow / fast for fast, slow in zip(*seconds)])
            assert ratio["ratio"] == pytest.approx(sum(ratio["rounds"]) / 2)  # the median of two
        against = "rgemma's float32 weights" if over == "rgemma" else over
        rounds = ", ".join(f"{x:.2f}" for x in by_batch[1]["rounds"])
        assert f"{name} decode over {against}: {by_batch[1]['ratio']:.2f}x at batch 1 (rounds: {rounds})" in stdout
    for name in bench.QUANTIZED_ENGINES:
        # Their top tokens are compared with rgemma's (random weights: nearly equal logits, any overlap).
        top = results["agreement"]["top"][name]
        assert top["against"] == "rgemma" and top["of"] == bench.CHECK_TOP and 0 <= top["shared"] <= bench.CHECK_TOP
        assert f"first prediction's top {bench.CHECK_TOP} tokens, {name} against rgemma" in stdout


def test_roofline_is_measured_in_the_same_run(run):
    _, results, _ = run
    bandwidth, matmul = results["roofline"]["bandwidth"], results["roofline"]["matmul"]
    assert positive(bandwidth["bytes_per_s"]) and "torch_sum" in bandwidth["probes"]
    assert bandwidth["bytes_per_s"] == max(bandwidth["probes"].values())
    assert positive(matmul["flops_per_s"]) and positive(matmul["by_dtype"]["float32"])
    config = rgemma.Config.preset("tiny")
    assert matmul["shape"] == [32, config.width, config.mlp_width]
    model = results["model"]
    assert model["flop_parameters"] == model["parameters"] - config.vocab_size * config.width
    assert model["weight_bytes"] == 4 * model["parameters"]


def test_engines_produce_the_same_greedy_tokens(run):
    stdout, results, _ = run
    tokens = [engine["check"]["tokens"] for name, engine in results["engines"].items()
              if name not in bench.QUANTIZED_ENGINES]
    assert len(tokens[0]) == bench.CHECK_TOKENS
    assert tokens[1:] == tokens[:1] * 2
    assert len(set(tokens[0])) > 1  # the layers, not the prompt's last token, decide
    same = results["agreement"]
    assert same["greedy_tokens_agree"] is True
    assert "greedy tokens on the same weights agree" in stdout
    for name in ("transformers", "official"):
        top = same["top"][name]
        assert top["against"] == "rgemma" and top["shared"] == top["of"] == bench.CHECK_TOP
        assert top["max_logit_difference"] < 1e-4


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_is_a_png(run):
    _, _, out = run
    assert (out / "bench.png").read_bytes().startswith(PNG)


def test_context_growth(tmp_path, one_thread):
    """The transformer's cache grows with the context, Griffin's state does not; random and prefilled
    caches have the same shape. In this process, each engine's measurement as its child runs it."""
    config = rgemma.Config.preset("tiny")  # window 16
    path = rgemma.save_model(bench.random_model(config, torch.float32, seed=0), tmp_path / "model")
    lengths = (8, 48)
    rows = {}
    for name, source in (("rgemma", str(path)), ("gemma", bench.gemma_config(config))):
        for fill in ("random", "prefill"):
            job = bench.Job(engine=name, source=source, dtype="float32", device="cpu", seed=0,
                            vocab_size=config.vocab_size, decode_steps=2, warmup=1, context_lengths=lengths,
                            context_fill=fill)
            assert bench.Job.from_json(job.to_json()) == job  # as its process receives it
            events = list(bench.measure(job))
            assert [section for section, _ in events] == ["load", "context", "context"]
            rows[name, fill] = [fields for section, fields in events if section == "context"]
    for (name, fill), measured in rows.items():
        assert [row["context"] for row in measured] == list(lengths)
        assert all(positive(row["tokens_per_s"]) and positive(row["peak_rss_bytes"]) for row in measured)
        assert [row["cache_bytes"] for row in measured] == [row["cache_bytes"] for row in rows[name, "random"]]
    state = [row["cache_bytes"] for row in rows["rgemma", "random"]]
    cache = [row["cache_bytes"] for row in rows["gemma", "random"]]
    assert state[0] == state[1] == rgemma.State.zeros(config, 1).nbytes
    # Each decode step appends a key and a value: the cache holds the context and the steps taken.
    steps = 1 + 2  # warmup + decode_steps
    assert cache[1] - cache[0] == (lengths[1] - lengths[0]) * cache[0] // (lengths[0] + steps)

    if HAS_MATPLOTLIB:
        results = {"model": {"source": "tiny", "dtype": "float32"}, "machine": {"device": "cpu"},
                   "context_growth": {"engines": {name: {"context": rows[name, "random"]} for name in ("rgemma", "gemma")}}}
        bench.plot(results, str(tmp_path / "growth.png"))
        assert (tmp_path / "growth.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("args, message", [
    ([], "give either --preset"),
    (["--preset", "tiny", "--model", "x"], "give either --preset"),
    (["--preset", "3b"], "unknown preset '3b'"),
    (["--model", "/no/such/model"], "/no/such/model: no such file"),
    (["--preset", "tiny", "--prompt-lengths", "16,x"], "--prompt-lengths: expected positive integers"),
    (["--preset", "tiny", "--batch-sizes", "0"], "--batch-sizes: expected positive integers"),
    (["--preset", "tiny", "--context-growth", "256,-1"], "--context-growth: expected positive integers"),
    (["--preset", "tiny", "--engines", "rgemma,vllm"], "--engines: unknown vllm"),
    (["--preset", "tiny", "--decode-steps", "0"], "--decode-steps must be at least 1"),
    (["--preset", "tiny", "--prefill-repeats", "0"], "--prefill-repeats must be at least 1"),
    (["--preset", "tiny", "--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_arguments_are_one_line(capsys, args, message):
    assert main(["bench", *args]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rgemma: error: ") and message in lines[0], captured.err
    assert captured.out == ""
