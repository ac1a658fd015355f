"""Hostile and careless input (issue 16): every file is checked at the boundary, nothing is overwritten by
accident, every failure is one line, and no NaN passes silently.

The fuzz tests feed edited state files and config.json files to load_state / load_model and one decode
step: only clear errors or correct results. Run them under AddressSanitizer as the docstring of
rgemma/backends/native.py says, to check that no state reaches the native step out of its bounds.
"""

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import rgemma
from conftest import perturb_
from rgemma import cli
from rgemma.backends import prepare
from rgemma.backends.native import kernels
from rgemma.chat import Chat
from rgemma.chat import run as run_chat
from rgemma.checkpoint import CheckpointError, load_model
from rgemma.context import Context
from rgemma.engine import Engine
from rgemma.generate import prefill
from rgemma.hub import DEFAULT_MODEL, ModelNotFound, resolve_model
from rgemma.sampling import Sampler, SamplingParams
from rgemma.state import StateFileError, load_state
from rgemma.tokenizer import Tokenizer, TokenizerError

native = pytest.mark.skipif(kernels() is None, reason="the native CPU kernels cannot be built here")
# RGEMMA_FUZZ_EXAMPLES=2000 for a longer search (under AddressSanitizer, say); the default suite's is fixed.
FUZZ = settings(max_examples=int(os.environ.get("RGEMMA_FUZZ_EXAMPLES", 60)), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "rgemma.cli", *args], input=stdin, capture_output=True)


