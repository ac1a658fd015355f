"""`rgemma generate` and `rgemma chat` as a user runs them: real processes on a real checkpoint directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import rgemma
from conftest import perturb_
from rgemma.tokenizer import Tokenizer, next_user_turn
from spm import train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model in the Hugging Face layout, with its tokenizer.model."""
    root = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(root / "spm", vocab_size=512)
    torch.manual_seed(0)
    out = rgemma.save_model(perturb_(rgemma.Griffin(rgemma.Config.preset("tiny"))), root / "tiny")
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def run(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "rgemma.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def generate_json(model_dir, *args):
    result = run("generate", "--model", model_dir, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_seeded_generation_reproduces_and_streams_the_same_text(model_dir):
    args = ("Once upon a time", "--max-tokens", 12, "--seed", 5, "--ignore-eos")
    first, second = generate_json(model_dir, *args), generate_json(model_dir, *args)
    assert first["tokens"] == second["tokens"] and len(first["tokens"]) == 12
    assert first["finish_reason"] == "length"
    streamed = run("generate", "--model", model_dir, *args)
    assert streamed.returncode == 0
    assert streamed.stdout == first["text"] + "\n"
    assert "tok/s" in streamed.stderr and "state" in streamed.stderr


def test_prompt_from_stdin_and_file(model_dir, tmp_path):
    args = ("--max-tokens", 6, "--temperature", 0, "--ignore-eos")
    direct = generate_json(model_dir, "The sea", *args)
    piped = run("generate", "--model", model_dir, "--json", "-", *args, stdin="The sea")
    assert json.loads(piped.stdout)["tokens"] == direct["tokens"]
    (tmp_path / "prompt.txt").write_text("The sea")
    assert generate_json(model_dir, "--prompt-file", tmp_path / "prompt.txt", *args)["tokens"] == direct["tokens"]


def test_saved_state_continues_like_an_uninterrupted_run(model_dir, tmp_path):
    state = tmp_path / "prompt.safetensors"
    assert run("generate", "--model", model_dir, "A long prompt", "--max-tokens", 0, "--save-state", state).returncode == 0
    args = ("--max-tokens", 10, "--seed", 3, "--ignore-eos", "--logprobs", 2)
    whole = generate_json(model_dir, "A long prompt", *args)
    resumed = generate_json(model_dir, "", "--state", state, *args)
    assert resumed["tokens"] == whole["tokens"]
    assert resumed["prompt_tokens"] == 0
    assert len(whole["logprobs"]) == 10 and len(whole["logprobs"][0]["top"]) == 2


def test_chat_from_a_pipe(model_dir, tmp_path):
    saved = tmp_path / "chat.safetensors"
    script = f"Hello there\n/save {saved}\nAnd a second question\n/quit\n"
    result = run("chat", "--model", model_dir, "--max-tokens", 5, "--temperature", 0, stdin=script)
    assert result.returncode == 0, result.stderr
    assert saved.is_file()
    reports = [line for line in result.stderr.splitlines() if line.startswith("[prompt")]
    assert len(reports) == 2
    # The second turn reads only its own tokens, never the history; an <end_of_turn>
    # comes first when the reply ran out of tokens before closing its turn.
    first, second = (int(line.split()[1]) for line in reports)
    own = len(next_user_turn(Tokenizer(model_dir / "tokenizer.model"), "And a second question"))
    assert second in (own, own + 1) and first > 0


def test_hub_id_from_the_huggingface_cache(model_dir, tmp_path):
    # The cache layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REVISION/...}.
    repo = tmp_path / "hub" / "models--someone--tiny-griffin"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run("generate", "--model", "someone/tiny-griffin", "Hi", "--max-tokens", 3, env=env)
    assert result.returncode == 0, result.stderr
    missing = run("generate", "--model", "someone/absent-model", "Hi", env=env)
    assert missing.returncode == 1
    assert "someone/absent-model" in missing.stderr and str(tmp_path / "hub") in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("args, expected", [
    (("--temperature", "-1"), "temperature"),
    (("--top-p", "1.5"), "top_p"),
    (("--top-k", "-1"), "top_k"),
    (("--max-tokens", "-2"), "max_tokens"),
])
def test_invalid_sampling_values(model_dir, tmp_path, args, expected):
    state = tmp_path / "out.safetensors"
    result = run("generate", "--model", model_dir, "Hi", *args, "--save-state", state)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not state.exists()


def test_bad_paths_and_foreign_state(model_dir, tmp_path):
    missing = run("generate", "--model", tmp_path / "nowhere", "Hi")
    assert missing.returncode == 1 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
    unreadable = run("generate", "--model", model_dir, "--prompt-file", tmp_path / "absent.txt")
    assert unreadable.returncode == 1 and "absent.txt" in unreadable.stderr

    other = tmp_path / "other"
    torch.manual_seed(1)
    rgemma.save_model(rgemma.Griffin(rgemma.Config.preset("tiny")), other)
    shutil.copyfile(model_dir / "tokenizer.model", other / "tokenizer.model")
    state = tmp_path / "other.safetensors"
    assert run("generate", "--model", other, "Hi", "--max-tokens", 0, "--save-state", state).returncode == 0
    foreign = run("generate", "--model", model_dir, "more", "--state", state)
    assert foreign.returncode == 1 and "another model" in foreign.stderr
    assert len(foreign.stderr.strip().splitlines()) == 1
