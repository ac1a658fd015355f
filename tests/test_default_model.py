"""The embedded default model: the installed `rgemma` command writes English out of the box."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rgemma.hub import DEFAULT_MODEL

WORDS = {w for w in (Path(__file__).parent / "data" / "english_words.txt").read_text().split("\n")[1:] if w}


def rgemma_command():
    installed = shutil.which("rgemma")
    return [installed] if installed else [sys.executable, "-m", "rgemma.cli"]


def test_the_default_model_is_shipped_small():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "README.md"} <= files.keys()
    assert sum(files.values()) < 20 * 2**20


@pytest.mark.parametrize("seed", [1, 2])
def test_default_command_writes_mostly_english(seed):
    result = subprocess.run([*rgemma_command(), "generate", "It was a fine morning, and", "--max-tokens", "80",
                             "--seed", str(seed)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    words = re.findall(r"[A-Za-z]+", result.stdout)
    assert len(words) >= 30, result.stdout
    known = sum(w.lower() in WORDS for w in words) / len(words)
    assert known >= 0.85, (known, result.stdout)
    assert re.search(r"[.,;!?]", result.stdout), result.stdout  # sentences, not a word list


def test_info_describes_the_default_model():
    result = subprocess.run([*rgemma_command(), "info"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "embedded default" in result.stdout and "RRARRARRA" in result.stdout
    # How this machine serves it, as `rgemma.prepare` decides (bf16 weights: float32 activations unless the
    # CPU computes bf16 natively).
    backend = (r"^backend +cpu on cpu: activations in (float32|bfloat16), "
               r"decode steps (native, kernels [a-z0-9-]+|plain)$")
    assert re.search(backend, result.stdout, re.MULTILINE), result.stdout