def one_line_error(result, *words):
    """A failed command's stderr: one line naming the problem, no traceback."""
    err = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A copy of the embedded default model, so that no test can touch the package's own files."""
    return shutil.copytree(DEFAULT_MODEL, tmp_path_factory.mktemp("model") / "default")


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model (window 16) as the command line serves it: prepared for its device."""
    torch.manual_seed(0)
    model = perturb_(rgemma.Griffin(rgemma.Config.preset("tiny"))).eval()
    prepare(model)
    return model


@pytest.fixture(scope="module")
def state_file(tiny, tmp_path_factory):
    """A context that has read 20 tokens (past the window: the ring has wrapped)."""
    path = tmp_path_factory.mktemp("state") / "context.safetensors"
    prefill(tiny, [list(range(2, 22))]).save(path, tiny)
    return path


def tampered(source, target, edit):
    """The file at `source` with `edit(tensors)` applied, written to `target` with the same header."""
    with safe_open(source, framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    edit(tensors)
    save_file(tensors, target, metadata=header)
    return target


def decode_step(model, context):
    """One step from a loaded context, as generation takes it: its logits sampled, the token read."""
    token = Sampler([SamplingParams(temperature=0)], model.config.vocab_size)(context.logits).tokens
    logits, _ = prepare(model).step(token[:, None], context.state)
    return Sampler([SamplingParams(temperature=0)], model.config.vocab_size)(logits).tokens


# 1. State files: untrusted input ------------------------------------------------------------------------


def _set(name, value):
    def edit(tensors):
        tensors[name] = value
    return edit


def _item(name, index, value):
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][index] = value
    return edit


def _delete(name):
    return lambda tensors: tensors.pop(name)


STATE_EDITS = {
    # The two of the issue: a zero-length ring (SIGFPE in the native step), a negative position (wrote
    # outside the ring).
    "empty ring": (_set("layers.2.k", torch.zeros(1, 0, 16)), "layers.2.k has shape (1, 0, 16)"),
    "negative position": (_item("position", 0, -5), "position holds values outside"),
    "huge position": (_item("position", 0, 2**63 - 1), "position holds values outside"),
    "position dtype": (_set("position", torch.tensor([20], dtype=torch.int32)), "int64 (B,)"),
    "no rows": (_set("position", torch.zeros(0, dtype=torch.int64)), "non-empty"),
    "h dtype": (lambda t: t.update({"layers.0.h": t["layers.0.h"].double()}), "dtype torch.float64"),
    "ring dtype": (lambda t: t.update({"layers.2.v": t["layers.2.v"].to(torch.int32)}), "dtype torch.int32"),
    "missing": (_delete("layers.1.conv"), "missing tensor layers.1.conv"),
    "unexpected": (_set("layers.7.h", torch.zeros(1, 64)), "unexpected tensors ['layers.7.h']"),
    "NaN": (_item("layers.0.h", (0, 3), math.nan), "layers.0.h holds NaN"),
    "ring slot": (_item("layers.2.pos", (0, 0), 5), "slot 0"),
    "ring future": (_item("layers.2.pos", (0, 4), 20), "slot 4"),
    "token id": (_item("extra.tokens", 3, 512), "outside the vocabulary"),
    "negative token": (_item("extra.tokens", 3, -1), "outside the vocabulary"),
    "lengths": (_set("extra.lengths", torch.tensor([21])), "extra.tokens"),
    "empty row": (_set("extra.lengths", torch.tensor([0])), "at least 1 token"),
    "logits": (_set("extra.logits", torch.zeros(1, 7)), "extra.logits"),
    "no context": (_delete("extra.logits"), "without the generation context"),
}


@pytest.mark.parametrize("case", list(STATE_EDITS))
def test_a_damaged_state_file_is_refused_naming_the_problem(tiny, state_file, tmp_path, case):
    edit, message = STATE_EDITS[case]
    path = tampered(state_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(StateFileError, match=f"^{re.escape(str(path))}: ") as error:
        Context.load(path, tiny)
    assert message in str(error.value)


def test_a_state_file_loads_and_continues_like_the_original(tiny, state_file):
    context = Context.load(state_file, tiny)
    assert context.tokens == [list(range(2, 22))] and int(context.state.position[0]) == 20
    again = prefill(tiny, [list(range(2, 22))])
    assert torch.equal(decode_step(tiny, context), decode_step(tiny, again))


def test_a_ring_saved_in_another_float_dtype_is_converted(tiny, state_file, tmp_path):
    # A bf16 model's rings are float32 on a CPU without fast bf16 and bf16 on one with it: both load.
    path = tampered(state_file, tmp_path / "bf16.safetensors",
                    lambda t: t.update({"layers.2.k": t["layers.2.k"].bfloat16(), "layers.2.v": t["layers.2.v"].half()}))
    state, _, _ = load_state(path, tiny)
    assert state.layers[2].k.dtype == state.layers[2].v.dtype == tiny.activation_dtype


@native
def test_the_native_step_refuses_positions_and_rings_outside_its_contract(tiny):
    backend = prepare(tiny)
    assert backend.decode_path == "native"
    state = tiny.init_state(2)
    state.position[1] = -5
    before = [t.clone() for t in state.tensors()]
    with pytest.raises(ValueError, match="row 1 is at position -5"):
        backend.step(torch.tensor([[3], [4]]), state)
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors()))  # refused before computing
    state.position[1] = 0
    state.layers[2] = rgemma.state.AttentionState(torch.zeros(2, 0, 16), torch.zeros(2, 0, 16),
                                                 torch.zeros(2, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match="an attention ring of no slots"):
        backend.step(torch.tensor([[3], [4]]), state)
    q, k = torch.zeros(1, 4, 16), torch.zeros(1, 16)
    ring, pos = torch.zeros(1, 0, 16), torch.zeros(1, 0, dtype=torch.int64)
    with pytest.raises(ValueError, match="no slots"):
        kernels().attention_step(q, k, k, ring, ring.clone(), pos, torch.zeros(1, dtype=torch.int64),
                                 torch.ones(4), 0.25)
    ring, pos = torch.zeros(1, 8, 16), torch.full((1, 8), -1)
    with pytest.raises(ValueError, match="position -1"):
        kernels().attention_step(q, k, k, ring, ring.clone(), pos, torch.tensor([-1]), torch.ones(4), 0.25)
    x = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="conv_step: row 0 is at position -3"):
        kernels().conv_step(x, torch.zeros(1, 3, 8), torch.zeros(8, 4), torch.zeros(8), torch.tensor([-3]))
    with pytest.raises(ValueError, match="at least one tap"):  # shifting no taps once wrote to offset -L
        kernels().conv_step(x, torch.zeros(1, 0, 8), torch.zeros(8, 1), torch.zeros(8), torch.tensor([0]))


def test_chat_load_of_a_damaged_file_is_reported_and_the_chat_goes_on(tiny, state_file, tmp_path):
    chat = Chat(Engine(tiny), SamplingParams(temperature=0), max_tokens=3)
    chat.context = Context.load(state_file, tiny)
    bad = tampered(state_file, tmp_path / "bad.safetensors", _item("position", 0, -5))
    err = io.StringIO()
    assert chat.command(f"/load {bad}", err) and chat.command(f"/load {tmp_path / 'absent'}", err)
    assert chat.command(f"/load {tmp_path}", err)  # a directory
    two = tmp_path / "two.safetensors"
    prefill(tiny, [[2, 5], [2, 6]]).save(two, tiny)
    assert chat.command(f"/load {two}", err)  # the next turn would fail, and end the chat
    lines = err.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("rgemma: error: ") for line in lines)
    assert lines[3] == f"rgemma: error: {two}: holds 2 rows; a chat continues one"
    assert "position holds values outside" in lines[0] and lines[2].endswith(": is a directory, not a state file")
    assert chat.context.tokens == [list(range(2, 22))]  # the conversation so far is kept


# 2. Overwrites ---------------------------------------------------------------------------------------------


def test_save_state_onto_an_existing_file_needs_force_and_never_touches_the_model(model_dir, tmp_path, capsys):
    args = ["generate", "--model", str(model_dir), "Hello", "--max-tokens", "0", "--save-state"]
    target = tmp_path / "state.safetensors"
    target.write_text("precious")
    assert cli.main([*args, str(target)]) == 1
    assert "already exists; will not overwrite it without --force" in capsys.readouterr().err
    assert target.read_text() == "precious"
    assert cli.main([*args, str(target), "--force"]) == 0
    read = len(Tokenizer.find(model_dir).encode("Hello", bos=True))
    assert load_state(target, load_model(model_dir))[0].position.tolist() == [read]
    for name in ("model.safetensors", "tokenizer.model", "config.json"):
        before = (model_dir / name).read_bytes()
        assert cli.main([*args, str(model_dir / name), "--force"]) == 1
        assert "is a file of the loaded model" in capsys.readouterr().err
        assert (model_dir / name).read_bytes() == before
    link = tmp_path / "link.safetensors"
    link.symlink_to(model_dir / "model.safetensors")
    assert cli.main([*args, str(link), "--force"]) == 1 and "loaded model" in capsys.readouterr().err
    assert cli.main([*args, str(tmp_path), "--force"]) == 1 and "is a directory" in capsys.readouterr().err


def test_chat_save_needs_save_bang_to_replace_and_a_failed_save_is_reported(model_dir, tmp_path):
    model = load_model(model_dir)
    engine = Engine(model, Tokenizer.find(model_dir))
    chat = Chat(engine, SamplingParams(temperature=0), max_tokens=2,
                protected=[model_dir / "model.safetensors", model_dir / "tokenizer.model"])
    existing = tmp_path / "old.safetensors"
    existing.write_text("precious")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    script = (f"Hi\n/save {existing}\n/save {model_dir / 'model.safetensors'}\n/save! {model_dir / 'tokenizer.model'}\n"
              f"/save {tmp_path}\n/save {read_only / 'x.safetensors'}\n/save! {existing}\nAgain\n")
    out, err, turns = io.StringIO(), io.StringIO(), []
    run_chat(chat, io.StringIO(script), out, err, report=turns.append)
    errors = [line for line in err.getvalue().splitlines() if line.startswith("rgemma: error")]
    assert "without /save! FILE" in errors[0] and existing.name in errors[0]
    assert "is a file of the loaded model" in errors[1] and "is a file of the loaded model" in errors[2]
    assert "is a directory" in errors[3]
    if os.geteuid() != 0:  # root writes anywhere
        assert "Permission denied" in errors[4]
    assert f"(saved to {existing})" in err.getvalue()
    saved = Context.load(existing, model).tokens[0]  # the first turn, which the second continued
    assert 0 < len(saved) < len(chat.context.tokens[0]) and chat.context.tokens[0][: len(saved)] == saved
    assert len(turns) == 2  # both turns were answered


# 3. One error path -----------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_nothing(model_dir, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr("rgemma.state.save_file", full)
    monkeypatch.setattr("rgemma.checkpoint.save_file", full)
    target = tmp_path / "state.safetensors"
    assert cli.main(["generate", "--model", str(model_dir), "Hi", "--max-tokens", "0", "--save-state",
                     str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(target) in err and "No space left on device" in err
    assert cli.main(["convert", str(model_dir), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out: cannot write the checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_while_converting_leaves_no_staging_directory(model_dir, tmp_path, monkeypatch, capsys):
    write = rgemma.checkpoint._write_hf

    def killed_midway(model, directory, max_shard_bytes):
        write(model, directory, max_shard_bytes)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("rgemma.checkpoint._write_hf", killed_midway)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(["convert", str(model_dir), str(tmp_path / "out")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler  # main put the previous handler back


def test_invalid_unicode_in_a_prompt_is_one_line(model_dir):
    one_line_error(run("generate", "--model", str(model_dir), b"caf\xe9 au lait"), "not valid Unicode")
    # Read strictly (stdin: not valid UTF-8), or with surrogateescape in Python's UTF-8 mode (not valid Unicode).
    one_line_error(run("generate", "--model", str(model_dir), "-", stdin=b"caf\xe9"), "not valid")


def test_chat_reports_invalid_unicode_and_goes_on(tiny, tmp_path):
    tokenizer = Tokenizer(DEFAULT_MODEL / "tokenizer.model")
    model = load_model(DEFAULT_MODEL)
    chat = Chat(Engine(model, tokenizer), SamplingParams(temperature=0), max_tokens=2)
    out, err, turns = io.StringIO(), io.StringIO(), []
    run_chat(chat, io.StringIO("caf\udce9\nHello\n"), out, err, report=turns.append)
    assert err.getvalue().startswith("rgemma: error: the text is not valid Unicode: lone surrogate '\\udce9'")
    assert len(turns) == 1 and chat.context is not None


@pytest.mark.parametrize("args, message", [
    (["generate", "--threads", "-1", "Hi"], "--threads: must be a positive integer, got -1"),
    (["eval", "--data", "d", "--threads", "-1"], "--threads: must be a positive integer, got -1"),
    (["finetune", "--data", "d", "--out", "o", "--threads", "0"], "--threads: must be a positive integer, got 0"),
    (["bench", "--preset", "tiny", "--threads", "-2"], "--threads: must be a positive integer, got -2"),
    (["generate", "--seed", str(2**64), "Hi"], "--seed: a seed must be in [0, 2**64 - 1]"),
    (["generate", "--seed", "-1", "Hi"], "--seed: a seed must be in"),
    (["convert", "a", "b", "--max-shard-gb", "0"], "--max-shard-gb: must be at least 1 KiB (about 1e-6 GiB), got 0.0"),
    (["convert", "a", "b", "--max-shard-gb", "1e-12"], "--max-shard-gb: must be at least 1 KiB"),
    (["quantize", "a", "b", "--bits", "4", "--max-shard-gb", "nan"], "--max-shard-gb: 'nan' is not a finite number"),
    (["train", "data", "--run-dir", "r", "--seq-len", "0"], "--seq-len: must be a positive integer, got 0"),
    (["train", "data", "--run-dir", "r", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["train", "data", "--run-dir", "r", "--log-every", "0"], "--log-every: must be a positive integer"),
    (["train", "data", "--run-dir", "r", "--checkpoint-every", "0"], "--checkpoint-every: must be a positive"),
    (["train", "data", "--run-dir", "r", "--eval-every", "0"], "--eval-every: must be a positive integer"),
    (["train", "data", "--run-dir", "r", "--eval-batches", "0"], "--eval-batches: must be a positive integer"),
    (["train", "data", "--run-dir", "r", "--steps", "0"], "--steps: must be a positive integer"),
    (["train", "data", "--run-dir", "r", "--grad-clip", "nan"], "--grad-clip: 'nan' is not a finite number"),
    (["train", "data", "--run-dir", "r", "--grad-clip", "0"], "--grad-clip: must be a finite number > 0"),
    (["train", "data", "--run-dir", "r", "--seed", str(2**64)], "--seed: a seed must be in"),
    (["train", "data", "--run-dir", "r", "--window", "-4"], "--window: must be a positive integer"),
    (["prepare-data", "out", "--heldout-fraction", "1"], "--heldout-fraction: must be a fraction in (0, 1)"),
    (["prepare-data", "out", "--vocab-size", "-1"], "--vocab-size: must be an integer >= 0"),
])
def test_numeric_flags_are_checked_as_they_are_parsed(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_training_settings_are_ranged_in_the_library_too():
    config = rgemma.Config.preset("tiny")
    for field, value in (("steps", 0), ("grad_clip", math.nan), ("eval_batches", 0), ("seq_len", -1),
                         ("seed", 2**64), ("beta2", 1.0), ("lr", math.inf), ("log_every", True)):
        with pytest.raises(ValueError, match=f"training setting {field} must be"):
            rgemma.train.TrainSettings("data", "run", config, **{field: value})


def test_prompt_file_and_prompt_together_and_an_empty_or_mistyped_model(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("Hi")
    assert cli.main(["generate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "p.txt"), "Hi"]) == 1
    assert "not both" in capsys.readouterr().err
    with pytest.raises(ModelNotFound, match="empty"):
        resolve_model("")
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)  # models/tiny-v2 matches the hub id pattern, but models/ is a local directory
    with pytest.raises(ModelNotFound, match="^models/tiny-v2: no such file or directory$"):
        resolve_model("models/tiny-v2")


# Config files ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    return rgemma.save_model(tiny, tmp_path_factory.mktemp("tiny") / "tiny")


def with_config(tiny_dir, target, **changes):
    """A model directory whose config.json has `changes` (None deletes the key), sharing tiny_dir's weights."""
    target.mkdir()
    (target / "model.safetensors").symlink_to(tiny_dir / "model.safetensors")
    hf = json.loads((tiny_dir / "config.json").read_text())
    hf.update(changes)
    (target / "config.json").write_text(json.dumps(hf))
    return target


