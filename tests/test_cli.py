"""The `rgemma` command as a user runs it: real processes, one-line errors, no partial output."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import rgemma
from reference import official_model
from rgemma.cli import COMMANDS

COMMAND_MODULES = {module for module, _ in COMMANDS.values()}


def run(*args):
    return subprocess.run([sys.executable, "-m", "rgemma.cli", *map(str, args)], capture_output=True, text=True)


def test_info_on_a_preset():
    result = run("info", "2b")
    assert result.returncode == 0, result.stderr
    assert "2,682,862,080" in result.stdout and "RRARRA" in result.stdout


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    config = rgemma.Config.preset("tiny")
    path = tmp_path_factory.mktemp("official") / "model.pt"
    torch.save(official_model(config).state_dict(), path)
    return path


def test_convert_then_info(official_file, tmp_path):
    out = tmp_path / "hf"
    result = run("convert", official_file, out, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    info = run("info", out, "--json")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["dtype"] == "bfloat16"
    assert described["config"]["block_types"] == ["recurrent", "recurrent", "attention"]
    # The official file carries no window; the RecurrentGemma default applies.
    assert described["config"]["attention_window"] == 2048


def test_convert_shards(official_file, tmp_path):
    out = tmp_path / "hf"
    assert run("convert", official_file, out, "--max-shard-gb", 0.0002).returncode == 0
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("make_bad", ["missing", "garbage", "truncated"])
def test_bad_input_is_one_line_and_leaves_nothing(official_file, tmp_path, make_bad):
    source = tmp_path / "model.pt"
    if make_bad == "garbage":
        source.write_bytes(b"PK\x03\x04 not really a zip")
    elif make_bad == "truncated":
        data = official_file.read_bytes()
        source.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = run("convert", source, out)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rgemma: error: ") and str(source) in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_unknown_preset_or_path():
    result = run("info", "3b")
    assert result.returncode == 1
    assert "3b" in result.stderr and "Traceback" not in result.stderr


# `rgemma ARGS` in a fresh interpreter, which then names on stderr every module it has loaded.
LIST_MODULES = """import sys
from rgemma.cli import main
try:
    main(sys.argv[1:])
finally:
    print(*sys.modules, file=sys.stderr)
"""


def run_listing_modules(*args):
    result = subprocess.run([sys.executable, "-c", LIST_MODULES, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout, set(result.stderr.split())


def test_help_lists_every_subcommand_without_importing_them_or_torch():
    stdout, loaded = run_listing_modules("--help")
    assert "rgemma.cli" in loaded and "torch" not in loaded and not loaded & COMMAND_MODULES
    for name in COMMANDS:
        assert re.search(rf"^ +{name} ", stdout, re.MULTILINE), name


@pytest.mark.parametrize("command, options", [
    ("info", ["--json", "--quantize"]),
    ("generate", ["--max-tokens", "--temperature", "--save-state"]),
    ("tokenize", ["--tokenizer"]),
    ("train", ["--run-dir", "--eval-data", "--width", "--lr", "(default 0.001)"]),
    ("bench", ["--preset", "--engines", "--context-growth", "(default 256,1024,4096,8192,16384,32768)"]),
])
def test_subcommand_help_imports_only_its_own_module(command, options):
    stdout, loaded = run_listing_modules(command, "--help")
    assert loaded & COMMAND_MODULES == {COMMANDS[command][0]}
    for option in options:
        assert option in stdout, option
    if command != "bench":  # bench takes its defaults from its library module
        assert "torch" not in loaded


def test_train_settings_need_no_torch():
    # What `rgemma train` reads before it runs: the settings, their defaults and the model shape.
    code = ("import sys; from rgemma.config import Config; from rgemma.train import TrainSettings, model_config; "
            "TrainSettings('data', 'run', model_config(Config.preset('tiny'), 512, width=32)); "
            "print(*sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch" not in result.stdout.split()


@pytest.mark.parametrize("args", [["generate", "Hello", "--max-tokens", "50"], ["info", "tiny"]])
def test_a_closed_stdout_ends_quietly(args):
    # As under `rgemma ... | head -c 1` once head has gone: every write to stdout fails. generate fails
    # while streaming; info's few lines wait in stdout's buffer (unless PYTHONUNBUFFERED) until it is flushed.
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    try:
        result = subprocess.run([sys.executable, "-m", "rgemma.cli", *args], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    for sign in ("Traceback", "Exception ignored", "Broken pipe", "BrokenPipeError"):
        assert sign not in result.stderr, result.stderr