@pytest.mark.parametrize("key, value, message", [
    ("attention_window_size", 1.5, "attention_window_size must be an integer in [1, 1048576], got 1.5"),
    ("attention_window_size", True, "attention_window_size must be an integer in [1, 1048576], got True"),
    ("attention_window_size", 2**40, "attention_window_size must be an integer in [1, 1048576]"),
    ("rms_norm_eps", "x", "rms_norm_eps must be a finite number in (0, 1), got 'x'"),
    ("rope_theta", -1, "rope_theta must be a finite number > 0, got -1.0"),
    ("num_hidden_layers", 10**12, "num_hidden_layers must be an integer in [1, 4096]"),
    ("intermediate_size", 1.5, "intermediate_size must be an integer"),
    ("conv1d_width", 1, "conv1d_width must be an integer in [2, 64]"),
    ("logits_soft_cap", math.nan, "logits_soft_cap must be a finite number >= 0"),
    ("block_types", "recurrent", "block_types must be a non-empty list"),
    ("embeddings_scale_by_sqrt_dim", "yes", "embeddings_scale_by_sqrt_dim must be true or false"),
])
def test_a_bad_config_value_is_one_error_naming_its_key(tiny_dir, tmp_path, key, value, message):
    directory = with_config(tiny_dir, tmp_path / "m", **{key: value})
    with pytest.raises(CheckpointError) as error:
        load_model(directory)
    assert str(error.value).startswith(f"{directory / 'config.json'}: ") and message in str(error.value)
    assert len(str(error.value)) < 300 and "\n" not in str(error.value)


def test_a_model_with_fewer_ids_than_its_tokenizer_is_refused_at_load(tmp_path, capsys):
    torch.manual_seed(0)
    small = rgemma.save_model(rgemma.Griffin(rgemma.Config.preset("tiny")), tmp_path / "small")  # 512 ids
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", small / "tokenizer.model")  # 8192 pieces
    assert cli.main(["generate", "--model", str(small), "Hi"]) == 1
    err = capsys.readouterr().err
    assert "8192 pieces, more than the model's vocabulary of 512" in err and err.count("\n") == 1


# Other APIs ----------------------------------------------------------------------------------------------------


def test_prompts_with_ids_outside_the_vocabulary_are_refused(tiny):
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 512\)"):
        prefill(tiny, [[2, 512]])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        prefill(tiny, [[2, -1]])
    with pytest.raises(ValueError, match="empty prompt"):
        prefill(tiny, [[]])
    # The network itself, called directly.
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 512\)"):
        tiny(torch.tensor([[2, 512]]))
    with pytest.raises(ValueError, match=r"at least one row and one token, got shape \(1, 0\)"):
        tiny(torch.zeros(1, 0, dtype=torch.long))


def test_non_finite_logits_stop_sampling():
    logits = torch.zeros(2, 8)
    logits[1, 3] = math.nan
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1)):
        with pytest.raises(ValueError, match="NaN or infinite logits \\(batch row 1\\)"):
            Sampler([params, params], 8)(logits)
    logits[1, 3] = math.inf
    with pytest.raises(ValueError, match="NaN or infinite logits"):
        Sampler([SamplingParams(temperature=0)] * 2, 8)(logits)


def test_int4_groups_that_would_bloat_the_model_are_refused(model_dir, tmp_path, capsys):
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "q"), "--bits", "4", "--group-size", "6400"]) == 1
    err = capsys.readouterr().err
    assert "has 160 inputs, which int4 groups of 6400 pad to 6400, more than double" in err
    assert list(tmp_path.iterdir()) == []


# Token files and corpora --------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"text": 5}', "corpus.jsonl:2: the text field is a number, not a string"),
    ('{"text": ["a"]}', "corpus.jsonl:2: the text field is a list, not a string"),
    ('{"text": {"a": 1}}', "corpus.jsonl:2: the text field is an object, not a string"),
    ('{"text": null}', "corpus.jsonl:2: the text field is null, not a string"),
    ('{"text": "\\ud800"}', "corpus.jsonl:2: the text is not valid Unicode"),
    ('[1, 2]', "corpus.jsonl:2: not a JSON object with a text field\n"),
    ('{"txt": "a"}', "corpus.jsonl:2: not a JSON object with a text field\n"),
    ('{"text": "a"', "corpus.jsonl:2: not JSON (Expecting ',' delimiter"),
])
def test_tokenize_names_the_line_of_a_bad_document(tmp_path, capsys, line, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n' + line + "\n")
    out = tmp_path / "tokens.bin"
    assert cli.main(["tokenize", str(corpus), str(out), "--tokenizer", str(DEFAULT_MODEL / "tokenizer.model")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_tokenize_names_a_corpus_that_is_not_utf8(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "caf\xe9"}\n')
    assert cli.main(["tokenize", str(corpus), str(tmp_path / "t.bin"), "--tokenizer",
                     str(DEFAULT_MODEL / "tokenizer.model")]) == 1
    err = capsys.readouterr().err
    assert f"{corpus}: not UTF-8 text" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    from rgemma.train import write_token_file

    return write_token_file(tmp_path_factory.mktemp("tokens") / "t.bin", iter([[2, 5, 6, 1], [2, 7, 1]]),
                            vocab_size=16, bos_id=2, eos_id=1)


def _with_header(source, target, **changes):
    from rgemma.train.tokens import HEADER_BYTES

    data = bytearray(source.read_bytes())
    header = json.loads(data[:HEADER_BYTES].decode())
    header.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del header[key]
    data[:HEADER_BYTES] = json.dumps(header).encode().ljust(HEADER_BYTES)
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("changes, message", [
    ({"starts_offset": None}, "header field starts_offset must be an integer >= 0, got None"),
    ({"vocab_size": 6}, "holds token id 7, outside its vocabulary of 6"),
    ({"num_tokens": "7"}, "header field num_tokens must be an integer"),
    ({"dtype": "object"}, "header field dtype must be uint16 or int32"),
    ({"num_documents": 9}, "truncated"),
    ({"eos_id": 99}, "bos or eos id outside the vocabulary"),
])
def test_a_damaged_token_file_is_refused(token_file, tmp_path, changes, message):
    from rgemma.train import TokenFile

    assert len(TokenFile.open(token_file)) == 7
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'bad.bin'))}: ") as error:
        TokenFile.open(_with_header(token_file, tmp_path / "bad.bin", **changes))
    assert message in str(error.value)


# Fuzz ----------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8,
          torch.bool]


@st.composite
def state_edits(draw, names):
    """One edit of a state file's tensors: a new shape, dtype or value, a tensor dropped or added."""
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["shape", "dtype", "value", "value", "delete", "add"]))
    if kind == "shape":
        shape = draw(st.lists(st.integers(0, 24), max_size=3))
        return lambda t: t.update({name: torch.zeros(shape, dtype=t[name].dtype)}) if name in t else None
    if kind == "dtype":
        dtype = draw(st.sampled_from(DTYPES))
        return lambda t: t.update({name: t[name].to(dtype)}) if name in t else None
    if kind == "delete":
        return lambda t: t.pop(name, None)
    if kind == "add":
        extra = draw(st.sampled_from(["layers.3.h", "layers.2.h", "junk", "extra.more"]))
        return lambda t: t.update({extra: torch.zeros(1, 4)})
    index = draw(st.integers(0, 2**16))
    integer = draw(st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, 40), st.just(2**62)))
    real = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))

    def edit(tensors):
        if name not in tensors or tensors[name].numel() == 0:
            return
        tensor = tensors[name].clone()
        if tensor.dtype.is_floating_point:
            value = real
        elif tensor.dtype == torch.bool:
            value = bool(integer % 2)
        else:  # within the dtype's range, after a dtype edit
            value = min(max(integer, torch.iinfo(tensor.dtype).min), torch.iinfo(tensor.dtype).max)
        tensor.view(-1)[index % tensor.numel()] = value
        tensors[name] = tensor
    return edit


@native
@FUZZ
@given(data=st.data())
def test_fuzzed_state_files_give_clear_errors_or_correct_steps(tiny, state_file, tmp_path_factory, data):
    with safe_open(state_file, framework="pt") as handle:
        names = sorted(handle.keys())
    edits = data.draw(st.lists(state_edits(names), min_size=1, max_size=3))
    path = tampered(state_file, tmp_path_factory.mktemp("fuzz") / "s.safetensors",
                    lambda tensors: [edit(tensors) for edit in edits])
    try:
        context = Context.load(path, tiny)
    except StateFileError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        return
    try:
        tokens = decode_step(tiny, context)
    except ValueError as error:  # values a model can hold, which give non-finite logits
        assert "NaN or infinite logits" in str(error)
        return
    assert 0 <= int(tokens[0]) < tiny.config.vocab_size


@native
@FUZZ
@given(data=st.data())
def test_fuzzed_states_given_straight_to_the_native_step_are_refused_or_computed(tiny, state_file, data):
    # Past load_state's checks: the binding's own, on every call, are all that stands between these
    # tensors and the kernels' pointer arithmetic (run under AddressSanitizer to see them hold).
    with safe_open(state_file, framework="pt") as handle:
        names = sorted(handle.keys())
        tensors = {name: handle.get_tensor(name) for name in names}
    for edit in data.draw(st.lists(state_edits([n for n in names if not n.startswith("extra.")]), max_size=3)):
        edit(tensors)
    layers = [[tensors.get(f"layers.{i}.{field}", torch.zeros(0)) for field in fields]
              for i, fields in enumerate(["h conv".split(), "h conv".split(), "k v pos".split()])]
    position = tensors.get("position", torch.zeros(1, dtype=torch.int64))
    decoder = prepare(tiny)._current_decoder()
    token = torch.full((max(position.numel(), 1),), 7, dtype=torch.int64)
    try:
        logits = decoder.step(token, position, layers)
    except (RuntimeError, ValueError, TypeError):  # the binding refused: one line, nothing computed
        return
    assert logits is None or logits.shape == (token.numel(), tiny.config.vocab_size)


CONFIG_VALUES = st.one_of(
    st.integers(-2**70, 2**70), st.integers(-2, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=4), st.none(), st.lists(st.sampled_from(["recurrent", "attention", 1]), max_size=4),
)
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "lru_width", "num_hidden_layers", "block_types", "attention_window_size", "logits_soft_cap",
               "embeddings_scale_by_sqrt_dim", "conv1d_width", "rope_theta", "rms_norm_eps", "model_type",
               "quantization", "rope_parameters"]


@native
@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), CONFIG_VALUES, min_size=1, max_size=3))
def test_fuzzed_config_files_give_clear_errors_or_a_working_model(tiny_dir, tmp_path_factory, changes):
    directory = with_config(tiny_dir, tmp_path_factory.mktemp("fuzz") / "m", **changes)
    try:
        model = load_model(directory).eval()
    except CheckpointError as error:
        assert str(error).startswith(str(directory)) and "\n" not in str(error) and len(str(error)) < 1000
        return
    prepare(model)
    try:
        context = prefill(model, [[2, 5, 7]])
        assert 0 <= int(decode_step(model, context)[0]) < model.config.vocab_size
    except ValueError as error:  # a config that loads (a soft cap of 1e300, say) may still give non-finite logits
        assert "NaN or infinite logits" in str(error)


def test_train_refuses_held_out_data_without_a_row_and_a_bad_config(token_file, tmp_path, capsys):
    base = ["train", str(token_file), "--run-dir", str(tmp_path / "run"), "--width", "16", "--heads", "1",
            "--seq-len", "4"]
    assert cli.main([*base, "--eval-data", str(token_file), "--seq-len", "8"]) == 1
    assert "fewer than 9 tokens, not one row of --seq-len 8" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**rgemma.Config.preset("tiny").to_hf_dict(), "rope_theta": -1}))
    assert cli.main([*base, "--config", str(config)]) == 1
    assert f"{config}: config.json rope_theta must be a finite number > 0" in capsys.readouterr().err
    config.write_text("[1, 2]")
    assert cli.main([*base, "--config", str(config)]) == 1
    assert "expected a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_model_giving_nan_logits_stops_generation_and_json_never_holds_nan(model_dir, tmp_path, capsys):
    model = load_model(model_dir)
    with torch.no_grad():
        model.final_norm.weight[0] = math.nan
    broken = rgemma.save_model(model, tmp_path / "broken")
    shutil.copyfile(model_dir / "tokenizer.model", broken / "tokenizer.model")
    assert cli.main(["generate", "--model", str(broken), "--json", "Hi", "--max-tokens", "3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "NaN or infinite logits" in err and err.count("\n") == 1


# Found by trying each case of issue 16 again ------------------------------------------------------------------


def test_a_closed_pipe_ends_generate_quietly(model_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "rgemma.cli", "generate", "--model", str(model_dir), "Hello", "--max-tokens", "300",
         "--ignore-eos", "--temperature", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(process.stdout.read(3)) == 3  # `| head -c 3`: the reader takes 3 bytes and leaves
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 0, err
    assert "error" not in err and "Traceback" not in err and "generated 300 tokens" not in err, err


def test_generate_refuses_a_state_of_several_rows(model_dir, tmp_path, capsys):
    two = tmp_path / "two.safetensors"
    model = load_model(model_dir)
    prefill(model, [[2, 5], [2, 6]]).save(two, model)
    assert cli.main(["generate", "--model", str(model_dir), "--state", str(two), "Hi", "--max-tokens", "2"]) == 1
    assert capsys.readouterr().err == f"rgemma: error: {two}: holds 2 rows; generate continues one\n"


def test_an_empty_model_name_is_one_line_before_loading(capsys):
    assert cli.main(["generate", "--model", "", "Hi"]) == 1
    assert capsys.readouterr().err == ("rgemma: error: the model name is empty: give a checkpoint path or a hub id, "
                                       "or leave --model out\n")


def test_a_mistyped_path_that_could_be_a_hub_id_says_there_is_no_such_directory(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)  # no network in the tests
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound, match="^modls/tiny: no such directory here, and as a hub id not in"):
        resolve_model("modls/tiny")


def test_an_unwritable_target_is_named_not_the_hidden_temporary(model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, where a directory is needed")
    assert cli.main(["generate", "--model", str(model_dir), "Hi", "--max-tokens", "0", "--save-state",
                     str(blocker / "state.safetensors")]) == 1
    assert capsys.readouterr().err == f"rgemma: error: {blocker / 'state.safetensors'}: cannot write the state: File exists\n"
    assert cli.main(["convert", str(model_dir), str(blocker / "out")]) == 1
    assert capsys.readouterr().err == f"rgemma: error: {blocker / 'out'}: cannot write the checkpoint: File exists\n"
    assert cli.main(["quantize", str(model_dir), str(blocker / "q"), "--bits", "8"]) == 1
    assert capsys.readouterr().err.endswith(f"rgemma: error: {blocker / 'q'}: cannot write the checkpoint: File exists\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_quantize_on_a_full_disk_is_one_line_and_leaves_nothing(model_dir, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("rgemma.checkpoint.save_file", full)
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "q"), "--bits", "4"]) == 1
    assert capsys.readouterr().err.endswith(f"rgemma: error: {tmp_path / 'q'}: cannot write the checkpoint: "
                                            "SafetensorError: Error while serializing: I/O error: No space left on "
                                            "device (os error 28)\n")
    assert list(tmp_path.iterdir()) == []


def test_chat_save_on_a_full_disk_is_reported_and_the_chat_goes_on(tiny, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("rgemma.state.save_file", full)
    chat = Chat(Engine(tiny), SamplingParams(temperature=0), max_tokens=3)
    chat.context = prefill(tiny, [[2, 5, 7]])
    err = io.StringIO()
    assert chat.command(f"/save {tmp_path / 'c.safetensors'}", err)
    assert err.getvalue() == (f"rgemma: error: {tmp_path / 'c.safetensors'}: cannot write the state: Error while "
                              "serializing: I/O error: No space left on device (os error 28)\n")
    assert chat.context.tokens == [[2, 5, 7]] and list(tmp_path.iterdir()) == []


def test_prefill_of_no_prompts_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="^no prompts: give at least one$"):
        prefill(tiny, [])


def _train(token_file, run_dir, *extra):
    return cli.main(["train", str(token_file), "--run-dir", str(run_dir), "--width", "16", "--heads", "1",
                     "--seq-len", "4", "--batch-size", "1", "--no-progress", *extra])


def test_training_stops_on_a_non_finite_loss_and_saves_nothing(token_file, tmp_path, capsys):
    assert _train(token_file, tmp_path / "run", "--steps", "5", "--warmup", "0", "--lr", "1e30") == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"rgemma: error: step \d: the loss is nan and the gradient norm nan; stopped without saving "
                        r"anything new; try a lower --lr\n", err), err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.jsonl"]  # no checkpoint, no export
    assert "NaN" not in (tmp_path / "run" / "log.jsonl").read_text()


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "cannot read the checkpoint (PytorchStreamReader failed reading zip archive"),
    (lambda data: b"garbage", "cannot read the checkpoint (Weights only load failed)"),
])
def test_resuming_from_a_damaged_checkpoint_is_one_line(token_file, tmp_path, capsys, damage, message):
    assert _train(token_file, tmp_path / "run", "--steps", "2") == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))
    before = checkpoint.read_bytes()
    capsys.readouterr()
    assert _train(token_file, tmp_path / "run", "--steps", "4") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rgemma: error: {checkpoint}: {message}") and err.count("\n") == 1, err
    assert err.endswith("; remove it to start the run again\n") and checkpoint.read_bytes() == before


def test_a_checkpoint_of_something_else_is_refused(token_file, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    torch.save({"step": 3}, tmp_path / "run" / "checkpoint.pt")
    assert _train(token_file, tmp_path / "run", "--steps", "4") == 1
    assert capsys.readouterr().err == (f"rgemma: error: {tmp_path / 'run' / 'checkpoint.pt'}: not a checkpoint of "
                                       "`rgemma train`; remove it to start the run again\n")


def test_sigterm_while_training_saves_a_checkpoint_like_ctrl_c(token_file, tmp_path):
    from rgemma.train import model_config, train

    def kill_at_step_2(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    settings = rgemma.train.TrainSettings(str(token_file), str(tmp_path / "run"),
                                          model_config(rgemma.Config.preset("tiny"), 16, width=16, heads=1),
                                          steps=6, batch_size=1, seq_len=4, checkpoint_every=100, progress=False)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as `rgemma` sets it
    try:
        result = train(settings, on_step=kill_at_step_2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.interrupted and result.step == 2
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "run" / "final").exists()


def test_tokenize_never_writes_onto_its_inputs_and_replaces_a_file_only_with_force(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n')
    tokenizer = shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", tmp_path / "tokenizer.model")
    before = {path: path.read_bytes() for path in (corpus, tokenizer)}
    for out, message in ((corpus, "is the corpus this command reads"), (tokenizer, "is the tokenizer this command reads")):
        assert cli.main(["tokenize", str(corpus), str(out), "--tokenizer", str(tokenizer), "--force"]) == 1
        assert capsys.readouterr().err == f"rgemma: error: {out}: {message}; will not overwrite it\n"
    out = tmp_path / "tokens.bin"
    out.write_text("precious")
    assert cli.main(["tokenize", str(corpus), str(out), "--tokenizer", str(tokenizer)]) == 1
    assert capsys.readouterr().err == f"rgemma: error: {out}: already exists; will not overwrite it without --force\n"
    assert out.read_text() == "precious" and before == {path: path.read_bytes() for path in before}
    assert cli.main(["tokenize", str(corpus), str(out), "--tokenizer", str(tokenizer), "--force"]) == 0
    assert len(rgemma.train.TokenFile.open(out)) == len(Tokenizer(tokenizer).encode("fine", bos=True)) + 1


def test_train_in_the_library_refuses_held_out_data_without_a_row(token_file, tmp_path):
    from rgemma.train import model_config, train

    settings = rgemma.train.TrainSettings(str(token_file), str(tmp_path / "run"),
                                          model_config(rgemma.Config.preset("tiny"), 16, width=16, heads=1),
                                          eval_data=str(token_file), steps=2, batch_size=1, seq_len=8, progress=False)
    with pytest.raises(ValueError, match=r"t.bin: fewer than 9 tokens, not one row of 8 to evaluate on$"):
        train(settings)
    assert not (tmp_path / "run").exists()


def test_a_torchrun_worker_names_its_rank_in_its_error_line(tmp_path, monkeypatch, capsys):
    """Under torchrun every worker reports its own failure: ranks past 0 say which they are."""
    for rank, speaker in (("0", "rgemma: error: "), ("1", "rgemma[rank 1]: error: ")):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 1
        assert capsys.readouterr().err.startswith(speaker)
